"""Where metrics go: metrics.jsonl in the run directory, Weights & Biases, TensorBoard
(`logging.tensorboard=true`: <run_dir>/tensorboard) and a rank-0 console line; each is a sink that
is dropped, with one warning, when it fails (pretrain/metrics/sinks.py).

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
import time
from pathlib import Path
from typing import Any

from pretrain.config import LoggingConfig
from pretrain.files import write_atomic
from pretrain.metrics.sinks import ConsoleSink, JsonlSink, Sink, Sinks, TensorBoardSink, WandbSink, safe_print
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


def format_duration(seconds: float) -> str:
    """1h02m, 4m05s, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def eta_seconds(elapsed_s: float, done: int, start_step: int, total_steps: int) -> float | None:
    """Time left at this invocation's average pace: elapsed / (done - start) * (total - done)."""
    if done <= start_step or total_steps <= 0:
        return None
    return elapsed_s / (done - start_step) * max(total_steps - done, 0)


class MetricsLogger:
    """Rank 0's metrics: every row goes to each sink (metrics.jsonl, W&B, TensorBoard; console
    lines to the console) with `time` (Unix seconds) and `elapsed_s` (since this invocation
    started) added, and train rows with `eta_s`. No sink can stop the run (pretrain/metrics/sinks.py)."""

    def __init__(self, run_dir: Path, cfg: LoggingConfig, *, enabled: bool, run_config: dict,
                 total_steps: int, start_step: int, run_id: str | None = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self.wandb_run = None
        self.run_id = run_id
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.monotonic()
        self.sinks = Sinks([])
        self.console = None
        if not enabled:
            return
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
        self.sinks.open("metrics.jsonl", lambda: JsonlSink(run_dir / "metrics.jsonl"))
        mode = wandb_mode(cfg.wandb.mode)
        if mode != "disabled":
            self.sinks.open("W&B", lambda: self._open_wandb(cfg, mode, run_config, run_id, start_step))
        if cfg.tensorboard:
            self.sinks.open("TensorBoard", lambda: TensorBoardSink(run_dir / "tensorboard"))
        bar = None
        if cfg.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        self.console = ConsoleSink(bar)
        self.sinks.open("console", lambda: self.console)

    def _open_wandb(self, cfg: LoggingConfig, mode: str, run_config: dict, run_id: str | None,
                    start_step: int) -> WandbSink:
        """Start (or continue: the id kept in <run_dir>/wandb_run_id) the W&B run."""
        import wandb

        id_file = self.run_dir / RUN_ID_FILE
        if run_id is None and start_step > 0 and id_file.is_file():
            run_id = id_file.read_text().strip() or None
        self.wandb_run = wandb.init(
            project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name,
            tags=list(cfg.wandb.tags), config=run_config, dir=str(self.run_dir), mode=mode,
            id=run_id, resume="allow", settings=wandb.Settings(silent=True))
        self.run_id = self.wandb_run.id
        if not id_file.is_file() or id_file.read_text().strip() != self.run_id:
            write_atomic(id_file, self.run_id + "\n")
        where = self.wandb_run.url if mode == "online" else f"{self.wandb_run.dir} (offline; `wandb sync` uploads it)"
        safe_print(f"wandb run {self.run_id}: {where}")
        return WandbSink(self.wandb_run, self.run_dir, log_eval_media)

    def log(self, record: dict[str, Any], *, kind: str = "train", console: str | None = None) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        stamp: dict[str, Any] = {"time": round(time.time(), 3), "elapsed_s": round(elapsed, 3)}
        eta = eta_seconds(elapsed, int(record.get("step", -1)) + 1, self.start_step, self.total_steps) \
            if kind == "train" else None
        if eta is not None:
            stamp["eta_s"] = round(eta, 1)
        record = _jsonable({"kind": kind, **record, **stamp})
        flat: dict[str, Any] = {}
        _flatten(kind, {k: v for k, v in record.items() if k not in ("kind", "step", "time")}, flat)
        scalars = {k: v for k, v in flat.items() if isinstance(v, (int, float)) }
        self.sinks.write(record, scalars)
        if console:
            self.write(console + (f" eta {format_duration(eta)}" if eta is not None else ""))

    def write(self, line: str) -> None:
        if self.enabled and self.console is not None:
            self.sinks.guarded(self.console, lambda: self.console.line(line))

    def advance(self, steps: int = 1, postfix: str | None = None) -> None:
        if self.enabled and self.console is not None:
            self.sinks.guarded(self.console, lambda: self.console.advance(steps, postfix))

    @property
    def failed_sinks(self) -> list[str]:
        return self.sinks.failed

    def close(self) -> None:
        if self.enabled:
            self.sinks.close()
