"""Downstream accuracy per exit at CPU scale: the next-line tasks built from the held-out split of
the prepared stdlib corpus (pretrain/downstream/next_line_task.py), on models of the ablation.

    python -m bench.downstream_next_line --runs baseline=runs/ablation/baseline,layerskip=runs/ablation/layerskip

Per run, every exit on `stdlib_next_line` (true next line vs three lines of the same file) and
`stdlib_next_line_shuffle` (true next line vs its words reordered), accuracy ± the harness's stderr,
and the difference between the first two runs per exit with its stderr sqrt(s1² + s2²). Then the
generation variant (`stdlib_next_line_gen`: the next line, greedy, chrF and exact match) with autoregressive,
early-exit and self-speculative decoding at each run's best (E, γ) from its eval.json: metric,
acceptance, tokens/s and speedup over autoregressive decoding of the same prompts.
Writes bench/results/downstream_next_line.md and .json."""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from pathlib import Path

import torch

from bench.common import record
from pretrain.device import select_device
from pretrain.downstream.next_line_task import build
from pretrain.downstream.report import format_strategy_table
from pretrain.downstream.source import ModelSource
from pretrain.downstream.strategies import parse_strategy
from pretrain.downstream.sweep import run_sweep, strategy_sweep, task_manager

MC_TASKS = ("stdlib_next_line", "stdlib_next_line_shuffle")


def ensure_tasks(args) -> list[str]:
    """The two task directories under --tasks-dir, built when missing."""
    dirs = []
    for name, distractors, records in (("stdlib_next_line", "file", args.records),
                                       ("stdlib_next_line_shuffle", "shuffle", args.shuffle_records)):
        out = Path(args.tasks_dir) / name
        if not (out / f"{name}.yaml").is_file():
            build(args.data_dir, str(out), records, args.context_lines, args.seed, name, False, distractors)
        dirs.append(str(out))
    return dirs


def best_config(run: str) -> tuple[int, int] | None:
    """(E, γ) of the run's evaluation (eval.json "best"), if any."""
    try:
        best = json.loads((Path(run) / "eval.json").read_text())["best"]
        return int(best["exit_layer"]), int(best["draft_len"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def generation_medians(source, strategies, manager, args) -> dict:
    """The strategy sweep on the generation task `--repeats` times (each repeat decodes with every
    strategy in turn, so machine-load drift hits them alike): the first repeat's rows with the median
    tokens/s and the median of the per-repeat speedups. Batch 1: rows of a batch wait for each
    other's drafts, which would hide the per-row speedup."""
    repeats = [strategy_sweep(source, ["stdlib_next_line_gen"], strategies, manager,
                              {"stdlib_next_line_gen": {"metric": "chrf"}}, args.gen_limit, 1, False)
               for _ in range(args.repeats)]
    rows = repeats[0]
    for label, row in rows.items():
        assert all(r[label]["tasks"] == row["tasks"] for r in repeats), "greedy decoding changed between repeats"
        raw = [{"tokens_per_s": r[label]["tokens_per_s"], "speedup": r[label]["speedup"]} for r in repeats]
        row["repeats"] = raw
        row["tokens_per_s"] = statistics.median(x["tokens_per_s"] for x in raw)
        row["speedup"] = statistics.median(x["speedup"] for x in raw)
    return rows


def _cell(m: dict) -> str:
    return f"{m['value']:.3f} ± {m['stderr']:.3f}"


def exit_table(results: dict[str, dict], task: str) -> str:
    names = list(results)
    head = "| exit | " + " | ".join(names) + (f" | {names[1]} − {names[0]} (± stderr) |" if len(names) > 1 else " |")
    lines = [head, "|" + "---|" * (len(names) + 1 + (len(names) > 1))]
    for exit_layer in sorted(results[names[0]]["exits"], key=int):
        cells = [results[n]["exits"][exit_layer][task] for n in names]
        row = f"| {exit_layer} | " + " | ".join(_cell(c) for c in cells)
        if len(names) > 1:
            diff = cells[1]["value"] - cells[0]["value"]
            sigma = math.hypot(cells[0]["stderr"], cells[1]["stderr"])
            row += f" | {diff:+.3f} ± {sigma:.3f} ({diff / sigma:+.1f}σ)" if sigma else f" | {diff:+.3f}"
        lines.append(row + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="baseline=runs/ablation/baseline,layerskip=runs/ablation/layerskip",
                    help="name=run_dir,... (the first two are compared)")
    ap.add_argument("--data-dir", default="data/demo")
    ap.add_argument("--tasks-dir", default="data/tasks")
    ap.add_argument("--records", type=int, default=1000)
    ap.add_argument("--shuffle-records", type=int, default=600)
    ap.add_argument("--context-lines", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gen-limit", type=int, default=60, help="prompts of the generation task per strategy")
    ap.add_argument("--repeats", type=int, default=3, help="generation timings: median of this many")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = dict(item.split("=", 1) for item in args.runs.split(","))
    dirs = ensure_tasks(args)
    manager = task_manager([*MC_TASKS, "stdlib_next_line_gen"], dirs)
    results: dict[str, dict] = {}
    for name, run in runs.items():
        source = ModelSource.open(run, select_device("cpu"))
        L = source.num_layers
        results[name] = run_sweep(source, list(MC_TASKS), list(range(1, L + 1)), manager=manager,
                                  batch_size=args.batch_size)
        best = best_config(run) or (max(1, L // 4), 4)
        strategies = [parse_strategy(s, L) for s in (f"early_exit:{best[0]}", f"self_speculative:{best[0]}:{best[1]}")]
        results[name]["generation"] = generation_medians(source, strategies, manager, args)
    samples = {t: results[next(iter(runs))]["tasks"][t]["samples"] for t in MC_TASKS}
    parts = [f"Runs: {', '.join(f'{n} = `{r}`' for n, r in runs.items())}. Tasks built from the held-out split of "
             f"`{args.data_dir}` by `pretrain.downstream.next_line_task` ({args.context_lines} lines of context; "
             f"documents per task: {samples}). Accuracy ± the harness's stderr (sample std / √n); chance is 0.25. "
             "The machine was shared with six other engineers' jobs (load average 5-14): tokens/s are noisy.",
             f"Models (default --runs): the ablation's baseline and LayerSkip variants (bench/results/ablation.md: 8 "
             "layers, dim 64, 600 steps from scratch on data/demo, seed 0), reproduced by `python -m bench.ablation "
             "--variants baseline,layerskip --runs-dir runs/ablation --results-dir /tmp/ablation_pair --name "
             "ablation_pair --threads 1` (their final held-out losses equal the ablation's: last exit 4.866 and "
             "4.802). Generation: each run's best (E, γ) from its eval.json."]
    for task in MC_TASKS:
        parts.append(f"## {task}\n\n{exit_table(results, task)}")
    for name in runs:
        parts.append(f"## {name}: stdlib_next_line_gen ({args.gen_limit} prompts, greedy, batch 1, "
                     f"tokens/s and speedup: medians of {args.repeats} interleaved repeats)\n\n```\n"
                     f"{format_strategy_table(results[name]['generation'])}\n```")
    record("downstream_next_line", "Downstream accuracy per exit at CPU scale (next-line tasks)",
           {"runs": runs, "results": results}, "\n\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
