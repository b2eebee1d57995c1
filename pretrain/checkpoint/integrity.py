"""Whether one checkpoint can be trusted: complete (trainer_state.json, DCP .metadata, RNG files),
verified (every file matches checksums.json; a checkpoint without one is not trusted), and not
marked damaged. A checkpoint that passes these checks but turns out unusable when loaded (its
weights hold NaN/inf) is marked with damaged.json, so every later load skips it at once instead
of failing on it again."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.distributed.checkpoint import FileSystemReader

from pretrain.checkpoint.checksums import CHECKSUMS, checksum_problem, write_checksums
from pretrain.checkpoint.layout import DAMAGED, TRAINER_STATE
from pretrain.files import write_atomic


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be loaded (None: it is complete, verified and not marked)."""
    path = Path(path)
    mark = path / DAMAGED
    if mark.is_file():
        try:
            reason = json.loads(mark.read_text()).get("reason", "?")
        except (ValueError, OSError, AttributeError):
            reason = "?"
        return f"marked damaged ({reason}; {mark})"
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        return f"{TRAINER_STATE} is missing"
    try:
        state = json.loads(state_file.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no integer 'step'")
    except (ValueError, OSError, UnicodeDecodeError) as err:
        return f"{TRAINER_STATE} is unreadable ({err})"
    if not (path / ".metadata").is_file():
        return "DCP .metadata is missing"
    problem = checksum_problem(path)
    if problem:
        return problem
    try:
        FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any failure means: cannot load
        return f"DCP .metadata is unreadable ({type(err).__name__}: {err})"
    for rng in sorted(path.glob("rng_rank*.pt")):
        try:
            torch.load(rng, weights_only=True)["torch"]
        except Exception as err:  # noqa: BLE001
            return f"{rng.name} is unreadable ({type(err).__name__})"
    return None


def mark_damaged(path: Path, reason: str, report: Callable[[str], None]) -> None:
    """Record that checkpoint `path` is unusable (rank 0); a read-only checkpoint is only reported."""
    try:
        write_atomic(Path(path) / DAMAGED, json.dumps({"reason": reason, "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        report(f"warning: marked checkpoint {path} as damaged ({reason}); later loads skip it")
    except OSError as err:
        report(f"warning: checkpoint {path} is damaged ({reason}) but could not be marked ({err.strerror})")


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Every element of every tensor is finite (one reduction per tensor; local shards only)."""
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.numel() and not bool(torch.isfinite(local).all()):
            return False
    return True


def trust(path: Path) -> str:
    """A user vouches for checkpoint `path` that has no checksums.json (written before checksums
    existed, or copied without it): its files as they are now become the reference. Returns what
    was done; raises ValueError when `path` is not a complete checkpoint or is marked damaged."""
    path = Path(path)
    if (path / DAMAGED).is_file():
        raise ValueError(f"{path} is marked damaged ({path / DAMAGED}); remove that file first if you are sure")
    if not (path / TRAINER_STATE).is_file() or not (path / ".metadata").is_file():
        raise ValueError(f"{path} is not a complete checkpoint (needs {TRAINER_STATE} and DCP .metadata)")
    if (path / CHECKSUMS).is_file():
        return f"{path} already has {CHECKSUMS}: {checksum_problem(path) or 'its files match'}"
    write_checksums(path)
    return f"wrote {path / CHECKSUMS}: this checkpoint is loaded as it is now"
