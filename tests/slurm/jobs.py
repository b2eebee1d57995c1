"""Submit launch/slurm.sbatch to the local test cluster and watch the job: state, restarts, log,
the pids of its training processes (all nodes of the test cluster are this machine)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SBATCH = ROOT / "launch" / "slurm.sbatch"
RUN_ENABLED = os.environ.get("LAYERSKIP_SLURM_TESTS") == "1"
# The training every job of the suite runs (tiny model, stdlib data); tests add to the overrides.
STEPS = 60
BASE = ["model=tiny", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.device=cpu", "optim.lr=3e-3", "optim.warmup_steps=5", "logging.every=1",
        "logging.progress_bar=false", "logging.wandb.mode=disabled", "eval.batches=1", "eval.batch_size=4",
        "eval.decode_prompts=0", "layerskip.layer_dropout.p_max=0.3", "layerskip.early_exit.rotation_period=2"]


def overrides(data_dir, run_dir, *extra: str) -> list[str]:
    return BASE + [f"data.dir={data_dir}", f"run_dir={run_dir}", f"train.steps={STEPS}", *extra]


SKIP_REASON = ("the Slurm suite runs only under `make test-slurm` (LAYERSKIP_SLURM_TESTS=1): it installs "
               "and starts a local two-node Slurm as root")


def job_env(tmp: Path, **extra: str) -> dict:
    """The environment sbatch passes to the job: this checkout, one thread per process, no W&B,
    the requeue file in the test's directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PMI_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT),
               LAYERSKIP_REQUEUE_FILE=str(tmp / "requeue.json"))
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def submit(tmp: Path, sbatch_args: list[str], overrides: list[str], **env: str) -> int:
    """sbatch from `tmp` (not the repository: the script must find the repository itself)."""
    proc = subprocess.run(["sbatch", "--parsable", f"--output={tmp}/slurm-%j.out", *sbatch_args,
                           str(SBATCH), *overrides], cwd=tmp, env=job_env(tmp, **env),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"sbatch refused the job: {proc.stderr}"
    return int(proc.stdout.strip().split(";")[0])


def job_field(job: int, field: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True).stdout
    found = re.search(rf"\b{field}=(\S+)", text)
    return found.group(1) if found else ""


def state(job: int) -> str:
    return job_field(job, "JobState")


def log(tmp: Path, job: int) -> str:
    path = tmp / f"slurm-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(predicate, timeout_s: float, what: str, job: int | None = None, tmp: Path | None = None,
             interval: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = "" if job is None else f"\njob {job}: state {state(job)}\n" + (log(tmp, job)[-6000:] if tmp else "")
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def wait_done(job: int, tmp: Path, timeout_s: float) -> str:
    return wait_for(lambda: state(job) if state(job) in FINAL else "", timeout_s, "the job to end", job, tmp)


def worker_pids(marker: str) -> list[int]:
    """Training processes (torchrun's workers, not the agents) whose command line contains `marker`."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, out):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"torch.distributed.run" not in cmd and any(b"-u" == c for c in cmd):
            pids.append(pid)
    return pids


def rank_of(pid: int) -> int:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=", 1)[1])


def train_losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (the last record of a step, should an attempt repeat it)."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            losses[record["step"]] = record["loss"]
    return losses


def logged_steps(run_dir: Path) -> int:
    """Steps recorded in metrics.jsonl so far (0 before the file exists)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum('"kind": "train"' in line for line in path.read_text().splitlines())
