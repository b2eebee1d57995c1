"""Shared benchmark plumbing: the trainer of a config (the run's own code path, random data),
interleaved repeats with medians, machine description, result files."""
from __future__ import annotations

import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

# LAYERSKIP_BENCH_RESULTS redirects every result file (bench/gpu_check.py collects its parts' results
# there, so that a check never overwrites the committed ones)
RESULTS = Path(os.environ.get("LAYERSKIP_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def trainer_for(cfg, model=None):
    """The Trainer a run of `cfg` builds, for the world size this process was launched with
    (process group and mesh created when it is > 1); `model` defaults to build_model(cfg)."""
    from parallel.mesh import launched_world_size, local_rank, setup_parallel
    from pretrain.config import check_layout
    from pretrain.device import select_device
    from pretrain.trainer.build import build_model
    from pretrain.trainer.trainer import Trainer

    dims = check_layout(cfg, launched_world_size())
    dims.device = select_device(cfg.train.device, local_rank())
    setup_parallel(dims)
    return Trainer(cfg, dims, build_model(cfg) if model is None else model)


def random_batch(vocab_size: int, batch: int, seq_len: int, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """Random tokens with next-token targets and sample ids 0..batch-1."""
    seq = torch.randint(0, vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed))
    return {"tokens": seq[:, :-1].to(device), "targets": seq[:, 1:].to(device),
            "sample_ids": torch.arange(batch, device=device)}


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
    """Median seconds per call of each case, the cases run round-robin so drift hits all alike,
    each repeat starting one case further on (no case always runs first, after another's caches).
    `clock`: wall time by default; time.process_time (this process's CPU time) is steadier on a
    machine shared with other work, for single-threaded runs."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            cases[name]()
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def record(name: str, title: str, payload: dict, table: str) -> Path:
    """Write bench/results/<name>.json and .md, with the command that produced them."""
    RESULTS.mkdir(parents=True, exist_ok=True)
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


def extract_revision(ref: str, paths: list[str], into: str | Path) -> Path:
    """The files under `paths` as of git commit `ref`, written below `into` (for timing an earlier
    revision's code side by side with this tree's)."""
    archive = subprocess.run(["git", "archive", ref, *paths], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return Path(into)


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"
