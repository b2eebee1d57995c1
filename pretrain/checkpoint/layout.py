"""Where checkpoints live and what they are called (the bottom of the package: imports nothing
from it).

    <run_dir>/checkpoints/step_<N:08d>/    one checkpoint: DCP files + .metadata, trainer_state.json,
                                           config.yaml, rng_rank<r>.pt, checksums.json
    <run_dir>/checkpoints/step_<N>.tmp/    a save in progress (renamed into place when complete)
    <run_dir>/checkpoints/.lock            held by the trainer writing there (see lock.py)

<run_dir>/checkpoints may be a symbolic link to checkpoint.dir (shared storage).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch.distributed as dist

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"


def process_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoints_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_root(run_dir) / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint renamed into place in the run directory, oldest
    first, damaged ones included (whether one loads is pretrain.checkpoint.integrity's question;
    saves in progress, step_<N>.tmp, are not listed)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    return sorted((int(m.group(1)), c) for c in root.iterdir() if c.is_dir() and (m := STEP_DIR.match(c.name)))


def is_checkpoint(path: Path) -> bool:
    """`path` looks like one checkpoint directory (not a run directory)."""
    return (Path(path) / TRAINER_STATE).is_file() and (Path(path) / ".metadata").is_file()
DAMAGED = "damaged.json"   # written into a checkpoint found unusable after its checks passed
