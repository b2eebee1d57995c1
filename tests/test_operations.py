"""The operations pieces on their own: time budget, non-finite guard, watchdog report, run lock,
requeue file, signal flag, metrics truncation, config validation of the operations keys."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pretrain.config import ConfigError, RunConfig, validate
from pretrain.metrics.logger import truncate_metrics
from pretrain.operations.exit_codes import EXIT_HANG, NonFiniteStop, RunDirInUse
from pretrain.checkpoint.integrity import all_finite
from pretrain.operations.nonfinite import NonFiniteGuard, finite_tree
from pretrain.operations.requeue import write_requeue_file
from pretrain.operations.run_dir import for_restarted_workers, resume_mode_of_workers
from pretrain.operations.run_lock import RunLock
from pretrain.operations.signals import SignalFlag
from pretrain.operations.time_budget import StepTimes, deadline_from, should_leave
from pretrain.operations.watchdog import Watchdog, hang_limit, stuck_ranks


def test_deadline_is_the_earliest_of_limit_and_env():
    assert deadline_from(100.0, 0, env={}) == math.inf
    assert deadline_from(100.0, 50, env={}) == 150.0
    assert deadline_from(100.0, 50, env={"LAYERSKIP_DEADLINE": "120"}) == 120.0
    assert deadline_from(100.0, 0, env={"LAYERSKIP_DEADLINE": " 1e3 "}) == 1000.0
    with pytest.raises(ValueError, match="LAYERSKIP_DEADLINE='soon'"):
        deadline_from(0.0, 0, env={"LAYERSKIP_DEADLINE": "soon"})


def test_leave_when_a_step_and_a_checkpoint_would_cross_the_deadline():
    assert not should_leave(now=90, deadline=100, next_step_s=4, checkpoint_s=5)   # 99 <= 100
    assert should_leave(now=90, deadline=100, next_step_s=4, checkpoint_s=7)       # 101 > 100
    assert not should_leave(now=1e9, deadline=math.inf, next_step_s=1e9, checkpoint_s=1e9)
    times = StepTimes(size=3)
    for s in (5.0, 1.0, 2.0, 3.0):
        times.add(s)
    assert times.values == [1.0, 2.0, 3.0] and times.median() == 2.0 and times.slowest() == 3.0
    times.add(10.0)
    assert times.median() == 3.0


def test_guard_skips_non_finite_steps_and_stops_after_k_in_a_row():
    guard = NonFiniteGuard("skip", max_consecutive=3)
    decisions = []
    for step, (loss, gnorm) in enumerate([(1.0, 1.0), (float("nan"), 1.0), (1.0, float("inf")),
                                          (2.0, 0.5), (1.0, float("nan")), (float("inf"), 1.0)]):
        guard.step = step
        decisions.append(guard(loss, gnorm))
        assert guard.action() == "continue"
    assert decisions == [True, False, False, True, False, False]
    assert guard.skipped == 4 and guard.consecutive == 2
    guard.step = 6
    assert guard(float("nan"), float("nan")) is False
    with pytest.raises(NonFiniteStop, match=r"non-finite step 6 .*3 step\(s\) in a row from step 4"):
        guard.action()


def test_stop_policy_stops_at_the_first_and_rollback_is_bounded():
    stop = NonFiniteGuard("stop", max_consecutive=10)
    stop.step = 7
    assert stop(float("nan"), 1.0) is False
    with pytest.raises(NonFiniteStop, match="step 7"):
        stop.action()
    roll = NonFiniteGuard("rollback", max_consecutive=2)
    actions = []
    for _ in range(8):
        roll(float("nan"), 0.0)
        try:
            actions.append(roll.action())
        except NonFiniteStop:
            actions.append("stop")
            break
    assert actions == ["continue", "rollback"] * 3 + ["continue", "stop"]
    with pytest.raises(ValueError, match="nonfinite_policy"):
        NonFiniteGuard("ignore")


def test_finite_checks():
    assert all_finite([torch.ones(3), torch.zeros(0)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])])
    assert finite_tree({"a": [1.0, {"b": 2}], "c": "nan"})
    assert not finite_tree({"a": [1.0, {"b": float("nan")}]})


def test_watchdog_names_the_rank_whose_heartbeat_went_stale(tmp_path):
    now = time.time()
    beats = {0: {"step": 5, "alive": now}, 1: {"step": 5, "alive": now - 30, "host": "n2", "pid": 9}}
    assert list(stuck_ranks(beats, 2, now, stale_s=3)) == [1]
    assert "no heartbeat for 30 s" in stuck_ranks(beats, 2, now, stale_s=3)[1]
    assert list(stuck_ranks({0: {"step": 5, "alive": now}}, 2, now, 3)) == [1]          # no file at all
    assert list(stuck_ranks({0: {"step": 6, "alive": now}, 1: {"step": 5, "alive": now}}, 2, now, 3)) == [1]
    assert hang_limit(None, 10, 5) is None and hang_limit(0.1, 10, 5) == 5 and hang_limit(2.0, 10, 5) == 20

    dog = Watchdog(tmp_path, rank=0, world_size=2, factor=10, floor_s=2.0)
    dog._write()
    (tmp_path / "rank_1.json").write_text(json.dumps({"rank": 1, "step": 3, "alive": now - 60}))
    assert dog.check(time.time() + 100) is None          # not armed before a step completed
    dog.step_started(3)
    dog.step_done(0.05)
    dog.step_started(4)
    assert dog.check(time.time() + 1.0) is None           # under the 2 s floor
    report = dog.check(time.time() + 3.0)
    assert "rank 0 step 4" in report and "rank 1: no heartbeat" in report and f"code {EXIT_HANG}" in report
    with dog.suspended():
        assert dog.check(time.time() + 3.0) is None


def test_watchdog_thread_dumps_stacks_and_exits_76(tmp_path):
    """A real process whose step never ends: the thread reports, dumps the stacks, exits 76."""
    script = f"""
import time, sys
sys.path.insert(0, {str(os.getcwd())!r})
from pretrain.operations.watchdog import Watchdog
dog = Watchdog({str(tmp_path)!r}, rank=0, world_size=1, factor=10, floor_s=0.5).start()
dog.step_started(0); dog.step_done(0.01); dog.step_started(1)
def stuck_in_a_collective():
    time.sleep(120)
stuck_in_a_collective()
"""
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=150)
    assert proc.returncode == EXIT_HANG
    assert time.time() - started < 60   # long before the stuck call would have returned (a loaded CI machine
                                        # once took 18 s to start the interpreter and import torch)
    assert "watchdog: rank 0 step 1" in proc.stderr and "stuck_in_a_collective" in proc.stderr


def test_second_trainer_on_a_run_dir_is_refused(tmp_path):
    first = RunLock(tmp_path).acquire()
    script = f"""
import sys
sys.path.insert(0, {str(os.getcwd())!r})
from pretrain.operations.run_dir import for_restarted_workers, resume_mode_of_workers
from pretrain.operations.run_lock import RunLock
RunLock({str(tmp_path)!r}).acquire()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "is in use by another trainer" in proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr
    with pytest.raises(RunDirInUse):   # flock is per open file: a second open in one process is refused too
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


def test_requeue_file(tmp_path):
    assert write_requeue_file(5, "time_limit", env={}) is None
    target = tmp_path / "sub" / "requeue.json"
    assert write_requeue_file(12, "signal SIGUSR1", env={"LAYERSKIP_REQUEUE_FILE": str(target)}) == target
    assert json.loads(target.read_text()) == {"step": 12, "reason": "signal SIGUSR1"}


def test_signal_flag_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    flag = SignalFlag().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.pending() == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):   # a second Ctrl-C does not wait for the boundary
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_metrics_truncation_keeps_steps_before_the_resume_point(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s} for s in range(6)] + [{"kind": "eval", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')  # cut by a full disk
    assert truncate_metrics(path, 4) == 3   # steps 4, 5 and the broken line
    kept = [json.loads(l) for l in path.read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in kept] == [("train", 0), ("train", 1), ("train", 2), ("train", 3),
                                                     ("eval", 3)]
    assert truncate_metrics(path, 4) == 0


@pytest.mark.parametrize("key,value,match", [
    ("train.time_limit_s", -1.0, "train.time_limit_s"),
    ("train.collective_timeout_s", 0.0, "train.collective_timeout_s"),
    ("train.watchdog_factor", 0.5, "train.watchdog_factor"),
    ("train.watchdog_min_s", 900.0, "collective_timeout_s"),
    ("train.nonfinite_policy", "ignore", "train.nonfinite_policy"),
    ("train.nonfinite_max_consecutive", 0, "train.nonfinite_max_consecutive"),
    ("checkpoint.every_minutes", -5.0, "checkpoint.every_minutes"),
])
def test_operations_keys_are_validated(key, value, match):
    cfg = RunConfig()
    group, name = key.split(".")
    setattr(getattr(cfg, group), name, value)
    with pytest.raises(ConfigError, match=match):
        validate(cfg)


def test_restarted_workers_resume_the_run_their_first_round_began(monkeypatch):
    assert resume_mode_of_workers("none", 0) == "none"
    assert resume_mode_of_workers("none", 1) == "auto"
    assert resume_mode_of_workers("/ckpt/step_00000010", 2) == "/ckpt/step_00000010"
    cfg = RunConfig()
    cfg.checkpoint.resume = "none"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert for_restarted_workers(cfg).checkpoint.resume == "auto"
    assert cfg.checkpoint.resume == "none"  # the given config is not changed
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert for_restarted_workers(cfg) is cfg
