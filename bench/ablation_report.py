"""Figures and the results file of bench/ablation.py (tables per exit and per variant)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from bench.common import _git_rev, machine
from pretrain.evaluation.plots import (agreement_figure, dropout_heatmap_figure, exit_loss_figure,
                                       training_curves_figure)
from schedules.layer_dropout import layer_dropout_rates

LABELS = {"baseline": "baseline (no LayerSkip)", "layer_dropout": "layer dropout only",
          "early_exit": "early-exit loss only", "layerskip": "LayerSkip (both)",
          "continual_plain": "continual: plain", "continual_layerskip": "continual: LayerSkip"}


def dropout_schedules(args, variants) -> dict[str, list[list[float]]]:
    """p(l, t) of the runs with layer dropout, straight from schedules.layer_dropout."""
    from bench.ablation import continual_step_count

    L, panels = args.layers, {}
    if "layerskip" in variants or "layer_dropout" in variants:
        panels[f"from scratch: S(t)=exp, D(l)=exp, p_max={args.p_max}"] = [
            layer_dropout_rates(t, num_layers=L, total_steps=args.steps, p_max=args.p_max, depth="exp", time="exp")
            for t in range(args.steps)]
    if "continual_layerskip" in variants:
        steps = continual_step_count(args)
        panels[f"continual: S(t)=1, D(l)=exp, p_max={args.p_max}"] = [
            layer_dropout_rates(t, num_layers=L, total_steps=steps, p_max=args.p_max, depth="exp", time="constant")
            for t in range(steps)]
    return panels


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def write_figures(args, results: dict[str, dict], fig_dir: Path) -> dict[str, Path]:
    named = {LABELS[v]: r for v, r in results.items()}
    figures = {"exit_loss": exit_loss_figure(named, fig_dir / "exit_loss.png",
                                             title=f"held-out loss per exit ({args.layers}-layer model, "
                                                   f"{args.steps} steps from scratch)"),
               "agreement": agreement_figure(named, fig_dir / "agreement.png")}
    for variant in ("layerskip", "continual_layerskip"):
        if variant in results:
            figures[f"curves_{variant}"] = training_curves_figure(
                _records(Path(args.runs_dir) / variant), fig_dir / f"training_curves_{variant}.png",
                title=f"training loss per exit: {LABELS[variant]}")
    panels = dropout_schedules(args, results)
    if panels:
        figures["dropout"] = dropout_heatmap_figure(panels, fig_dir / "dropout_schedule.png")
    return figures


def _per_exit_table(results: dict[str, dict], cell) -> list[str]:
    variants = list(results)
    exits = sorted(int(l) for l in next(iter(results.values()))["exits"])
    lines = ["| exit | " + " | ".join(LABELS[v] for v in variants) + " |",
             "|---" * (len(variants) + 1) + "|"]
    for layer in exits:
        lines.append(f"| {layer} | " + " | ".join(cell(results[v], layer) for v in variants) + " |")
    return lines


def _best_gamma(result: dict, layer: int) -> str:
    row = result["speedup"].get(layer)
    if not row:
        return "(last)"
    gamma, speedup = max(row.items(), key=lambda kv: kv[1])
    return f"γ={gamma}: {speedup:.2f}x"


def findings(results: dict[str, dict], L: int) -> list[str]:
    """Plain statements computed from the numbers (each comparison says which way it went)."""
    out = []

    def early_mean(v: str) -> float:
        return sum(results[v]["exits"][l]["loss"] for l in range(1, L)) / (L - 1)

    def cmp(a: float, b: float) -> str:
        return "lower" if a < b else "higher"

    pairs = [("layerskip", "baseline"), ("early_exit", "baseline"), ("layer_dropout", "baseline"),
             ("continual_layerskip", "continual_plain")]
    for v, ref in pairs:
        if v in results and ref in results:
            a, b = early_mean(v), early_mean(ref)
            la, lb = results[v]["exits"][L]["loss"], results[ref]["exits"][L]["loss"]
            sa, sb = results[v]["best"]["speedup"], results[ref]["best"]["speedup"]
            out.append(f"- {LABELS[v]} vs {LABELS[ref]}: mean held-out loss of exits 1..{L - 1} {a:.3f} vs {b:.3f} "
                       f"({cmp(a, b)}); last exit {la:.3f} vs {lb:.3f} ({la - lb:+.3f}, {cmp(la, lb)}); best "
                       f"expected speedup {sa:.2f}x vs {sb:.2f}x; measured {results[v]['decoding']['speedup']:.2f}x vs "
                       f"{results[ref]['decoding']['speedup']:.2f}x.")
    if "layer_dropout" in results and "baseline" in results:
        t, tb = results["layer_dropout"]["training"], results["baseline"]["training"]
        out.append(f"- Layer dropout ran {t['blocks_run_fraction']:.1%} of the block work; training tokens/s "
                   f"{t['tokens_per_s']:,.0f} vs {tb['tokens_per_s']:,.0f} without it ({t['tokens_per_s'] / tb['tokens_per_s']:.2f}x; "
                   "runs one after another, as noisy as the machine's load).")
    return out


def write_report(args, results: dict[str, dict], figures: dict[str, Path], out: Path, wall_s: float,
                 command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    L = args.layers
    rel = {k: p.relative_to(out).as_posix() for k, p in figures.items()}
    base_loss = results["baseline"]["exits"][L]["loss"] if "baseline" in results else None
    lines = ["# LayerSkip ablation at CPU scale", "",
             f"- command: `{command}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (commit {_git_rev()}); "
             f"whole ablation {wall_s / 60:.1f} min", "",
             f"Model: {L} layers, dim {args.dim}, {args.heads} heads ({args.kv_heads} KV), FFN {args.ffn_dim}; "
             f"data `{args.data_dir}` (stdlib corpus); {args.steps} steps from scratch at batch {args.batch_size}, "
             f"lr {args.lr}, seed 0 for every from-scratch variant; p_max {args.p_max}. Continual variants start "
             f"from the baseline's final checkpoint and train {round(args.steps * args.continual_fraction)} more "
             f"steps at lr {args.continual_lr} (same data order for both). Held-out: {args.eval_batches} batches "
             f"of {args.eval_batch_size} validation sequences. Decoding: {args.prompts} held-out prompts of "
             f"{args.prompt_len} tokens, {args.new_tokens} new tokens, greedy, batch 1, median of "
             f"{args.repeats} interleaved repeats.", "",
             f"![held-out loss per exit]({rel['exit_loss']})", "",
             *([Path(args.notes).read_text().strip(), ""] if args.notes else []),
             "## Findings (computed from the tables below)", "", *findings(results, L), "",
             "## Held-out loss per exit (nats/token)", "",
             *_per_exit_table(results, lambda r, l: f"{r['exits'][l]['loss']:.3f}"), "",
             "## Perplexity per exit", "",
             *_per_exit_table(results, lambda r, l: f"{r['exits'][l]['perplexity']:,.1f}"), "",
             "## Top-1 agreement with the last layer per exit", "",
             f"![agreement per exit]({rel['agreement']})", "",
             *_per_exit_table(results, lambda r, l: f"{r['exits'][l]['agreement']:.3f}"), "",
             "## Expected self-speculative speedup per exit (best γ ≤ "
             f"{args.max_draft_len}; (1-α^(γ+1))/((1-α)(1+γE/L)), α = agreement)", "",
             *_per_exit_table(results, _best_gamma), "",
             "## Per variant: last layer, best (E, γ), measured decoding, training", "",
             "| variant | last-exit loss | Δ vs baseline | best E, γ | predicted speedup | measured acceptance "
             "| layer evals/token | self-spec tokens/s | autoregressive tokens/s | measured speedup | identical "
             "| train tokens/s | block work run | train step time s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in results.items():
        d, t, loss = r["decoding"], r["training"], r["exits"][L]["loss"]
        delta = f"{loss - base_loss:+.3f}" if base_loss is not None else "-"
        lines.append(f"| {LABELS[v]} | {loss:.3f} | {delta} | E={d['exit_layer']}, γ={d['draft_len']} | "
                     f"{r['best']['speedup']:.2f}x | {d['acceptance']:.3f} | {d['layer_evals_per_token']:.2f} | "
                     f"{d['tokens_per_s']:,.0f} | {d['autoregressive_tokens_per_s']:,.0f} | {d['speedup']:.2f}x | "
                     f"{d['identical_tokens']} | {t['tokens_per_s']:,.0f} | {t['blocks_run_fraction']:.3f} | "
                     f"{t['step_time_s']:.0f} |")
    lines += ["", "Δ vs baseline: the last layer's held-out loss minus the baseline's (positive = LayerSkip "
              "costs the last layer). Training tokens/s: median over logged steps after the first 10% "
              "(noisy on a shared machine; 'block work run' is the hardware-independent share of block rows "
              "computed, 1 - the layer-dropout saving; train step time: the sum of the timed steps, without data loading and "
              "logging).", ""]
    for key, caption in (("curves_layerskip", "training loss per exit, LayerSkip from scratch"),
                         ("curves_continual_layerskip", "training loss per exit, continual LayerSkip "
                                                        "(gradual curriculum)"),
                         ("dropout", "layer-dropout rate p(l, t)")):
        if key in rel:
            lines += [f"![{caption}]({rel[key]})", ""]
    md = out / f"{args.name}.md"
    md.write_text("\n".join(lines))
    (out / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "machine": machine(), "args": vars(args), "wall_s": wall_s,
         "results": results}, indent=2, default=str))
    return md
