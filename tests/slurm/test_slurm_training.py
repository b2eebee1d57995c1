"""The trainer through launch/slurm.sbatch on a real two-node Slurm: two nodes train like one
process; a preempted job checkpoints on the signal, requeues itself and ends with the losses of an
uninterrupted run; kill -9 of one rank fails the job within seconds; a SIGSTOPped rank ends the job
through the watchdog within its configured time."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from jobs import (RUN_ENABLED, SKIP_REASON, STEPS, job_field, log, logged_steps, overrides, rank_of,
                  state, submit, train_losses, wait_done, wait_for, worker_pids)

pytestmark = pytest.mark.skipif(not RUN_ENABLED, reason=SKIP_REASON)

TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--exclusive"]


def close(a: dict, b: dict, rtol: float = 1e-5) -> bool:
    return sorted(a) == sorted(b) and all(abs(a[k] - b[k]) <= rtol * abs(b[k]) for k in b)


def test_two_nodes_train_like_one_process(slurm_cluster, data_dir, reference_losses, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(tmp_path, TWO_NODES, overrides(data_dir, run_dir, "parallel.dp_shard=2"))
    assert wait_done(job, tmp_path, 600) == "COMPLETED", log(tmp_path, job)[-5000:]
    text = log(tmp_path, job)
    assert "nodes       2: n[1-2]" in text and "processes   1 per node, 2 in all" in text
    assert close(train_losses(run_dir), reference_losses)
    assert (run_dir / "eval.json").is_file()


def start_long_run(tmp_path, data_dir, *extra: str, steps: int = 100000, **env: str) -> tuple[int, object]:
    """A two-node job that trains until stopped; returns when it has logged a few steps."""
    run_dir = tmp_path / "run"
    job = submit(tmp_path, TWO_NODES, overrides(data_dir, run_dir, "parallel.dp_shard=2",
                                                f"train.steps={steps}", *extra), **env)
    wait_for(lambda: logged_steps(run_dir) >= 5, 300, "training to start", job, tmp_path)
    return job, run_dir


def test_kill_9_of_one_rank_fails_the_job_within_seconds(slurm_cluster, data_dir, tmp_path):
    job, run_dir = start_long_run(tmp_path, data_dir)
    pids = worker_pids(str(run_dir))
    assert len(pids) == 2, pids
    os.kill(pids[-1], signal.SIGKILL)
    killed = time.monotonic()
    assert wait_done(job, tmp_path, 120) == "FAILED"
    took = time.monotonic() - killed
    assert took < 20, f"the job took {took:.0f} s to fail after a rank was killed"
    assert job_field(job, "Restarts") == "0"  # a crash is not a reason to requeue
    assert not worker_pids(str(run_dir))


def preempt_and_finish(tmp_path, job: int) -> str:
    """A job in the high-priority partition that needs both nodes preempts `job` (GraceTime,
    REQUEUE); once it requeued itself, let it run again at once and wait for the end; its log."""
    high = subprocess.run(["sbatch", "--parsable", "--partition=high", "--nodes=2", "--exclusive",
                           f"--output={tmp_path}/high-%j.out", "--wrap", "sleep 2"],
                          capture_output=True, text=True, check=True).stdout.strip()
    wait_for(lambda: "=== requeued" in log(tmp_path, job), 120, "the job to requeue itself", job, tmp_path)
    # a requeued job waits for its begin time; the test does not
    wait_for(lambda: state(int(high)) == "COMPLETED", 120, "the preempting job to run")
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], capture_output=True)
    assert wait_done(job, tmp_path, 600) == "COMPLETED", log(tmp_path, job)[-5000:]
    return log(tmp_path, job)


def test_preempted_job_checkpoints_requeues_and_resumes_exactly(slurm_cluster, data_dir, reference_losses,
                                                               tmp_path):
    # checkpoint.every_minutes=0: the only checkpoint before the end is the one the signal asks for
    job, run_dir = start_long_run(tmp_path, data_dir, "checkpoint.every_minutes=0", steps=STEPS)
    text = preempt_and_finish(tmp_path, job)
    asked = re.search(r'=== requeued: the trainer asked: \{"step": (\d+), "reason": "signal (SIG\w+)"\}', text)
    assert asked, text[-5000:]
    step = int(asked.group(1))
    assert 5 <= step < STEPS
    assert job_field(job, "Restarts") == "1" and "restart 1" in text
    assert f"resumed from {run_dir}/checkpoints/step_{step:08d} at step {step}" in text
    assert close(train_losses(run_dir), reference_losses)
    assert train_losses(run_dir)[STEPS - 1] == pytest.approx(reference_losses[STEPS - 1], rel=1e-5)


def test_preemption_on_a_default_cluster_with_wandb_offline(default_preemption, data_dir, reference_losses,
                                                            tmp_path):
    """Issue 17.1: W&B's service dies of the step-wide SIGTERM; the trainer must still checkpoint,
    the job requeue and finish with the losses of an uninterrupted run; a few clear lines, no
    traceback."""
    job, run_dir = start_long_run(tmp_path, data_dir, "checkpoint.every_minutes=0", "logging.wandb.mode=offline",
                                  steps=STEPS, WANDB_MODE="offline")
    text = preempt_and_finish(tmp_path, job)
    asked = re.search(r'=== requeued: the trainer asked: \{"step": (\d+), "reason": "signal SIGTERM"\}', text)
    assert asked, text[-5000:]
    assert f"resumed from {run_dir}/checkpoints/step_{int(asked.group(1)):08d}" in text
    assert close(train_losses(run_dir), reference_losses)
    assert "Traceback" not in text, text[-5000:]
    assert re.search(r"=== layerskip job \d+ step end \S+ exit 75\n=== requeued", text), text[-5000:]
    assert (run_dir / "wandb").is_dir()


def test_stopped_rank_ends_the_job_through_the_watchdog(slurm_cluster, data_dir, tmp_path):
    job, run_dir = start_long_run(tmp_path, data_dir, "train.watchdog_min_s=5", "train.watchdog_factor=10",
                                  "train.collective_timeout_s=300")
    pids = worker_pids(str(run_dir))
    assert len(pids) == 2, pids
    stopped = pids[-1]
    stopped_rank = rank_of(stopped)
    os.kill(stopped, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        assert wait_done(job, tmp_path, 200) == "FAILED"
        took = time.monotonic() - stopped_at
    finally:
        try:
            os.kill(stopped, signal.SIGKILL)
        except ProcessLookupError:
            pass
    text = log(tmp_path, job)
    # the limit is max(10 x median step, 5 s); detection, stack dump and teardown add seconds
    assert took < 40, f"the job took {took:.0f} s to end after rank {stopped_rank} stopped"
    assert re.search(rf"watchdog: rank \d+ .*stuck: rank {stopped_rank}: ", text), text[-5000:]
    assert "most recent call first" in text  # the live rank's Python stacks
    assert "exitcode  : 76" in text  # torchrun's summary of the rank that left through the watchdog
    assert job_field(job, "Restarts") == "0"
    assert job_field(job, "ExitCode") == "76:0"  # the trainer's code reaches Slurm (torchrun's was 1)
