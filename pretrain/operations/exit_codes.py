"""Process exit codes of the trainer, read by launch scripts (launch/slurm.sbatch requeues on 75).

    0   done
    2   bad input (config key, file, run or checkpoint directory in use): nothing was changed on disk
    65  stopped by the non-finite guard (no checkpoint with non-finite weights was written)
    74  a checkpoint could not be written (e.g. disk full); the partial directory was removed
    75  EXIT_REQUEUE: a checkpoint was written on a signal or at the time limit; rerun to resume
    76  EXIT_HANG: the watchdog found a rank that stopped advancing (stacks were dumped to stderr)
"""
from __future__ import annotations

from pretrain.checkpoint.errors import CheckpointError, CheckpointWriteError  # noqa: F401 - raised by the Checkpointer

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 65
EXIT_CHECKPOINT_WRITE = CheckpointWriteError.code
EXIT_REQUEUE = 75
EXIT_HANG = 76


class OperationsExit(Exception):
    """Leave the trainer with `code` after one line `message` on stderr (no traceback)."""

    code = 1

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class RunInterrupted(OperationsExit):
    """A signal or the time limit: a checkpoint was written; rerun (requeue) to resume."""

    code = EXIT_REQUEUE


class NonFiniteStop(OperationsExit):
    code = EXIT_NONFINITE


class RunDirInUse(OperationsExit):
    code = EXIT_BAD_INPUT
