"""Self-speculative decoding benchmark (issue: decoder), side by side in one run, batch 1 unless said:

- per exit E and draft length γ: wall-clock speedup over autoregressive decoding of the same
  prompts (greedy; outputs checked identical), acceptance α, layer evaluations per token, and the
  measured speedup over the one predicted from the measured α, (1-α^(γ+1))/((1-α)(1+γE/L)), and
  over the one predicted from α and this machine's measured costs of a block and of the shared
  head on 1..γ+1 positions (schedules/speedup.py): the paper's formula counts blocks only, which
  is fair for a 32-layer model on a GPU but not for a small one whose head costs about as much as
  a block, on a CPU where a block on γ+1 positions costs more than on one;
- the dynamic exit choosing (E, γ) by layer count and by the measured costs, side by side;
- the same weights exported to the Hugging Face layout and decoded by transformers'
  generate(assistant_early_exit=E, num_assistant_tokens=γ): identical greedy tokens, and tokens/s;
- tokens/s at batch 8 vs batch 1.

    python -m bench.decoding_speedup --checkpoint runs/bench_decode [--prompts 8] [--new-tokens 64] \
        [--device cuda --dtype bfloat16] [--compile reduce-overhead]
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from bench.common import interleaved_medians, record
from pretrain.checkpoint.inference import resolve_checkpoint
from pretrain.model_loading import load_model
from pretrain.data.dataset import PackedDataset
from pretrain.decoding import DecodeOptions, DecodeStats, generate
from pretrain.decoding.compiled import COMPILE_MODES, compile_blocks_for_decoding
from pretrain.decoding.cost_model import measure_decode_costs
from pretrain.device import select_device
from schedules.speedup import expected_speedup, expected_speedup_with_costs


def decode_each(model, prompts, opts):
    """Batch 1, prompt after prompt: (outputs, DecodeStats.summary() of all of them)."""
    outs, merged = [], DecodeStats()
    for p in prompts:
        out, st = generate(model, [p], opts)
        outs += out
        merged.merge(st)
    return outs, merged.summary()


def hf_generate_each(hf, prompts, new_tokens, exit_layer=None, gamma=None):
    outs = []
    for p in prompts:
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
        if exit_layer is not None:
            kwargs.update(assistant_early_exit=exit_layer, num_assistant_tokens=gamma,
                          num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0)
        out = hf.generate(torch.tensor([p], device=hf.device), **kwargs)
        outs.append(out[0, len(p):].tolist())
    return outs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/bench_decode")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--exits", default="1,2,3,4")
    ap.add_argument("--gammas", default="1,2,3,4,6")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (transformers runs on the same device)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--compile", choices=COMPILE_MODES, help="compile our blocks for decoding (not transformers')")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    ckpt = resolve_checkpoint(args.checkpoint)
    device = select_device(args.device)
    dtype = getattr(torch, args.dtype)
    model, _ = load_model(ckpt, device=device, dtype=dtype)
    if args.compile:
        compile_blocks_for_decoding(model, args.compile)
    L = model.cfg.n_layers
    from omegaconf import OmegaConf
    val = PackedDataset(OmegaConf.load(ckpt / "config.yaml").data.dir, "val")
    prompts = [val[i][:args.prompt_len].tolist() for i in range(args.prompts)]
    n_tok = args.prompts * args.new_tokens
    ar = DecodeOptions(strategy="autoregressive", max_new_tokens=args.new_tokens)
    reference, _ = decode_each(model, prompts, ar)

    configs = [(E, g) for E in map(int, args.exits.split(",")) for g in map(int, args.gammas.split(","))]
    cases = {"autoregressive": lambda: decode_each(model, prompts, ar)}
    stats = {}
    for E, g in configs:
        opts = DecodeOptions(exit_layer=E, draft_len=g, max_new_tokens=args.new_tokens)
        outs, stats[(E, g)] = decode_each(model, prompts, opts)
        assert outs == reference, f"E={E} γ={g}: self-speculative output differs from autoregressive"
        cases[f"E={E},g={g}"] = (lambda o=opts: decode_each(model, prompts, o))
    max_gamma = max(g for _, g in configs)
    costs = measure_decode_costs(model, max_gamma + 1, context=args.prompt_len + args.new_tokens // 2)
    dynamic = {name: DecodeOptions(exit_layer=L // 2, draft_len=min(2, max_gamma), max_draft_len=max_gamma,
                                   dynamic_exit=True, costs=c, max_new_tokens=args.new_tokens)
               for name, c in (("dynamic by layer count", None), ("dynamic by measured costs", costs))}
    dynamic_stats = {}
    for name, opts in dynamic.items():
        outs, dynamic_stats[name] = decode_each(model, prompts, opts)
        assert outs == reference, f"{name}: output differs from autoregressive"
        cases[name] = (lambda o=opts: decode_each(model, prompts, o))
    times = interleaved_medians(cases, args.repeats)
    rows = []
    for E, g in configs:
        s = stats[(E, g)]
        speedup = times["autoregressive"] / times[f"E={E},g={g}"]
        predicted = expected_speedup(min(s["acceptance"], 1.0), g, E, L)
        with_costs = expected_speedup_with_costs(min(s["acceptance"], 1.0), g, E, L, costs)
        rows.append({"exit_layer": E, "draft_len": g, "tokens_per_s": n_tok / times[f"E={E},g={g}"],
                     "speedup": speedup, "acceptance": s["acceptance"],
                     "layer_evals_per_token": s["layer_evals_per_token"], "predicted_speedup": predicted,
                     "measured_over_predicted": speedup / predicted, "predicted_with_costs": with_costs,
                     "measured_over_predicted_with_costs": speedup / with_costs})
    best = max(rows, key=lambda r: r["speedup"])

    # transformers' assistant_early_exit on the same weights, at the best config and at γ=best
    from pretrain.hf_interop import save_hf_checkpoint
    from transformers import LlamaForCausalLM
    hf_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(load_model(ckpt)[0], tmp)  # exported from a float32 CPU copy
        hf = LlamaForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    hf_configs = sorted({(best["exit_layer"], best["draft_len"]), (2, 4), (1, 2)} & set(configs))
    hf_cases = {"hf autoregressive": lambda: hf_generate_each(hf, prompts, args.new_tokens),
                "ours autoregressive": lambda: decode_each(model, prompts, ar)}
    for E, g in hf_configs:
        theirs = hf_generate_each(hf, prompts, args.new_tokens, E, g)
        identical = theirs == reference
        opts = DecodeOptions(exit_layer=E, draft_len=g, max_new_tokens=args.new_tokens)
        hf_cases[f"hf E={E},g={g}"] = (lambda E=E, g=g: hf_generate_each(hf, prompts, args.new_tokens, E, g))
        hf_cases[f"ours E={E},g={g}"] = (lambda o=opts: decode_each(model, prompts, o))
        hf_rows.append({"exit_layer": E, "draft_len": g, "identical_tokens": identical})
    hf_times = interleaved_medians(hf_cases, args.repeats)
    for r in hf_rows:
        key = f"E={r['exit_layer']},g={r['draft_len']}"
        r["ours_tokens_per_s"] = n_tok / hf_times[f"ours {key}"]
        r["hf_tokens_per_s"] = n_tok / hf_times[f"hf {key}"]
        r["ratio"] = r["ours_tokens_per_s"] / r["hf_tokens_per_s"]

    # batch 8 vs batch 1 at the best config and autoregressive
    b8 = [prompts[i % len(prompts)] for i in range(8)]
    best_opts = DecodeOptions(exit_layer=best["exit_layer"], draft_len=best["draft_len"], max_new_tokens=args.new_tokens)
    batch_cases = {"self-spec batch 1": lambda: decode_each(model, b8, best_opts),
                   "self-spec batch 8": lambda: generate(model, b8, best_opts),
                   "autoregressive batch 1": lambda: decode_each(model, b8, ar),
                   "autoregressive batch 8": lambda: generate(model, b8, ar)}
    assert generate(model, b8, best_opts)[0] == decode_each(model, b8, ar)[0]
    batch_times = interleaved_medians(batch_cases, args.repeats)

    lines = [f"Checkpoint `{ckpt}` ({L} layers, dim {model.cfg.dim}); {args.prompts} held-out prompts of "
             f"{args.prompt_len} tokens, {args.new_tokens} new tokens each, greedy; median of {args.repeats} "
             "interleaved repeats. Every self-speculative output was checked identical to autoregressive.", "",
             f"Autoregressive: {n_tok / times['autoregressive']:,.0f} tokens/s (batch 1)", "",
             "Measured costs on this machine, one row after a context (ms): "
             + ", ".join(f"M={m + 1}: block {b * 1e3:.2f}, head {h * 1e3:.2f}"
                         for m, (b, h) in enumerate(zip(costs.block, costs.head)))
             + f"; rest of a forward pass {costs.step * 1e3:.2f}.", "",
             "| E | γ | tokens/s | speedup | acceptance α | layer evals/token | predicted speedup | measured/predicted "
             "| predicted with measured costs | measured/predicted with costs |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['exit_layer']} | {r['draft_len']} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f}x | "
                     f"{r['acceptance']:.3f} | {r['layer_evals_per_token']:.2f} | {r['predicted_speedup']:.2f}x | "
                     f"**{r['measured_over_predicted']:.2f}** | {r['predicted_with_costs']:.2f}x | "
                     f"**{r['measured_over_predicted_with_costs']:.2f}** |")
    lines += ["", f"Best: E={best['exit_layer']} γ={best['draft_len']}, {best['speedup']:.2f}x.", "",
              f"## dynamic exit (start E={L // 2}, γ={min(2, max_gamma)}, γ up to {max_gamma})", "",
              "| chooser | tokens/s | speedup | mean E | mean γ | acceptance α |", "|---|---|---|---|---|---|"]
    for name, summary in dynamic_stats.items():
        lines.append(f"| {name} | {n_tok / times[name]:,.0f} | {times['autoregressive'] / times[name]:.2f}x | "
                     f"{summary['mean_exit_layer']:.2f} | {summary['mean_draft_len']:.2f} | "
                     f"{summary['acceptance']:.3f} |")
    lines += ["",
              "## vs transformers generate(assistant_early_exit=E) on the exported weights", "",
              f"Autoregressive, side by side: ours {n_tok / hf_times['ours autoregressive']:,.0f} tokens/s, "
              f"transformers {n_tok / hf_times['hf autoregressive']:,.0f} tokens/s "
              f"({hf_times['hf autoregressive'] / hf_times['ours autoregressive']:.2f}x).", "",
              "| E | γ | identical greedy tokens | ours tokens/s | transformers tokens/s | ours/theirs |",
              "|---|---|---|---|---|---|"]
    for r in hf_rows:
        lines.append(f"| {r['exit_layer']} | {r['draft_len']} | {r['identical_tokens']} | {r['ours_tokens_per_s']:,.0f} | "
                     f"{r['hf_tokens_per_s']:,.0f} | **{r['ratio']:.2f}x** |")
    lines += ["", "## batch 8 vs batch 1 (8 prompts)", "", "| decoder | tokens/s |", "|---|---|"]
    for name, t in batch_times.items():
        lines.append(f"| {name} | {8 * args.new_tokens / t:,.0f} |")
    record("decoding_speedup", "Self-speculative decoding benchmark",
           {"args": vars(args), "rows": rows, "autoregressive_s": times["autoregressive"], "hf": hf_rows,
            "hf_seconds": hf_times, "batch_seconds": batch_times,
            "costs": {"block_s": costs.block, "head_s": costs.head, "step_s": costs.step},
            "dynamic": dynamic_stats}, "\n".join(lines))


if __name__ == "__main__":
    main()
