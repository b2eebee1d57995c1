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
- batch 8: self-speculative (per exit, per γ, and the per-row adaptive draft) against batched
  autoregressive decoding of the same 8 prompts, outputs checked identical; with --baseline-ref, the
  decoder of that git commit (pretrain/decoding checked out into a temporary directory) timed in the
  same run, interleaved, at batch 1 and batch 8, so "no slower than before" is measured side by side.

    python -m bench.decoding_speedup --checkpoint runs/bench_decode [--prompts 8] [--new-tokens 64] \
        [--device cuda --dtype bfloat16] [--compile reduce-overhead] [--baseline-ref main] [--sections batch]

--sections batch runs only the batch-8 comparison and writes bench/results/decoding_batch.{md,json}.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import extract_revision, interleaved_medians, record
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


def load_baseline_decoder(ref: str, into: str):
    """pretrain.decoding as of git commit `ref`, importable beside today's: extracted into `into` as
    package `baseline_decoding` (its imports of itself renamed). Returns the package."""
    extract_revision(ref, ["pretrain/decoding"], into)
    package = Path(into) / "baseline_decoding"
    (Path(into) / "pretrain" / "decoding").rename(package)
    for path in package.glob("*.py"):
        path.write_text(path.read_text().replace("pretrain.decoding", "baseline_decoding"))
    sys.path.insert(0, into)
    return importlib.import_module("baseline_decoding")


def block_work(model, decode) -> tuple[DecodeStats, int]:
    """(stats of decode(), blocks x rows the model really ran after the prefill, counted at run_layers)."""
    rows_blocks = []
    run_layers = model.run_layers

    def counted(h, *, start=0, stop=None, **kwargs):
        rows_blocks.append(h.shape[0] * ((model.cfg.n_layers if stop is None else stop) - start))
        return run_layers(h, start=start, stop=stop, **kwargs)

    model.run_layers = counted
    try:
        stats = decode()
    finally:
        del model.run_layers
    return stats, sum(rows_blocks[1:])


def batch_section(model, prompts, args, baseline) -> tuple[list[str], dict]:
    """Batch 8 self-speculative vs batch 8 autoregressive (and, with a baseline decoder, old vs new
    at batch 1 and 8): (markdown lines, payload)."""
    L = model.cfg.n_layers
    b8 = [prompts[i % len(prompts)] for i in range(8)]
    n_tok = 8 * args.new_tokens
    ar = DecodeOptions(strategy="autoregressive", max_new_tokens=args.new_tokens)
    reference, ar_stats = generate(model, b8, ar)
    configs = {f"E={E},g={g}": DecodeOptions(strategy="self_speculative", exit_layer=E, draft_len=g,
                                             max_new_tokens=args.new_tokens)
               for E in map(int, args.exits.split(",")) for g in map(int, args.batch_gammas.split(","))}
    configs.update({f"E={E},adaptive g<={g}": DecodeOptions(strategy="self_speculative", exit_layer=E, draft_len=g,
                                                            adaptive_draft=True, max_new_tokens=args.new_tokens)
                    for E in map(int, args.exits.split(",")) for g in (4,)})
    configs["dynamic, per-row γ"] = DecodeOptions(strategy="self_speculative", exit_layer=L // 2, draft_len=2,
                                                  dynamic_exit=True, max_draft_len=max(map(int, args.batch_gammas.split(","))),
                                                  max_new_tokens=args.new_tokens)
    cases, summaries = {"autoregressive": lambda: generate(model, b8, ar)}, {"autoregressive": ar_stats.summary()}
    for name, opts in configs.items():
        out, st = generate(model, b8, opts)
        assert out == reference, f"batch 8 {name}: output differs from autoregressive"
        summaries[name] = st.summary()
        cases[name] = (lambda o=opts: generate(model, b8, o))
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = interleaved_medians(cases, args.repeats, clock=clock)
    ratios = {name: times["autoregressive"] / t for name, t in times.items()}
    best = max(configs, key=lambda name: ratios[name])
    lines = ["## batch 8: self-speculative vs batched autoregressive (8 prompts, rows advance independently)", "",
             f"Timed by {'this process' + chr(39) + 's CPU time' if args.clock == 'cpu' else 'wall time'}, "
             f"{torch.get_num_threads()} thread(s).", "",
             f"Autoregressive batch 8: {n_tok / times['autoregressive']:,.0f} tokens/s.", "",
             "| decoder | tokens/s | vs autoregressive batch 8 | acceptance α | tokens/round/row "
             "| layer evals/token (all computed rows) | mean draft len |", "|---|---|---|---|---|---|---|"]
    for name, t in times.items():
        s = summaries[name]
        alpha = "" if s["acceptance"] is None else f"{s['acceptance']:.3f}"
        gamma = "" if s["mean_draft_len"] is None else f"{s['mean_draft_len']:.2f}"
        lines.append(f"| {name} | {n_tok / t:,.0f} | **{ratios[name]:.2f}x** | {alpha} | "
                     f"{s['tokens_per_round']:.2f} | {s['layer_evals_per_token']:.2f} | {gamma} |")
    lines += ["", f"Best at batch 8: {best}, {ratios[best]:.2f}x batched autoregressive decoding."]
    payload = {"batch8_seconds": times, "batch8_ratio": ratios, "batch8_summaries": summaries, "batch8_best": best}
    if baseline is not None:
        old_ar = baseline.DecodeOptions(strategy="autoregressive", max_new_tokens=args.new_tokens)
        bo = configs[best]
        old_best = baseline.DecodeOptions(strategy="self_speculative", exit_layer=bo.exit_layer, draft_len=bo.draft_len,
                                          adaptive_draft=bo.adaptive_draft, max_new_tokens=args.new_tokens)
        b1 = b8[:args.batch1_prompts]

        def each(gen, opts):
            for p in b1:
                gen(model, [p], opts)

        side = {"new self-spec batch 1": lambda: each(generate, bo),
                "old self-spec batch 1": lambda: each(baseline.generate, old_best),
                "new autoregressive batch 1": lambda: each(generate, ar),
                "old autoregressive batch 1": lambda: each(baseline.generate, old_ar),
                "new self-spec batch 8": lambda: generate(model, b8, bo),
                "old self-spec batch 8": lambda: baseline.generate(model, b8, old_best),
                "new autoregressive batch 8": lambda: generate(model, b8, ar),
                "old autoregressive batch 8": lambda: baseline.generate(model, b8, old_ar)}
        assert baseline.generate(model, b8, old_best)[0] == reference
        old_stats, old_computed = block_work(model, lambda: baseline.generate(model, b8, old_best)[1])
        new_stats, new_computed = block_work(model, lambda: generate(model, b8, bo)[1])
        side_times = interleaved_medians(side, args.repeats, clock=clock)
        tokens = {k: (len(b1) if "batch 1" in k else 8) * args.new_tokens for k in side}
        lines += ["", f"### old decoder ({args.baseline_ref}) vs new, side by side at {best}", "",
                  "| case | old tokens/s | new tokens/s | new/old |", "|---|---|---|---|"]
        for case in ("self-spec batch 1", "autoregressive batch 1", "self-spec batch 8", "autoregressive batch 8"):
            old, new = side_times[f"old {case}"], side_times[f"new {case}"]
            lines.append(f"| {case} | {tokens['old ' + case] / old:,.0f} | {tokens['new ' + case] / new:,.0f} | "
                         f"**{old / new:.2f}x** |")
        lines += ["", "Self-speculative batch 8 over autoregressive batch 8 in this side-by-side run: old "
                  f"{side_times['old autoregressive batch 8'] / side_times['old self-spec batch 8']:.2f}x, new "
                  f"{side_times['new autoregressive batch 8'] / side_times['new self-spec batch 8']:.2f}x. "
                  "Block evaluations per decoded token at batch 8 (one block on one row), reported by the stats "
                  "/ counted at the model's run_layers: old decoder "
                  f"{old_stats.layer_evals / old_stats.decoded:.2f} / {old_computed / old_stats.decoded:.2f} "
                  f"(finished rows ride along uncounted), new {new_stats.layer_evals / new_stats.decoded:.2f} / "
                  f"{new_computed / new_stats.decoded:.2f} (finished rows leave the batch; every computed row counted)."]
        payload.update({"baseline_ref": args.baseline_ref, "side_by_side_seconds": side_times,
                        "batch1_prompts": len(b1)})
    return lines, payload


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
    ap.add_argument("--batch-gammas", default="1,2,3", help="γ tried at batch 8")
    ap.add_argument("--baseline-ref", help="git commit whose decoder is timed side by side (e.g. main)")
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts of the side-by-side batch 1 timing")
    ap.add_argument("--sections", choices=("all", "batch"), default="all")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="batch section timed by wall time or by this process's CPU time (steadier on a shared "
                         "machine, with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
    with tempfile.TemporaryDirectory() as tmp:
        baseline = load_baseline_decoder(args.baseline_ref, tmp) if args.baseline_ref else None
        batch_lines, batch_payload = batch_section(model, prompts, args, baseline)
    if args.sections == "batch":
        record("decoding_batch", "Batched self-speculative decoding benchmark",
               {"args": vars(args), **batch_payload},
               f"Checkpoint `{ckpt}` ({L} layers, dim {model.cfg.dim}); prompts of {args.prompt_len} held-out "
               f"tokens, {args.new_tokens} new tokens each, greedy; median of {args.repeats} interleaved repeats. "
               "Every self-speculative output was checked identical to autoregressive.\n\n"
               + "\n".join(batch_lines))
        return
    ar = DecodeOptions(strategy="autoregressive", max_new_tokens=args.new_tokens)
    reference, _ = decode_each(model, prompts, ar)

    configs = [(E, g) for E in map(int, args.exits.split(",")) for g in map(int, args.gammas.split(","))]
    cases = {"autoregressive": lambda: decode_each(model, prompts, ar)}
    stats = {}
    for E, g in configs:
        opts = DecodeOptions(strategy="self_speculative", exit_layer=E, draft_len=g, max_new_tokens=args.new_tokens)
        outs, stats[(E, g)] = decode_each(model, prompts, opts)
        assert outs == reference, f"E={E} γ={g}: self-speculative output differs from autoregressive"
        cases[f"E={E},g={g}"] = (lambda o=opts: decode_each(model, prompts, o))
    max_gamma = max(g for _, g in configs)
    costs = measure_decode_costs(model, max_gamma + 1, context=args.prompt_len + args.new_tokens // 2)
    dynamic = {name: DecodeOptions(strategy="self_speculative", exit_layer=L // 2, draft_len=min(2, max_gamma),
                                   max_draft_len=max_gamma, dynamic_exit=True, costs=c, max_new_tokens=args.new_tokens)
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
        opts = DecodeOptions(strategy="self_speculative", exit_layer=E, draft_len=g, max_new_tokens=args.new_tokens)
        hf_cases[f"hf E={E},g={g}"] = (lambda E=E, g=g: hf_generate_each(hf, prompts, args.new_tokens, E, g))
        hf_cases[f"ours E={E},g={g}"] = (lambda o=opts: decode_each(model, prompts, o))
        hf_rows.append({"exit_layer": E, "draft_len": g, "identical_tokens": identical})
    hf_times = interleaved_medians(hf_cases, args.repeats)
    for r in hf_rows:
        key = f"E={r['exit_layer']},g={r['draft_len']}"
        r["ours_tokens_per_s"] = n_tok / hf_times[f"ours {key}"]
        r["hf_tokens_per_s"] = n_tok / hf_times[f"hf {key}"]
        r["ratio"] = r["ours_tokens_per_s"] / r["hf_tokens_per_s"]

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
    lines += [""] + batch_lines
    record("decoding_speedup", "Self-speculative decoding benchmark",
           {"args": vars(args), "rows": rows, "autoregressive_s": times["autoregressive"], "hf": hf_rows,
            "hf_seconds": hf_times, **batch_payload,
            "costs": {"block_s": costs.block, "head_s": costs.head, "step_s": costs.step},
            "dynamic": dynamic_stats}, "\n".join(lines))


if __name__ == "__main__":
    main()
