"""The requeue request a batch script reads: rank 0 writes {"step", "reason"} atomically to the
file named by env LAYERSKIP_REQUEUE_FILE (if set) before the trainer exits with EXIT_REQUEUE;
launch/slurm.sbatch then runs `scontrol requeue` and removes the file."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pretrain.files import write_atomic

REQUEUE_ENV = "LAYERSKIP_REQUEUE_FILE"


def write_requeue_file(step: int, reason: str, env: dict[str, str] | None = None) -> Path | None:
    env = os.environ if env is None else env
    target = env.get(REQUEUE_ENV, "").strip()
    if not target:
        return None
    return write_atomic(target, json.dumps({"step": step, "reason": reason}) + "\n")
