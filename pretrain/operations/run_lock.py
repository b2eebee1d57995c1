"""One trainer per run directory: rank 0 holds an exclusive lock on <run_dir>/.lock for the whole
run; a second trainer on the same directory stops at once with a clear error instead of tripping
over the first one's files (the lock itself: pretrain/checkpoint/lock.py, which also guards the
directory the checkpoints live in)."""
from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint.lock import DirectoryLock
from pretrain.operations.exit_codes import RunDirInUse


class RunLock(DirectoryLock):
    in_use = RunDirInUse

    def __init__(self, run_dir: Path):
        super().__init__(run_dir, run_dir)

    def refusal(self, holder: str) -> str:
        return (f"run directory {self.directory} is in use by another trainer ({holder}; lock file "
                f"{self.path}); wait for it to finish or choose another run_dir")
