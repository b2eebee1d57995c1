"""A stand-in worker for the launcher tests (tests/test_launcher.py), run by launch/torchrun.sh
--module exit_worker: prints one WORKER line (world size, rendezvous, python), writes
$WORKER_READY, then exits $WORKER_EXIT at once if set, else waits; on SIGTERM, SIGHUP or SIGUSR1
it leaves as the trainer does: records and exits 75."""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

try:
    from pretrain.operations.launcher import record_exit_code
except ImportError:  # a checkout before the launcher existed (to see the tests fail there)
    def record_exit_code(code: int) -> None:
        pass


def leave(signum, frame) -> None:
    print(f"WORKER got {signal.Signals(signum).name}", flush=True)
    record_exit_code(75)
    sys.exit(75)


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, leave)
    print("WORKER " + json.dumps({"world_size": os.environ["WORLD_SIZE"], "run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
                                  "master_port": os.environ.get("MASTER_PORT"), "python": sys.executable}), flush=True)
    if os.environ.get("WORKER_READY"):
        Path(os.environ["WORKER_READY"]).write_text("ready")
    if os.environ.get("WORKER_EXIT"):
        code = int(os.environ["WORKER_EXIT"])
        record_exit_code(code)
        sys.exit(code)
    time.sleep(float(os.environ.get("WORKER_SLEEP", "600")))


if __name__ == "__main__":
    main()
