"""launch/torchrun.sh --max-restarts: a worker killed mid-run is replaced, every worker of the new
round connects (no stale rendezvous keys: the restarted gloo workers used to hang in
connectFullMesh), the run resumes from its newest checkpoint and ends with the losses of an
uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from parallel_scripts.launch import ROOT, child_env, free_port

STEPS = 80
BASE = ["model=tiny", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.device=cpu", "optim.lr=3e-3", "optim.warmup_steps=5", "logging.every=1",
        "logging.progress_bar=false", "logging.wandb.mode=disabled", "eval.batches=1", "eval.batch_size=4",
        "eval.decode_prompts=0", f"train.steps={STEPS}", "checkpoint.every=10"]


@pytest.fixture(scope="module")
def data_dir(prepared_data):
    return prepared_data


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last record of each step (a restarted round repeats the steps after its checkpoint)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            out[record["step"]] = record["loss"]
    return out


def workers_of(agent_pid: int) -> list[int]:
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return [int(p) for p in children]


def test_killed_worker_is_restarted_and_the_run_resumes(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = BASE + [f"data.dir={data_dir}", f"run_dir={run_dir}"]
    env = dict(child_env(), PYTHON=sys.executable)
    cmd = [str(ROOT / "launch" / "torchrun.sh"), "--nproc", "2", "--endpoint", f"127.0.0.1:{free_port()}",
           "--run-id", "restarts", "--max-restarts", "1", "--", *overrides, "parallel.dp_shard=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ((run_dir / "metrics.jsonl").exists() and len(losses_by_step(run_dir)) >= 25):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not get going"
            time.sleep(0.1)
        workers = workers_of(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    resumed = [l for l in out.splitlines() if "resumed from" in l]
    assert len(resumed) == 1 and int(resumed[0].rsplit(" ", 1)[1]) >= 20, out[-4000:]
    # the same run in one process, uninterrupted (one thread, as the workers)
    subprocess.run([sys.executable, "-m", "pretrain.train", *BASE, f"data.dir={data_dir}",
                    f"run_dir={tmp_path / 'single'}"], cwd=ROOT, env=child_env(), check=True,
                   capture_output=True, timeout=600)
    reference = losses_by_step(tmp_path / "single")
    got = losses_by_step(run_dir)
    assert sorted(got) == sorted(reference)
    assert all(abs(got[s] - reference[s]) <= 1e-5 * abs(reference[s]) for s in reference)
