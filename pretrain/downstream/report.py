"""The downstream result where a researcher reads it: a console table (exit × task, value ± the
harness's stderr; per strategy: metric, acceptance, tokens/s, speedup), eval.json under its own key
(the file's other keys kept; atomic), a W&B table, and a figure (accuracy per exit, one line per
task; matplotlib from the `plot` extra)."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from pretrain.files import write_atomic
from pretrain.metrics.logger import RUN_ID_FILE, wandb_mode

EVAL_KEY = "downstream"


def _cell(m: Mapping | None) -> str:
    if not m or m.get("value") is None:
        return "-"
    stderr = m.get("stderr")
    return f"{m['value']:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def format_exit_table(result: Mapping) -> str:
    """One row per exit, one column per task: value ± stderr of the task's main metric."""
    tasks = list(result["tasks"])
    names = [f"{t} ({result['tasks'][t]['metric']})" for t in tasks]
    widths = [max(len(n), 15) for n in names]
    lines = ["exit  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for exit_layer, row in sorted(result["exits"].items(), key=lambda kv: int(kv[0])):
        label = f"{exit_layer}" + (" (last)" if int(exit_layer) == result.get("num_layers") else "")
        lines.append(f"{label:<6}" + "  ".join(_cell(row.get(t)).rjust(w) for t, w in zip(tasks, widths)))
    return "\n".join(lines)


def format_strategy_table(strategies: Mapping) -> str:
    """One row per strategy: each generation task's metric, acceptance, layer evaluations per generated
    token (the hardware-independent cost; autoregressive: L), tokens/s, speedup."""
    tasks = list(next(iter(strategies.values()))["tasks"]) if strategies else []
    head = (f"{'strategy':<24}" + "".join(f"{t:>24}" for t in tasks) +
            f"{'acceptance':>11}{'layers/token':>13}{'tokens/s':>10}{'speedup':>9}")
    lines = [head]
    for label, row in strategies.items():
        acc = "-" if row["acceptance"] is None else f"{row['acceptance']:.3f}"
        tps = "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.1f}"
        speedup = "-" if row["speedup"] is None else f"{row['speedup']:.2f}x"
        layers = "-" if row.get("layer_evals_per_token") is None else f"{row['layer_evals_per_token']:.2f}"
        lines.append(f"{label:<24}" + "".join(f"{_cell(row['tasks'][t]):>24}" for t in tasks) +
                     f"{acc:>11}{layers:>13}{tps:>10}{speedup:>9}")
    return "\n".join(lines)


def format_report(result: Mapping) -> str:
    text = format_exit_table(result)
    if result.get("strategies"):
        text += "\n\ngeneration per decoding strategy (same prompts; speedup over autoregressive):\n"
        text += format_strategy_table(result["strategies"])
    return text


def merge_into_eval_json(path: str | Path, result: Mapping, key: str = EVAL_KEY) -> Path:
    """Set `key` of the JSON object in `path` to `result`, keeping its other keys; written to a
    temporary file then renamed. A file that is not a JSON object is refused, never replaced."""
    path = Path(path)
    current = {}
    if path.exists():
        try:
            current = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"{path} is not JSON; not replacing it (give --out another file)") from None
        if not isinstance(current, dict):
            raise ValueError(f"{path} holds no JSON object; not replacing it (give --out another file)")
    current[key] = result
    return write_atomic(path, json.dumps(current, indent=2))


def with_earlier_downstream(path: str | Path, result: dict, key: str = EVAL_KEY) -> dict:
    """`result` plus the downstream results an earlier `pretrain.eval --tasks` wrote into the
    eval.json at `path` (they carry their own checkpoint), when `result` has none of its own: a
    per-exit evaluation written over that file must not drop them."""
    try:
        earlier = json.loads(Path(path).read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return result
    return result if earlier is None or key in result else {**result, key: earlier}


def table_rows(result: Mapping) -> list[list]:
    """Rows of the W&B table: exit, task, metric, value, stderr."""
    return [[int(e), task, m["metric"], m["value"], m["stderr"]]
            for e, row in sorted(result["exits"].items(), key=lambda kv: int(kv[0])) for task, m in row.items()]


def log_wandb(result: Mapping, run_dir: Path, mode: str, name: str) -> str | None:
    """Log the exit × task table (and the strategy table) to W&B: into the run's own W&B run when
    <run_dir>/wandb_run_id exists, else a new one. Returns the W&B directory, None when disabled."""
    if mode == "disabled":
        return None
    import wandb

    id_file = Path(run_dir) / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    run = wandb.init(project="layerskip-pretrain", name=name, id=run_id, resume="allow" if run_id else None,
                     dir=str(run_dir), mode=wandb_mode(mode), settings=wandb.Settings(silent=True))
    payload = {"downstream/per_exit": wandb.Table(columns=["exit", "task", "metric", "value", "stderr"],
                                                  data=table_rows(result))}
    if result.get("strategies"):
        rows = [[label, task, m["value"], row["acceptance"], row["tokens_per_s"], row["speedup"]]
                for label, row in result["strategies"].items() for task, m in row["tasks"].items()]
        payload["downstream/per_strategy"] = wandb.Table(
            columns=["strategy", "task", "value", "acceptance", "tokens_per_s", "speedup"], data=rows)
    run.log(payload)
    directory = run.dir
    run.finish()
    return directory


def accuracy_figure(result: Mapping, path: str | Path, title: str = "downstream accuracy per exit") -> Path:
    """Value of each task's main metric per exit (error bars: the harness's stderr), one line per task."""
    from pretrain.evaluation.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    exits = sorted(int(e) for e in result["exits"])
    for task, info in result["tasks"].items():
        points = [(e, result["exits"][e if e in result["exits"] else str(e)].get(task)) for e in exits]
        points = [(e, m) for e, m in points if m and m["value"] is not None]
        ax.errorbar([e for e, _ in points], [m["value"] for _, m in points],
                    yerr=[m["stderr"] or 0.0 for _, m in points], marker="o", markersize=4, capsize=3,
                    label=f"{task} ({info['metric'].split(',')[0]})")
    ax.set_xlabel("exit layer (blocks run before the shared exit head)")
    ax.set_ylabel("task metric")
    ax.set_xticks(exits)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
