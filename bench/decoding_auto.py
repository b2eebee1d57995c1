"""strategy auto against the two fixed strategies, side by side in one run, at batch 1 and batch 8.

Per batch size, interleaved, median of repeats, every output checked identical to autoregressive
greedy decoding. Stage 1 times autoregressive decoding and self-speculative decoding at every
(E, γ) of the grid, to find the fixed strategy's best configuration (which no user knows in
advance). Stage 2, a fresh interleaved run: autoregressive, that best configuration, and auto at
its exit (and at the run's eval.json exit, what `python -m pretrain.generate` gives it, when that
differs). The headline: auto over the better of the two fixed strategies in stage 2 (stage 1's
times would flatter the fixed strategy: its best is the luckiest of many noisy medians).

auto measures its costs once per model and batch size (cost_model.decode_costs_at): that
measurement happens in the untimed check pass and is reported on its own, with what it would add to
one call of this workload.

    python -m bench.decoding_auto --checkpoint runs/bench_decode [--exits 2,3,4,5] [--gammas 1,2,3] \
        [--repeats 5] [--duel-repeats 45] [--threads 1] [--clock cpu]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import interleaved_medians, record
from pretrain.checkpoint.inference import resolve_checkpoint
from pretrain.data.dataset import PackedDataset
from pretrain.decoding import DecodeOptions
from pretrain.device import select_device
from pretrain.generate import best_from_eval, decode_all
from pretrain.model_loading import load_model


def check_and_summarise(model, prompts, batch, options, reference) -> tuple[dict, dict]:
    """One untimed pass of every case: outputs checked identical to `reference`; auto measures its
    costs here. Returns ({case: summary}, {case: seconds auto spent measuring costs})."""
    summaries, measuring = {}, {}
    for name, opts in options.items():
        out, stats = decode_all(model, prompts, opts, batch)
        assert out == reference, f"batch {batch} {name}: output differs from autoregressive"
        summaries[name] = stats.summary()
        if stats.auto:
            measuring[name] = sum(a["cost_measurement_s"] for a in stats.auto)
    return summaries, measuring


def timed(model, prompts, batch, options, args, repeats: int) -> dict[str, float]:
    cases = {name: (lambda o=opts: decode_all(model, prompts, o, batch)) for name, opts in options.items()}
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    return interleaved_medians(cases, repeats, clock=clock)


def table(times, summaries, tokens, better) -> list[str]:
    lines = ["| decoder | tokens/s | vs autoregressive | vs the better fixed | acceptance α | auto chose "
             "| auto: drafting rounds / AR steps | auto's predicted speedup of drafting |",
             "|---|---|---|---|---|---|---|---|"]
    for name, seconds in times.items():
        s = summaries[name]
        chose = predicted = share = ""
        if "auto" in s:
            chose = ", ".join(sorted({a["chosen"] for a in s["auto"]}))
            share = (f"{sum(a['drafting_rounds'] for a in s['auto'])} / "
                     f"{sum(a['autoregressive_steps'] for a in s['auto'])}")
            values = [a["predicted_speedup"]["self_speculative"] for a in s["auto"]]
            predicted = ", ".join("-" if v is None else f"{v:.2f}x" for v in values)
        alpha = "" if s["acceptance"] is None else f"{s['acceptance']:.3f}"
        if "auto" in s:   # auto: the exit's agreement it read and judged (its rounds alone are few)
            judged = [(a["acceptance"], a["positions_judged"]) for a in s["auto"] if a["acceptance"] is not None]
            n = sum(j for _, j in judged)
            alpha = f"{sum(a * j for a, j in judged) / n:.3f} (agreement)" if n else ""
        vs_better = f"{times[better] / seconds:.3f}x" if better in times else ""
        lines.append(f"| {name} | {tokens / seconds:,.0f} | {times['autoregressive'] / seconds:.3f}x | {vs_better} "
                     f"| {alpha} | {chose} | {share} | {predicted} |")
    return lines


def batch_size_section(model, prompts, batch, args, eval_exit) -> tuple[list[str], dict]:
    """Stage 1, the grid: every fixed (E, γ) and autoregressive, to find the fixed strategy's best
    configuration. Stage 2, head to head in a fresh interleaved run (no pick-the-luckiest bias):
    autoregressive, that best configuration, and auto at its exit (and at the run's eval.json exit)."""
    new, tokens = args.new_tokens, len(prompts) * args.new_tokens
    exits = [int(e) for e in args.exits.split(",")]
    ar = DecodeOptions(strategy="autoregressive", max_new_tokens=new)
    grid = {"autoregressive": ar}
    grid.update({f"self-spec E={E},g={g}": DecodeOptions(strategy="self_speculative", exit_layer=E, draft_len=g,
                                                         max_new_tokens=new)
                 for E in exits for g in map(int, args.gammas.split(","))})
    reference, _ = decode_all(model, prompts, ar, batch)
    grid_summaries, _ = check_and_summarise(model, prompts, batch, grid, reference)
    grid_times = timed(model, prompts, batch, grid, args, args.repeats)
    best_spec = min((n for n in grid if n != "autoregressive"), key=grid_times.get)
    best = grid[best_spec]

    def auto(E):
        return DecodeOptions(strategy="auto", exit_layer=E, max_new_tokens=new, max_draft_len=args.max_draft_len)

    duel = {"autoregressive": ar, best_spec: best, f"auto E={best.exit_layer}": auto(best.exit_layer)}
    if eval_exit is not None and eval_exit != best.exit_layer:
        duel[f"auto E={eval_exit} (eval.json)"] = auto(eval_exit)
    duel_summaries, measuring = check_and_summarise(model, prompts, batch, duel, reference)
    duel_times = timed(model, prompts, batch, duel, args, args.duel_repeats or args.repeats)
    better = min(("autoregressive", best_spec), key=duel_times.get)
    headline = f"auto E={best.exit_layer}"
    ratio = duel_times[better] / duel_times[headline]
    calls = -(-len(prompts) // batch)
    costs = duel_summaries[headline]["auto"][0]["costs"]
    clock = "CPU time of this process" if args.clock == "cpu" else "wall time"
    lines = [f"## batch {batch}", "",
             f"{len(prompts)} prompts, {batch} at a time ({calls} call(s) of generate per repeat); timed by {clock}, "
             f"{torch.get_num_threads()} thread(s), median of {args.repeats} interleaved repeats (stage 2: "
             f"{args.duel_repeats or args.repeats}).", "",
             "### stage 1: every fixed configuration", ""]
    lines += table(grid_times, grid_summaries, tokens, "autoregressive")
    lines += ["", f"Best fixed self-speculative configuration: {best_spec} "
              f"({grid_times['autoregressive'] / grid_times[best_spec]:.3f}x autoregressive in this stage).", "",
              "### stage 2: head to head (a fresh interleaved run)", ""]
    lines += table(duel_times, duel_summaries, tokens, better)
    lines += ["", f"The better fixed strategy here: {better}. **auto at E={best.exit_layer}: {ratio:.3f}x the better "
              "fixed strategy** (target >= 0.97x).",
              "",
              f"auto's costs at batch {batch}, measured once per process in the untimed check pass "
              f"({measuring[headline]:.2f} s wall; not in the timings above, where one repeat of the workload takes "
              f"{duel_times[headline]:.3f} s): block "
              + ", ".join(f"{b * 1e3:.2f}" for b in costs["block_s"][:4]) + " ms on 1..4 positions, head "
              + ", ".join(f"{h * 1e3:.2f}" for h in costs["head_s"][:4])
              + f" ms, rest of a pass {costs['step_s'] * 1e3:.2f} ms, a round's own work at E={costs['round_extra_exit']} "
              + ", ".join(f"{r * 1e3:+.2f}" for r in costs["round_extra_s"][:4]) + " ms for γ = 1..4."]
    payload = {"batch": batch, "grid_seconds": grid_times, "grid_summaries": grid_summaries,
               "best_self_speculative": best_spec, "duel_seconds": duel_times, "duel_summaries": duel_summaries,
               "better_fixed": better, "auto_case": headline, "auto_over_better_fixed": ratio,
               "auto_cost_measurement_s": measuring}
    return lines, payload


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="runs/bench_decode")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts decoded one by one at batch 1")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--exits", default="2,3,4,5")
    ap.add_argument("--gammas", default="1,2,3")
    ap.add_argument("--max-draft-len", type=int, default=8, help="γ range auto searches")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--duel-repeats", type=int, help="repeats of stage 2, the head to head (default: --repeats): "
                    "its few cases afford more, and the headline ratio needs them on a noisy machine")
    ap.add_argument("--batch-sizes", default="1,8", help="1 (prompts one by one) and/or 8")
    ap.add_argument("--name", default="decoding_auto", help="bench/results/<name>.md and .json")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (steadier on a shared machine, with --threads 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    ckpt = resolve_checkpoint(args.checkpoint)
    model, _ = load_model(ckpt, device=select_device(args.device))
    L = model.cfg.n_layers
    eval_exit = best_from_eval(args.checkpoint, L).get("exit_layer")
    from omegaconf import OmegaConf
    val = PackedDataset(OmegaConf.load(ckpt / "config.yaml").data.dir, "val")
    prompts = [val[i][:args.prompt_len].tolist() for i in range(args.prompts)]
    lines = [f"Checkpoint `{ckpt}` ({L} layers, dim {model.cfg.dim}); held-out prompts of {args.prompt_len} "
             f"tokens, {args.new_tokens} new tokens each, greedy. Every output was checked identical to "
             "autoregressive decoding.", ""]
    payload = {"args": vars(args), "checkpoint": str(ckpt), "eval_exit": eval_exit, "sections": []}
    sizes = {int(b) for b in args.batch_sizes.split(",")}
    for batch, batch_prompts in ((b, ps) for b, ps in ((1, prompts[:args.batch1_prompts]), (8, prompts)) if b in sizes):
        section, data = batch_size_section(model, batch_prompts, batch, args, eval_exit)
        lines += section + [""]
        payload["sections"].append(data)
    lines += ["Summary: " + "; ".join(f"batch {d['batch']}: auto {d['auto_over_better_fixed']:.3f}x the better fixed "
                                      f"strategy ({d['better_fixed']})" for d in payload["sections"]) + "."]
    record(args.name, "strategy auto vs the fixed decoding strategies", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
