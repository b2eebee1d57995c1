"""Tasks at every requested exit, and generation tasks with every requested decoding strategy.

    result = run_sweep(source, tasks, exits=[2, 4, 8], strategies=[...], manager=task_manager([...]))

result = {"tasks": {task: {"output_type", "metric"}}, "exits": {E: {task: metrics}},
          "strategies": {label: {"tasks": {task: metrics}, "acceptance", "tokens_per_s", "speedup", ...}}}
with metrics = {"value", "stderr", "all": {metric,filter: value}} (stderr as the harness computes it).
Per-exit log-likelihoods come from one forward for all exits (LayerSkipLM's shared cache); each
strategy decodes the same prompts, autoregressive first, so its speedup is measured against them."""
from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path
from collections.abc import Sequence

from lm_eval import evaluator
from lm_eval.tasks import TaskManager

from pretrain.downstream import LOCAL_TASKS
from pretrain.downstream.lm import LayerSkipLM
from pretrain.downstream.source import ModelSource
from pretrain.downstream.strategies import Strategy

BOOTSTRAP_ITERS = 1000   # stderr of metrics without a closed form (acc and exact_match have one)


def task_manager(names: Sequence[str], include_paths: Sequence[str] = ()) -> TaskManager:
    """A task manager that knows `names`: this repository's local tasks and `include_paths` alone
    when they hold them all (indexing the harness's thousands of task files takes tens of seconds),
    else the harness's tasks too. ValueError naming the first unknown task."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    paths = [str(LOCAL_TASKS), *map(str, include_paths)]
    for path in paths:
        if not Path(path).is_dir():
            raise ValueError(f"task include path {path} is not a directory")
    local = TaskManager(include_path=paths, include_defaults=False)
    if set(names) <= set(local.all_tasks):
        return local
    manager = TaskManager(include_path=paths)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown task {name!r}{hint} (local tasks: --include-path DIR with task YAMLs; "
                             "`lm_eval ls tasks` lists the harness's)")
    return manager


def main_metric(config: dict) -> str:
    """The first metric the task declares (acc for multiple choice, exact_match, ...)."""
    metrics = config.get("metric_list") or []
    return metrics[0]["metric"] if metrics else {"loglikelihood_rolling": "word_perplexity"}.get(
        config.get("output_type"), "acc")


def task_metrics(results: dict, task: str, metric: str) -> dict:
    """{"value", "stderr", "all"} of one task from the harness's results (metric keys 'name,filter')."""
    values = {k: v for k, v in results["results"][task].items()
              if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    key = next((k for k in values if k.split(",")[0] == metric), next(iter(values), None))
    stderr = results["results"][task].get(key.replace(",", "_stderr,", 1)) if key else None
    clean = lambda v: float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None  # noqa: E731
    return {"metric": key, "value": clean(values.get(key)), "stderr": clean(stderr),
            "all": {k: clean(v) for k, v in values.items()}}


def load_tasks(manager: TaskManager, tasks: Sequence[str]) -> dict:
    """The harness's task objects (their datasets loaded): ValueError in one line when a dataset cannot
    be read, e.g. a hub dataset on a machine without access."""
    try:
        return manager.load(list(tasks))
    except OSError as err:   # ConnectionError (offline), DatasetNotFoundError, a missing data file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the data of task(s) {', '.join(tasks)}: {first} (without hub access, point "
                         "a task YAML at a local copy: README, Downstream evaluation)") from None


def _evaluate(lm: LayerSkipLM, task_dict: dict, limit: int | None) -> dict:
    return evaluator.evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS,
                              log_samples=False, verbosity="WARNING")


def run_sweep(source: ModelSource, tasks: Sequence[str], exits: Sequence[int], strategies: Sequence[Strategy] = (),
              manager: TaskManager | None = None, limit: int | None = None, batch_size: int = 8,
              truncate: bool = False, progress=print) -> dict:
    manager = manager or task_manager(tasks)
    task_dict = load_tasks(manager, tasks)
    cache: dict = {}
    per_exit, info = {}, {}
    for exit_layer in exits:
        lm = LayerSkipLM(source=source, exit_layer=exit_layer, exits=list(exits), cache=cache,
                         batch_size=batch_size, truncate=truncate)
        results = _evaluate(lm, task_dict, limit)
        for task, config in results["configs"].items():
            info[task] = {"output_type": config.get("output_type"), "metric": main_metric(config),
                          "samples": results.get("n-samples", {}).get(task, {}).get("effective")}
        per_exit[exit_layer] = {t: task_metrics(results, t, info[t]["metric"]) for t in info}
        progress(f"exit {exit_layer}: " + ", ".join(f"{t} {m['value']:.3f}" for t, m in per_exit[exit_layer].items()
                                                     if m["value"] is not None))
    out = {"tasks": info, "exits": per_exit, "num_layers": source.num_layers, "limit": limit}
    generation = [t for t, i in info.items() if i["output_type"] == "generate_until"]
    if strategies and generation:
        out["strategies"] = strategy_sweep(source, generation, strategies, manager, info, limit, batch_size,
                                           truncate, progress)
    return out


def strategy_sweep(source: ModelSource, tasks: list[str], strategies: Sequence[Strategy], manager: TaskManager,
                   info: dict, limit: int | None, batch_size: int, truncate: bool, progress=print) -> dict:
    """The generation tasks decoded with each strategy (autoregressive first: the baseline)."""
    task_dict = load_tasks(manager, tasks)
    ordered = list(dict.fromkeys([Strategy("autoregressive"), *strategies]))
    out: dict[str, dict] = {}
    for strategy in ordered:
        lm = LayerSkipLM(source=source, strategy=strategy.label, batch_size=batch_size, truncate=truncate)
        results = _evaluate(lm, task_dict, limit)
        stats = lm.decode_stats.summary()
        row = {"tasks": {t: task_metrics(results, t, info[t]["metric"]) for t in tasks},
               "acceptance": stats["acceptance"], "tokens_per_s": stats["tokens_per_s"],
               "layer_evals_per_token": stats["layer_evals_per_token"], "generated_tokens": stats["generated_tokens"],
               "wall_s": stats["wall_s"], "mean_exit_layer": stats["mean_exit_layer"],
               "mean_draft_len": stats["mean_draft_len"]}
        base = out.get("autoregressive", row)
        row["speedup"] = (row["tokens_per_s"] / base["tokens_per_s"]
                          if row["tokens_per_s"] and base["tokens_per_s"] else None)
        out[strategy.label] = row
        progress(f"{strategy.label}: " + ", ".join(f"{t} {m['value']:.3f}" for t, m in row["tasks"].items()
                                                    if m["value"] is not None) +
                 f", {row['tokens_per_s'] or 0:.1f} tokens/s")
    return out
