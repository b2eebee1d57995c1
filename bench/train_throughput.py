"""Training-step benchmarks (issue: single-process trainer), side by side in one run:

(a) tokens/s of this trainer (layer dropout and early-exit loss off) vs a plain transformers
    LlamaForCausalLM + torch AdamW loop of the same shape;
(b) step time with p_max in {0, 0.2, 0.5} (D = exp, S = 1) against the expected saving;
(c) step-time overhead of the early-exit loss: all exits vs rotational R=4 vs none.

    python -m bench.train_throughput [--repeats 7] [--layers 8] [--dim 256] [--seq 256] [--batch 8]
"""
from __future__ import annotations

import argparse

import torch

from bench.common import interleaved_medians, random_batch, record, trainer_for
from pretrain.config import RunConfig
from pretrain.layerskip.plan import StepPlan
from pretrain.model import ModelConfig
from schedules.exit_loss import exit_loss_weights
from schedules.layer_dropout import layer_dropout_rates


def hf_step(cfg: ModelConfig, batch):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, attn_implementation="sdpa"))
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

    def step():
        out = hf(input_ids=batch["tokens"])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), batch["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    L = args.layers
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=L, n_heads=args.dim // 64,
                      n_kv_heads=max(1, args.dim // 128), ffn_dim=int(args.dim * 8 / 3) // 64 * 64,
                      max_seq_len=args.seq)
    batch = random_batch(cfg.vocab_size, args.batch, args.seq)
    tokens = args.batch * args.seq
    run = RunConfig(model=cfg)   # the trainer's own step: one micro-batch, clipping at 1, fused AdamW
    run.train.global_batch_size = run.train.micro_batch_size = args.batch
    run.train.seq_len, run.train.device, run.optim.lr = args.seq, "cpu", 1e-4
    trainer = trainer_for(run)

    def our_step(plan):
        return lambda: trainer.train_step(plan, batch)

    def plan(p_max=0.0, exits=None, step=0):
        rates = layer_dropout_rates(step, num_layers=L, total_steps=1, p_max=p_max, depth="exp", time="constant")
        return StepPlan(step=step, drop_rates=tuple(rates), exit_weights=exits or {L: 1.0}, dropout_seed=0)

    # (a) parity with transformers
    times_a = interleaved_medians({"ours": our_step(plan()),
                                   "transformers": hf_step(cfg, batch)}, args.repeats)
    ratio_a = times_a["transformers"] / times_a["ours"]

    # (b) layer-dropout savings. Expected step time at p: T(0) - mean_l p(l) · (T(0) - T_no_blocks).
    # Steps cycle through several dropout draws so one lucky draw does not decide the result.
    class Cycling:
        def __init__(self, p_max):
            self.p_max, self.step = p_max, 0

        def __call__(self):
            self.step += 1
            our_step(plan(self.p_max, step=self.step))()

    no_blocks = StepPlan(step=0, drop_rates=(1.0,) * L, exit_weights={L: 1.0}, dropout_seed=0)
    cases_b = {"p=0": our_step(plan(0.0)), "p=0.2": Cycling(0.2),
               "p=0.5": Cycling(0.5), "no blocks": our_step(no_blocks)}
    times_b = interleaved_medians(cases_b, args.repeats)
    block_time = times_b["p=0"] - times_b["no blocks"]
    rows_b = []
    for p in (0.2, 0.5):
        mean_rate = sum(layer_dropout_rates(0, num_layers=L, total_steps=1, p_max=p, depth="exp",
                                            time="constant")) / L
        expected = block_time * mean_rate
        realised = times_b["p=0"] - times_b[f"p={p}"]
        rows_b.append((p, mean_rate, times_b[f"p={p}"], expected, realised, realised / expected))

    # (c) early-exit loss overhead
    all_exits = exit_loss_weights(0, num_layers=L, curriculum="none")
    cases_c = {"none": our_step(plan()),
               "all exits": our_step(plan(exits=all_exits))}
    rot = [exit_loss_weights(t, num_layers=L, curriculum="rotational", rotation_period=4) for t in range(4)]
    state = {"t": 0}

    def rotational():
        state["t"] += 1
        our_step(plan(exits=rot[state["t"] % 4]))()
    cases_c["rotational R=4"] = rotational
    times_c = interleaved_medians(cases_c, args.repeats)

    table = [f"Model: {L} layers, dim {cfg.dim}, vocab {cfg.vocab_size}; batch {args.batch} x seq {args.seq}; "
             f"median of {args.repeats} interleaved repeats.", "",
             "## (a) tokens/s vs transformers LlamaForCausalLM + AdamW (both plain LM loss)", "",
             "| loop | step s | tokens/s |", "|---|---|---|"]
    for name in ("ours", "transformers"):
        table.append(f"| {name} | {times_a[name]:.4f} | {tokens / times_a[name]:,.0f} |")
    table += ["", f"ours / transformers throughput: **{ratio_a:.2f}x** (target >= 1.0)", "",
              "## (b) layer dropout (D=exp, S=1): realised vs expected step-time saving", "",
              f"T(p=0) = {times_b['p=0']:.4f} s, T(all blocks skipped) = {times_b['no blocks']:.4f} s", "",
              "| p_max | mean p(l) | step s | expected saving s | realised s | realised/expected |",
              "|---|---|---|---|---|---|"]
    for p, mr, t, e, r, f in rows_b:
        table.append(f"| {p} | {mr:.3f} | {t:.4f} | {e:.4f} | {r:.4f} | **{f:.2f}** |")
    table += ["", "Target: realised/expected >= 0.8.", "",
              "## (c) early-exit loss overhead", "", "| exits | step s | vs none |", "|---|---|---|"]
    for name, t in times_c.items():
        table.append(f"| {name} | {t:.4f} | {t / times_c['none']:.2f}x |")
    record("train_throughput", "Training step benchmarks", {
        "args": vars(args), "a_seconds": times_a, "a_ratio": ratio_a, "b_seconds": times_b,
        "b_rows": [dict(zip(("p_max", "mean_rate", "step_s", "expected_s", "realised_s", "fraction"), r))
                   for r in rows_b],
        "c_seconds": times_c}, "\n".join(table))


if __name__ == "__main__":
    main()
