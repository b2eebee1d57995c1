"""An exclusive lock on a directory for the whole run: <dir>/.lock, held with flock by one
process. A second process trying it stops at once with an error naming the holder (its run
directory, pid, host and start time, which the holder writes into the file). The lock dies with
its process (kill -9 included), so a stale one never blocks a rerun; the file stays (removing it
would race with a new locker).

The Checkpointer locks the directory its checkpoints live in (checkpoint.dir may be shared by
several run directories); pretrain/operations/run_lock.py locks the run directory."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pretrain.checkpoint.errors import CheckpointDirInUse

LOCK_NAME = ".lock"


def holder_of(text: str) -> str:
    """The lock file's record as words ('another process' when it cannot be read)."""
    try:
        who = json.loads(text)
        return (f"run {who['run_dir']}, " if who.get("run_dir") else "") + \
            f"pid {who['pid']} on host {who['host']} since {who['since']}"
    except (ValueError, KeyError, TypeError, AttributeError):
        return "another process"


class DirectoryLock:
    in_use = CheckpointDirInUse   # the error raised when another process holds the lock

    def __init__(self, directory: Path, run_dir: Path | None = None):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.run_dir = run_dir
        self._fd: int | None = None

    def refusal(self, holder: str) -> str:
        return (f"checkpoint directory {self.directory} is in use by another trainer ({holder}; lock file "
                f"{self.path}); wait for that run to finish, or give this run another checkpoint.dir")

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = holder_of(os.read(fd, 4096).decode("utf-8", "replace").strip())
            os.close(fd)
            raise self.in_use(self.refusal(holder)) from None
        os.ftruncate(fd, 0)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.run_dir is not None:
            record["run_dir"] = str(Path(self.run_dir).absolute())
        os.write(fd, json.dumps(record).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
