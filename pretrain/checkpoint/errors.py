"""What can go wrong with checkpoints, each as one line for the user and a process exit code
(pretrain/operations/exit_codes.py lists them all)."""
from __future__ import annotations


class CheckpointError(RuntimeError):
    """Leave the trainer with `code` after this one-line message (no traceback)."""

    code = 1


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions, ...); the partial directory was
    removed."""

    code = 74


class CheckpointDirInUse(CheckpointError):
    """Another trainer holds the lock of the directory the checkpoints live in."""

    code = 2


class NonFiniteWeights(CheckpointError):
    """The weights hold NaN/inf: no checkpoint is written with them."""

    code = 65


class NoSoundCheckpoint(FileNotFoundError):
    """No checkpoint at the path given passes the checks (or there is none); `problem` says why."""

    code = 2

    def __init__(self, message: str, problem: str = ""):
        super().__init__(message)
        self.problem = problem or message
