"""The per-exit evaluation as W&B media: a wandb.Table (one row per exit) and the per-exit figure.

Called by MetricsLogger.log for every record of kind "eval" while a W&B run is open. The record
is what training logs for an evaluation: {"step", "exit_<l>": {"loss", "perplexity", "agreement"},
"best": {...}, "decoding": {...}, "sources": {...}}. The figure is also kept as <run_dir>/plots/per_exit_step_<N>.png;
without matplotlib (the optional `plot` extra) only the table is logged.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pretrain.evaluation.early_exit_eval import speedup_table

TABLE_COLUMNS = ["exit", "loss", "perplexity", "agreement", "best_draft_len", "expected_speedup"]
MAX_DRAFT_LEN = 8  # the γ range of the expected-speedup column (eval.max_draft_len's default)


def eval_result_from_record(record: Mapping[str, Any]) -> dict:
    """{"exits": {l: stats}, "best": ...} (the shape of eval.json) from an eval record."""
    exits = {int(key[len("exit_"):]): dict(value) for key, value in record.items()
             if key.startswith("exit_") and key[len("exit_"):].isdigit() and isinstance(value, Mapping)}
    result: dict = {"exits": dict(sorted(exits.items()))}
    if exits:  # the expected speedup per (E, γ), as evaluation computes it, for the figure's speedup series
        L = max(exits)
        result["speedup"] = speedup_table({l: s["agreement"] for l, s in exits.items() if l < L}, L, MAX_DRAFT_LEN)
    if record.get("best"):
        result["best"] = dict(record["best"])
    if record.get("sources"):  # mixed sources: per-source curves in the figure
        result["sources"] = {name: dict(stats) for name, stats in record["sources"].items()}
    return result


def eval_table_rows(result: Mapping) -> list[list]:
    """One row per exit: loss, perplexity, agreement and, for exits below the last, the γ ≤ 8 with
    the highest expected speedup (1-α^(γ+1))/((1-α)(1+γE/L)) at α = that exit's agreement."""
    exits = result["exits"]
    L = max(exits)
    speedups = speedup_table({l: s["agreement"] for l, s in exits.items() if l < L}, L, MAX_DRAFT_LEN)
    rows = []
    for layer, s in exits.items():
        gamma, speedup = max(speedups[layer].items(), key=lambda kv: kv[1]) if layer in speedups else (0, 1.0)
        rows.append([layer, s["loss"], s["perplexity"], s["agreement"], gamma, speedup])
    return rows


def log_eval_media(wandb_run, record: Mapping[str, Any], run_dir: Path) -> None:
    """Log the per-exit table and figure of one evaluation record at its step."""
    import wandb

    result = eval_result_from_record(record)
    if not result["exits"]:
        return
    step = record.get("step")
    payload: dict[str, Any] = {"eval/per_exit": wandb.Table(columns=TABLE_COLUMNS, data=eval_table_rows(result))}
    try:
        from pretrain.evaluation.plots import per_exit_figure

        png = per_exit_figure(result, Path(run_dir) / "plots" / f"per_exit_step_{step}.png",
                              title=f"{Path(run_dir).name}, step {step}")
        payload["eval/per_exit_figure"] = wandb.Image(str(png))
    except RuntimeError:  # matplotlib not installed: the table alone
        pass
    wandb_run.log(payload, step=step)
