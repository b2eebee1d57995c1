"""The one way a checkpoint is read, by resume, rollback, eval, generate and export alike:

    path, value = load_sound(source, load)

`source` is a run directory (its newest checkpoint that passes every check, falling back to older
ones with a line saying which was skipped and why) or one checkpoint directory (that one, or
NoSoundCheckpoint saying why not). Checks, in order: integrity.checkpoint_problem (complete,
verified against checksums.json, not marked damaged), then `load` itself, then `verify` on what
was loaded (e.g. the weights are finite); a checkpoint failing `verify` is marked damaged so no
later run loads it again. Under several processes rank 0 checks and every rank takes its choice
(`agree`, an all-reduce max over the world), so all ranks load the same checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TypeVar

from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

from pretrain.checkpoint.errors import NoSoundCheckpoint
from pretrain.checkpoint.integrity import checkpoint_problem, mark_damaged
from pretrain.checkpoint.layout import STEP_DIR, is_checkpoint, list_checkpoints, process_rank

T = TypeVar("T")
Agree = Callable[[list[float]], list[float]]


def report_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _alone(values: list[float]) -> list[float]:
    return values


def _checks_here(agree: Agree) -> bool:
    """Whether this process runs the checks: rank 0 when the answer is agreed over the world,
    every process when it decides alone."""
    return agree is _alone or process_rank() == 0


def names_one_checkpoint(path: Path) -> bool:
    """`path` is (or was meant to be) one checkpoint directory rather than a run directory."""
    return is_checkpoint(path) or bool(STEP_DIR.match(Path(path).name))


def choose_checkpoint(run_dir: Path, report: Callable[[str], None], agree: Agree = _alone) -> tuple[list[Path], int]:
    """(candidates newest first, index of the newest that passes the checks, or -1). Rank 0
    checks; `agree` hands its answer to every rank."""
    candidates = [path for _, path in reversed(list_checkpoints(run_dir))]
    choice = -1
    if _checks_here(agree):
        for i, path in enumerate(candidates):
            problem = checkpoint_problem(path)
            if problem is None:
                choice = i
                break
            report(f"warning: skipping checkpoint {path}: {problem}")
    return candidates, int(agree([float(choice)])[0])


def load_newest_good(candidates: list[Path], start: int, load: Callable[[Path], T],
                     report: Callable[[str], None], world_size: int) -> tuple[Path | None, T | None]:
    """Load candidates[start], falling back to older ones (that pass the checks) when loading
    itself fails, on one process; under several processes a failure on one rank cannot be agreed
    on and is raised."""
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


def load_sound(source: str | Path, load: Callable[[Path], T], *, verify: Callable[[T], str | None] = lambda v: None,
               report: Callable[[str], None] = report_to_stderr, agree: Agree = _alone,
               world_size: int = 1) -> tuple[Path | None, T | None]:
    """(checkpoint, what `load` returned) per the module docstring; (None, None) when the run
    directory holds no checkpoint at all; NoSoundCheckpoint when it holds some but none passes,
    or when the one checkpoint named fails."""
    source = Path(source)
    if not source.exists():
        raise NoSoundCheckpoint(f"checkpoint path {source} does not exist", "it does not exist")
    one = names_one_checkpoint(source)
    while True:
        if one:
            problem = checkpoint_problem(source) if _checks_here(agree) else None
            if agree([1.0 if problem else 0.0])[0]:
                raise NoSoundCheckpoint(f"{source} cannot be loaded: {problem or 'see rank 0'}", problem or "")
            candidates, start = [source], 0
        else:
            candidates, start = choose_checkpoint(source, report, agree)
            if not candidates:
                return None, None
        path, value = load_newest_good(candidates, start, load, report, world_size)
        if path is None:
            where = source if one else f"{source} (newest first: {', '.join(c.name for c in candidates[:3])})"
            raise NoSoundCheckpoint(f"no checkpoint in {where} can be loaded (see the warnings above)",
                                    "loading failed" if one else "no checkpoint passes the checks")
        problem = verify(value)  # each rank checks what it holds
        if not agree([1.0 if problem else 0.0])[0]:
            if path != candidates[0]:
                report(f"using {path}, the newest checkpoint that loads")
            return path, value
        if _checks_here(agree):
            mark_damaged(path, problem or "failed a check on another rank", report)
        agree([0.0])  # the mark is on disk before any rank looks again
        if one:
            raise NoSoundCheckpoint(f"{source} cannot be loaded: {problem}", problem or "")
