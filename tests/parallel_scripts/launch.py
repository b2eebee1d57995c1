"""Launch a script of this folder (or a module, e.g. a bench/ worker) under torchrun (gloo, CPU)
and collect the 'RESULT {json}' lines rank 0 prints. On failure, the tail of every rank's log is
shown. Used by the tests and by bench/."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def report(payload: dict) -> None:
    """One 'RESULT {json}' line, what `results` parses (printed by rank 0 of a launched script)."""
    print("RESULT " + json.dumps(payload), flush=True)


def results(text: str) -> list[dict]:
    return [json.loads(line[len("RESULT "):]) for line in text.splitlines() if line.startswith("RESULT ")]


def torchrun_stdout(nproc: int, entry: list[str], timeout: int = 240) -> str:
    """Run `entry` (a script path and its arguments, or "-m", module, arguments) under torchrun;
    return every rank's stdout, rank 0 first."""
    with tempfile.TemporaryDirectory() as logs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={logs}", "--redirects=3", *entry]
        proc = subprocess.run(cmd, cwd=HERE, env=child_env(), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tails = []
            for log in sorted(Path(logs).rglob("stderr.log")):
                lines = [l for l in log.read_text().splitlines() if "Warning" not in l]
                tails.append(f"--- {log.parent.name}: " + "\n".join(lines[-25:]))
            raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}\n" + "\n".join(tails))
        return "".join(p.read_text() for p in sorted(Path(logs).rglob("stdout.log")))


def torchrun(nproc: int, script: str, args: list[str], timeout: int = 240) -> list[dict]:
    return results(torchrun_stdout(nproc, [str(HERE / script), *args], timeout))
