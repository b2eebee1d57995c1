"""A stand-in for the trainer that shows what launch/slurm.sbatch hands its workers (run by
torchrun.sh through LAYERSKIP_MODULE=probe_worker): it prints one PROBE line with its rank, host and
environment, then a PROBE line per signal it receives. On SIGTERM/SIGUSR1 it does what the trainer's
contract says (rank 0 writes $LAYERSKIP_REQUEUE_FILE, every rank exits 75), in the first attempt of
the job only; a requeued attempt (SLURM_RESTART_COUNT >= 1) prints its line and exits 0, as does
every attempt under PROBE_EXIT_AT_ONCE=1. Under PROBE_NO_HANDLER=1 a signal kills it."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

RANK = int(os.environ.get("RANK", "0"))


def say(**fields) -> None:
    print("PROBE " + json.dumps({"rank": RANK, "host": socket.gethostname(), "pid": os.getpid(), **fields}),
          flush=True)


def leave(signum, frame) -> None:
    say(signal=signal.Signals(signum).name, t=time.time())
    time.sleep(1)  # a checkpoint would be written here
    if RANK == 0 and os.environ.get("LAYERSKIP_REQUEUE_FILE"):
        with open(os.environ["LAYERSKIP_REQUEUE_FILE"], "w") as f:
            json.dump({"step": 1, "reason": f"signal {signal.Signals(signum).name}"}, f)
    sys.exit(75)


def main() -> None:
    if os.environ.get("PROBE_NO_HANDLER") != "1":  # else: dies of the signal, as a trainer in start-up
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, leave)
    keys = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_RESTART_COUNT", "LAYERSKIP_DEADLINE",
            "LAYERSKIP_REQUEUE_FILE", "MASTER_PORT")
    say(ready=True, t=time.time(), **{k.lower(): os.environ.get(k) for k in keys})
    if int(os.environ.get("SLURM_RESTART_COUNT", "0")) >= 1 or os.environ.get("PROBE_EXIT_AT_ONCE") == "1":
        return
    time.sleep(600)


if __name__ == "__main__":
    main()
