"""Operations under torchrun with two processes (gloo, CPU): a SIGUSR1 to ONE rank makes both
agree at the next step boundary, checkpoint the same step and exit 75; a SIGSTOPped rank makes the
other one's watchdog dump its stacks, name the stopped rank and exit 76 within the configured time."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint.layout import list_checkpoints
from pretrain.operations.exit_codes import EXIT_HANG, EXIT_REQUEUE

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=tiny", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
        "optim.lr=3e-3", "optim.warmup_steps=2", "logging.every=1", "logging.progress_bar=false",
        "logging.wandb.mode=disabled", "eval.batches=1", "eval.batch_size=4", "eval.decode_prompts=0",
        "train.device=cpu", "parallel.dp_shard=2", "train.collective_timeout_s=120"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stdlib"
    subprocess.run([sys.executable, "-m", "pretrain.data.prepare", "--out", str(out), "--max-files", "20",
                    "--vocab-size", "512", "--seq-len", "32"], check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return out


def launch(data_dir, run_dir, logs, *extra, **env_extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT), **env_extra)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--log-dir={logs}", "--redirects=3", "-m", "pretrain.train",
           *BASE, f"data.dir={data_dir}", f"run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_pids(root_pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun workers below root_pid (from /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        env = dict(e.split(b"=", 1) for e in environ if b"=" in e)
        if env.get(b"TORCHELASTIC_RUN_ID") is not None and b"RANK" in env and b"LOCAL_RANK" in env:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}/stat")
            if ppid == root_pid or (parent.exists() and int(parent.read_text().rsplit(")", 1)[1].split()[1]) == root_pid):
                out[int(env[b"RANK"])] = int(entry.name)
    return out


def wait_for_steps(proc, run_dir, n, timeout=240) -> dict[int, int]:
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            pids = worker_pids(proc.pid)
            if len(pids) == 2:
                return pids
        time.sleep(0.05)
    raise AssertionError("training did not start")


def rank_logs(logs) -> dict[int, str]:
    out = {}
    for f in Path(logs).rglob("stderr.log"):
        out[int(f.parent.name)] = f.read_text() + (f.parent / "stdout.log").read_text()
    return out


def test_sigusr1_to_one_rank_checkpoints_on_both_and_exits_75(data_dir, tmp_path):
    run_dir, requeue = tmp_path / "run", tmp_path / "requeue.json"
    # checkpoint.every=2: asynchronous saves (over their own gloo group) are in flight around the signal
    proc = launch(data_dir, run_dir, tmp_path / "logs", "train.steps=400", "checkpoint.every=2", "checkpoint.keep=1",
                  LAYERSKIP_REQUEUE_FILE=str(requeue))
    pids = wait_for_steps(proc, run_dir, 3)
    os.kill(pids[1], signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    logs = rank_logs(tmp_path / "logs")
    stopped = json.loads(requeue.read_text())
    assert stopped["reason"] == "signal SIGUSR1", logs
    ckpts = list_checkpoints(run_dir)
    assert [s for s, _ in ckpts] == [stopped["step"]]
    assert {p.name for p in ckpts[0][1].glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    for rank in (0, 1):
        assert f"RunInterrupted: interrupted at step {stopped['step']} (signal SIGUSR1)" in logs[rank], logs[rank][-2000:]
    assert f"exitcode  : {EXIT_REQUEUE}" in err   # torchrun's summary of the failed workers
    # the rerun resumes from it and finishes
    rerun = launch(data_dir, run_dir, tmp_path / "logs2", f"train.steps={stopped['step'] + 2}")
    rerun.communicate(timeout=300)
    assert rerun.returncode == 0
    assert f"resumed from {ckpts[0][1]} at step {stopped['step']}" in rank_logs(tmp_path / "logs2")[0]


def test_sigstop_of_one_rank_ends_the_job_through_the_watchdog(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(data_dir, run_dir, tmp_path / "logs", "train.steps=100000", "train.watchdog_min_s=3",
                  "train.watchdog_factor=10")
    pids = wait_for_steps(proc, run_dir, 3)
    os.kill(pids[1], signal.SIGSTOP)
    stopped_at = time.time()
    try:
        deadline = stopped_at + 60
        while time.time() < deadline:
            logs = rank_logs(tmp_path / "logs")
            if "watchdog: rank 0" in logs.get(0, "") and not Path(f"/proc/{pids[0]}").exists():
                break
            time.sleep(0.1)
        elapsed = time.time() - stopped_at
    finally:
        os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    log = rank_logs(tmp_path / "logs")[0]
    assert "watchdog: rank 0" in log, log[-3000:]
    assert elapsed < 30          # the floor is 3 s (+ heartbeat interval); the process-group timeout 120 s
    report = next(l for l in log.splitlines() if l.startswith("watchdog: rank 0"))
    assert "rank 1: no heartbeat" in report and f"exiting with code {EXIT_HANG}" in report
    assert "Thread" in log and "most recent call first" in log        # faulthandler's stack dump
    assert f"exitcode  : {EXIT_HANG}" in err
