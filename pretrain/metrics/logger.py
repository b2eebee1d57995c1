"""Where metrics go: metrics.jsonl in the run directory, Weights & Biases, and a rank-0 console line.

Only rank 0 logs. wandb is offline unless an API key is configured (mode 'auto'), so runs never
need the network; `wandb sync` uploads an offline run later.

Resuming at step S keeps metrics.jsonl to the records of steps < S (rewritten atomically; a line a
full disk cut short is dropped), so each step appears once however often the run was resumed, and
continues the same W&B run: its id is kept in <run_dir>/wandb_run_id from the first invocation on.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pretrain.config import LoggingConfig
from pretrain.files import write_atomic
from pretrain.metrics.wandb_eval import log_eval_media  # [ablation hook]


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _flatten(f"{prefix}/{i}", v, out)
    else:
        out[prefix] = value


def truncate_metrics(path: Path, start_step: int) -> int:
    """Keep the records of steps < start_step (and no unparseable line); returns how many were
    dropped. Atomic: a crash leaves the old or the new file."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", -1)) < start_step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_atomic(path, "".join(l + "\n" for l in kept))
    return dropped


RUN_ID_FILE = "wandb_run_id"


def wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggingConfig, *, enabled: bool, run_config: dict,
                 total_steps: int, start_step: int, run_id: str | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb_run = None
        self.bar = None
        self.run_id = run_id
        if not enabled:
            return
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        mode = wandb_mode(cfg.wandb.mode)
        id_file = run_dir / RUN_ID_FILE
        if run_id is None and start_step > 0 and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name,
                tags=list(cfg.wandb.tags), config=run_config, dir=str(run_dir), mode=mode,
                id=run_id, resume="allow", settings=wandb.Settings(silent=True))
            self.run_id = self.wandb_run.id
            if not id_file.is_file() or id_file.read_text().strip() != self.run_id:
                write_atomic(id_file, self.run_id + "\n")
            where = self.wandb_run.url if mode == "online" else f"{self.wandb_run.dir} (offline; `wandb sync` uploads it)"
            print(f"wandb run {self.run_id}: {where}", flush=True)
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, record: dict[str, Any], *, kind: str = "train", console: str | None = None) -> None:
        if not self.enabled:
            return
        record = _jsonable({"kind": kind, **record})
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.wandb_run is not None:
            flat: dict[str, Any] = {}
            _flatten(kind, {k: v for k, v in record.items() if k not in ("kind", "step")}, flat)
            self.wandb_run.log({k: v for k, v in flat.items() if isinstance(v, (int, float))},
                               step=record.get("step"))
            if kind == "eval":  # [ablation hook] per-exit wandb.Table + figure (pretrain/metrics/wandb_eval.py)
                log_eval_media(self.wandb_run, record, self.run_dir)
        if console:
            self.write(console)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int = 1, postfix: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
