"""eval.tasks: a small downstream task set at every exit, at each evaluation during training.

The training loop calls `downstream_at_evaluation` once per evaluation (rank 0, on the whole model);
with eval.tasks empty (the default) it returns {} without importing the harness. The result goes into
eval.json under "downstream" and into metrics.jsonl / W&B as a record of kind "downstream"
({"step", "exit_<E>": {task: value}}). A task set that cannot run (unknown name, a request longer
than the model) is reported in one line and under "downstream": {"error": ...}; training goes on."""
from __future__ import annotations

from pathlib import Path

import torch


def run_tokenizer(cfg) -> str:
    """The run's tokenizer.json (copied into the run directory at start), else the data's."""
    for candidate in (Path(cfg.run_dir) / "tokenizer.json", Path(cfg.data.dir or "") / "tokenizer.json"):
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"no tokenizer.json in {cfg.run_dir} or data.dir={cfg.data.dir}")


def downstream_at_evaluation(model: torch.nn.Module, cfg, step: int, logger) -> dict:
    """{} when cfg.eval.tasks is empty; else {"downstream": the sweep at every exit} (see sweep.run_sweep)."""
    if not cfg.eval.tasks:
        return {}
    from pretrain.downstream.lm import RequestTooLong
    from pretrain.downstream.source import ModelSource
    from pretrain.downstream.sweep import run_sweep, task_manager

    tasks = list(cfg.eval.tasks)
    try:
        manager = task_manager(tasks, [cfg.eval.tasks_include] if cfg.eval.tasks_include else [])
        source = ModelSource.of_model(model, run_tokenizer(cfg))
        result = run_sweep(source, tasks, list(range(1, model.cfg.n_layers + 1)), manager=manager,
                           limit=cfg.eval.tasks_limit, batch_size=cfg.eval.batch_size, progress=lambda line: None)
    except (ValueError, FileNotFoundError, RequestTooLong) as err:
        logger.write(f"warning: eval.tasks at step {step}: {err}")
        return {"downstream": {"error": str(err)}}
    logger.log({"step": step, **{f"exit_{e}": {t: m["value"] for t, m in row.items()}
                                 for e, row in result["exits"].items()}}, kind="downstream")
    return {"downstream": result}
