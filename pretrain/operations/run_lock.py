"""One trainer per run directory: rank 0 holds an exclusive lock on <run_dir>/.lock (flock) for
the whole run; a second trainer on the same directory stops at once with a clear error instead of
tripping over the first one's files. The lock dies with the process (kill -9 included), so a stale
lock never blocks a rerun; the file stays (removing it would race with a new locker)."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pretrain.operations.exit_codes import RunDirInUse

LOCK_NAME = ".lock"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
            os.close(fd)
            try:
                who = json.loads(holder)
                desc = f"pid {who['pid']} on host {who['host']} since {who['since']}"
            except (ValueError, KeyError, TypeError):
                desc = "another process"
            raise RunDirInUse(f"run directory {self.path.parent} is in use by another trainer ({desc}; "
                              f"lock file {self.path}); wait for it to finish or choose another run_dir")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
