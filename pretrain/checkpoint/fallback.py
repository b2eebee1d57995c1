"""Resume from the newest checkpoint that loads: each candidate is checked (trainer_state.json,
DCP .metadata, per-file checksums, RNG files) newest first; a damaged one is skipped with a line
saying which and why. Under several processes rank 0 checks and every rank takes its choice
(one all-reduce), so all ranks load the same checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from pretrain.checkpoint.checksums import checksum_problem
from pretrain.checkpoint.store import TRAINER_STATE, STEP_DIR, process_rank


def candidate_checkpoints(run_dir: Path) -> list[Path]:
    """Every renamed-into-place step_<N> directory, newest first (damaged ones included)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), c) for c in root.iterdir() if c.is_dir() and (m := STEP_DIR.match(c.name))]
    return [c for _, c in sorted(found, reverse=True)]


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint `path` cannot be resumed from (None: it looks complete and intact)."""
    path = Path(path)
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


def choose_checkpoint(run_dir: Path, report: Callable[[str], None],
                      agree: Callable[[list[float]], list[float]] = lambda v: v) -> tuple[list[Path], int]:
    """(candidates newest first, index of the newest intact one or -1). Rank 0 checks; `agree`
    (an all-reduce max over the world) hands its answer to every rank."""
    candidates = candidate_checkpoints(run_dir)
    choice = -1
    if process_rank() == 0:
        for i, path in enumerate(candidates):
            problem = checkpoint_problem(path)
            if problem is None:
                choice = i
                break
            report(f"warning: skipping checkpoint {path}: {problem}")
    choice = int(agree([float(choice)])[0])
    return candidates, choice


def load_newest_good(candidates: list[Path], start: int, load: Callable[[Path], dict],
                     report: Callable[[str], None], world_size: int) -> tuple[Path | None, dict | None]:
    """Load candidates[start] (falling back to older ones if loading itself fails, on one process;
    under several processes a failure on one rank cannot be agreed on and is raised)."""
    if start < 0:
        return None, None
    for path in candidates[start:]:
        if world_size > 1:
            return path, load(path)
        if path != candidates[start] and (problem := checkpoint_problem(path)):
            report(f"warning: skipping checkpoint {path}: {problem}")
            continue
        try:
            return path, load(path)
        except (Exception, CheckpointException) as err:  # noqa: BLE001 - fall back to the next older one
            lines = [l.strip() for l in str(err).splitlines() if "Error" in l] or [str(err)]
            report(f"warning: skipping checkpoint {path}: loading failed ({type(err).__name__}: {lines[-1][:200]})")
    return None, None
