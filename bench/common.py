"""Shared benchmark plumbing: interleaved repeats with medians, machine description, result files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", {torch.cuda.get_device_name()}"
    return desc


def interleaved_medians(cases: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each case, the cases run round-robin so drift hits all alike.
    `clock`: wall time by default; time.process_time (this process's CPU time) is steadier on a
    machine shared with other work, for single-threaded runs."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def record(name: str, title: str, payload: dict, table: str) -> Path:
    """Write bench/results/<name>.json and .md, with the command that produced them."""
    RESULTS.mkdir(exist_ok=True)
    command = "python -m bench." + Path(sys.argv[0]).stem + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    meta = {"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "git": _git_rev()}
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **payload}, indent=2))
    md = (f"# {title}\n\n- command: `{command}`\n- machine: {meta['machine']}\n- date: {meta['date']}"
          f" (commit {meta['git']})\n\n{table}\n")
    path = RESULTS / f"{name}.md"
    path.write_text(md)
    print(md)
    return path


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"
