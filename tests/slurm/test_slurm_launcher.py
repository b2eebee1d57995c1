"""launch/slurm.sbatch on a real two-node Slurm, with a stand-in worker (probe_worker.py) in place
of the trainer: processes per node from the allocation, the rendezvous port from the job id, the
warning signal reaching every worker, the requeue the worker asks for, the allocation's deadline,
and scancel that stays a cancel."""
from __future__ import annotations

import json
import re
import subprocess
import time
from datetime import datetime

import pytest

from jobs import HERE, ROOT, RUN_ENABLED, SKIP_REASON, job_field, log, state, submit, wait_done, wait_for

pytestmark = pytest.mark.skipif(not RUN_ENABLED, reason=SKIP_REASON)

PROBE_ENV = {"LAYERSKIP_MODULE": "probe_worker", "PYTHONPATH": f"{ROOT}:{HERE}"}


def probes(text: str) -> list[dict]:
    """The PROBE records in a log (workers of one node share its output: lines may run together)."""
    decoder, found = json.JSONDecoder(), []
    for m in re.finditer(r"PROBE (?=\{)", text):
        try:
            found.append(decoder.raw_decode(text, m.end())[0])
        except json.JSONDecodeError:  # a line still being written
            pass
    return found


def ready(text: str, restart: int) -> list[dict]:
    return [p for p in probes(text) if p.get("ready") and int(p["slurm_restart_count"] or 0) == restart]


def test_warning_signal_reaches_every_worker_then_the_job_requeues(slurm_cluster, tmp_path):
    job = submit(tmp_path, ["--nodes=2", "--ntasks-per-node=2"], [], **PROBE_ENV)
    wait_for(lambda: len(ready(log(tmp_path, job), 0)) == 4, 120, "4 workers", job, tmp_path)
    text = log(tmp_path, job)
    first = ready(text, 0)
    # --ntasks-per-node=2 on CPU nodes: two workers per node, one world of four
    assert sorted(p["host"] for p in first) == ["n1", "n1", "n2", "n2"]
    assert {p["world_size"] for p in first} == {"4"} and {p["local_world_size"] for p in first} == {"2"}
    assert sorted(p["rank"] for p in first) == [0, 1, 2, 3]
    assert f"endpoint    n1:{20000 + job % 20000} " in text  # port from the job id
    assert "processes   2 per node, 4 in all" in text and "restart 0" in text
    assert re.search(r"^repository  \S+ at [0-9a-f]{7}", text, flags=re.M)
    assert {p["layerskip_deadline"] for p in first} == {None}  # no time limit, no deadline
    assert re.search(r"^[01]: PROBE ", text, flags=re.M)  # srun --label
    # what Slurm does at --signal=B:USR1@s (time limit ahead, or preemption)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    assert wait_done(job, tmp_path, 180) == "COMPLETED"
    text = log(tmp_path, job)
    got = [p for p in probes(text) if p.get("signal") == "SIGUSR1"]
    assert sorted({p["rank"] for p in got}) == [0, 1, 2, 3], text[-4000:]
    assert "=== requeued: the trainer asked" in text
    assert job_field(job, "Restarts") == "1"
    assert len(ready(text, 1)) == 4  # the second attempt ran, its output appended to the same log
    assert text.count(f"=== layerskip job {job} (layerskip) start") == 2


def test_time_limit_gives_the_workers_the_allocations_deadline(slurm_cluster, tmp_path):
    # the warning (sent up to a minute early) comes after the probe has left
    job = submit(tmp_path, ["--nodes=1", "--time=2", "--signal=B:USR1@1"], [], LAYERSKIP_DEADLINE_MARGIN="10", LAYERSKIP_MIN_RUN_S="30",
                 PROBE_EXIT_AT_ONCE="1", **PROBE_ENV)
    assert wait_done(job, tmp_path, 120) == "COMPLETED"
    text = log(tmp_path, job)
    end = iso_epoch(job_field(job, "StartTime")) + 120  # the allocation's end as Slurm plans it
    deadline = float(ready(text, 0)[0]["layerskip_deadline"])
    assert abs(deadline - (end - 10)) <= 1, (deadline, end)
    banner = re.search(r"^deadline    (\S+) \(allocation ends (\S+)\)", text, flags=re.M)
    assert iso_epoch(banner.group(1)) == deadline


def test_time_limit_too_short_to_train_fails_without_requeue(slurm_cluster, tmp_path):
    job = submit(tmp_path, ["--nodes=1", "--time=1"], [], **PROBE_ENV)
    assert wait_done(job, tmp_path, 120) == "FAILED"
    assert "leaves under 120 s to train" in log(tmp_path, job) and job_field(job, "Restarts") == "0"


def iso_epoch(text: str) -> float:
    """Seconds since the epoch of a time Slurm (local time) or the banner (UTC, ...Z) prints."""
    if text.endswith("Z"):
        return datetime.fromisoformat(text[:-1] + "+00:00").timestamp()
    return datetime.fromisoformat(text).timestamp()


def test_scancel_is_not_undone_by_a_requeue(slurm_cluster, tmp_path):
    job = submit(tmp_path, ["--nodes=2"], [], **PROBE_ENV)
    wait_for(lambda: len(ready(log(tmp_path, job), 0)) == 2, 120, "2 workers", job, tmp_path)
    subprocess.run(["scancel", str(job)], check=True)
    assert wait_done(job, tmp_path, 60) == "CANCELLED"
    time.sleep(10)  # longer than the cluster's KillWait: the batch script has ended by now
    assert state(job) == "CANCELLED" and job_field(job, "Restarts") == "0"


def preempt_unanswering_workers(tmp_path) -> str:
    """Two workers that die of any signal, preempted by a job in `high`; the job must requeue
    itself by the fallback and complete. Returns its log."""
    job = submit(tmp_path, ["--nodes=2", "--exclusive"], [], PROBE_NO_HANDLER="1", **PROBE_ENV)
    wait_for(lambda: len(ready(log(tmp_path, job), 0)) == 2, 120, "2 workers", job, tmp_path)
    subprocess.run(["sbatch", "--partition=high", "--nodes=2", "--exclusive", f"--output={tmp_path}/high-%j.out",
                    "--wrap", "sleep 2"], check=True, capture_output=True)
    assert wait_done(job, tmp_path, 240) == "COMPLETED"
    text = log(tmp_path, job)
    assert "=== requeued: preempted at" in text and job_field(job, "Restarts") == "1", text[-3000:]
    assert ready(text, 1)
    return text


def test_preemption_before_the_worker_can_answer_still_requeues(slurm_cluster, tmp_path):
    preempt_unanswering_workers(tmp_path)


def test_preemption_of_the_step_alone_still_requeues(default_preemption, tmp_path):
    """Without preempt_send_user_signal only the step's processes get SIGTERM, not the batch shell:
    the fallback requeue must go by Slurm's PreemptTime, not by a signal the shell never got."""
    text = preempt_unanswering_workers(tmp_path)
    assert "=== batch: got SIG" not in text, text[-3000:]  # the shell was not signalled


def test_unanswered_time_limit_warning_does_not_requeue(slurm_cluster, tmp_path):
    job = submit(tmp_path, ["--nodes=1"], [], PROBE_NO_HANDLER="1", **PROBE_ENV)
    wait_for(lambda: len(ready(log(tmp_path, job), 0)) == 1, 120, "the worker", job, tmp_path)
    subprocess.run(["scancel", "--batch", "--signal=USR1", str(job)], check=True)
    assert wait_done(job, tmp_path, 120) == "FAILED"
    assert "=== not requeued: SIGUSR1 (time limit ahead)" in log(tmp_path, job)
    assert job_field(job, "Restarts") == "0"
