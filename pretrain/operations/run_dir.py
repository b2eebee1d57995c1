"""Workers restarted by torchrun (--max-restarts) continue the run their first round began, even
when it was started with checkpoint.resume=none. (The checkpoint directory's preparation, the
new-run check and leftovers of interrupted saves are pretrain/checkpoint/storage.py.)"""
from __future__ import annotations

import dataclasses
import os

from pretrain.config import RunConfig


def resume_mode_of_workers(mode: str, restart_count: int) -> str:
    """checkpoint.resume for workers in restart round `restart_count` (TORCHELASTIC_RESTART_COUNT):
    a fresh start (none) becomes auto from the second round on, so a restart neither refuses
    the run's own checkpoints nor, with checkpoint.overwrite=true, deletes them."""
    return "auto" if mode == "none" and restart_count > 0 else mode


def for_restarted_workers(cfg: RunConfig) -> RunConfig:
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    mode = resume_mode_of_workers(cfg.checkpoint.resume, int(count) if count.isdigit() else 0)
    if mode == cfg.checkpoint.resume:
        return cfg
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=mode))
