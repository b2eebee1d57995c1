"""Where metrics go: metrics.jsonl in the run directory, Weights & Biases, and a rank-0 console line.

Only rank 0 logs. wandb is offline unless an API key is configured (mode 'auto'), so runs never
need the network; `wandb sync` uploads an offline run later.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pretrain.config import LoggingConfig
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
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        mode = wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name,
                tags=list(cfg.wandb.tags), config=run_config, dir=str(run_dir), mode=mode,
                id=run_id, resume="allow", settings=wandb.Settings(silent=True))
            self.run_id = self.wandb_run.id
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
