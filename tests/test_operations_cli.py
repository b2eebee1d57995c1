"""Operations through the real trainer (python -m pretrain.train, and train() in process): a signal
writes a checkpoint and exits 75, the rerun ends where an uninterrupted run ends; the time limit;
the non-finite guard (skip / stop / rollback); refusals (exit 2, nothing changed on disk); the
interrupted final evaluation; metrics.jsonl once per step; checkpoint.dir; W&B run id on resume."""
import hashlib
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.checkpoint.layout import list_checkpoints
from pretrain.config import ConfigError, compose_run_config
from pretrain.operations.exit_codes import EXIT_NONFINITE, EXIT_REQUEUE, NonFiniteStop, RunInterrupted
from pretrain.operations.run_lock import RunLock
from pretrain.trainer.loop import train

ROOT = Path(__file__).resolve().parents[1]
BASE = ["model=tiny", "train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=4",
        "optim.lr=3e-3", "optim.warmup_steps=2", "logging.every=1", "logging.progress_bar=false",
        "logging.wandb.mode=disabled", "eval.batches=1", "eval.batch_size=4", "eval.decode_prompts=0",
        "train.device=cpu", "layerskip.layer_dropout.p_max=0.3"]
HUGE_LR = ["optim.lr=1e8", "optim.warmup_steps=0", "optim.grad_clip=0"]  # non-finite from step 1 on


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "stdlib"
    subprocess.run([sys.executable, "-m", "pretrain.data.prepare", "--out", str(out), "--max-files", "40",
                    "--vocab-size", "512", "--seq-len", "32"], check=True, capture_output=True, timeout=300,
                   env=env())
    return out


def env(**extra):
    out = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONPATH=str(ROOT), **extra)
    out.pop("WORLD_SIZE", None)
    return out


def args(data_dir, run_dir, *extra):
    return BASE + [f"data.dir={data_dir}", f"run_dir={run_dir}", *extra]


def config(data_dir, run_dir, *extra):
    return compose_run_config(args(data_dir, run_dir, *extra))[0]


def cli(data_dir, run_dir, *extra, **kw):
    return [sys.executable, "-m", "pretrain.train", *args(data_dir, run_dir, *extra)]


def train_losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def snapshot(run_dir):
    """{relative path: sha256} of every file under run_dir (links followed)."""
    out = {}
    for f in sorted(Path(run_dir).rglob("*")):
        if f.is_file() and f.name != ".lock":   # the lock file names its last holder
            out[str(f.relative_to(run_dir))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def test_signal_checkpoints_exits_75_and_the_rerun_ends_like_an_uninterrupted_run(data_dir, tmp_path):
    steps = ["train.steps=60", "checkpoint.every=0"]
    requeue = tmp_path / "requeue.json"
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(cli(data_dir, run_dir, *steps), env=env(LAYERSKIP_REQUEUE_FILE=str(requeue)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_REQUEUE, err[-2000:]
    stopped = json.loads(requeue.read_text())
    assert stopped["reason"] == "signal SIGUSR1" and 3 <= stopped["step"] < 60
    assert [s for s, _ in list_checkpoints(run_dir)] == [stopped["step"]]
    assert "RunInterrupted" in err and "Traceback" not in err
    assert not (run_dir / "eval.json").exists()
    rerun = subprocess.run(cli(data_dir, run_dir, *steps), env=env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    reference = train(config(data_dir, tmp_path / "reference", *steps))["losses"]
    resumed = train_losses(run_dir)
    assert [s for s, _ in resumed] == list(range(60))              # each step once in metrics.jsonl
    assert dict(resumed) == reference                              # bitwise, the final loss included
    assert json.loads((run_dir / "eval.json").read_text())["step"] == 59


def test_time_limit_checkpoints_and_exits_75(data_dir, tmp_path):
    requeue = tmp_path / "requeue.json"
    run_dir = tmp_path / "run"
    proc = subprocess.run(cli(data_dir, run_dir, "train.steps=100000"), capture_output=True, text=True,
                          timeout=300, env=env(LAYERSKIP_REQUEUE_FILE=str(requeue),
                                               LAYERSKIP_DEADLINE=str(time.time() + 25)))
    assert proc.returncode == EXIT_REQUEUE, proc.stderr[-2000:]
    stopped = json.loads(requeue.read_text())
    assert stopped["reason"] == "time_limit" and stopped["step"] >= 1
    assert [s for s, _ in list_checkpoints(run_dir)] == [stopped["step"]]
    bad = subprocess.run(cli(data_dir, tmp_path / "bad", "train.steps=2"), capture_output=True, text=True,
                         timeout=300, env=env(LAYERSKIP_DEADLINE="tomorrow"))
    assert bad.returncode == 2 and "LAYERSKIP_DEADLINE='tomorrow'" in bad.stderr and "Traceback" not in bad.stderr


def test_in_process_signal_raises_run_interrupted(data_dir, tmp_path, monkeypatch):
    import pretrain.trainer.loop as loop
    real = loop.step_plan

    def plan_and_signal(cfg, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(cfg, step)

    monkeypatch.setattr(loop, "step_plan", plan_and_signal)
    with pytest.raises(RunInterrupted, match=r"step 3 \(signal SIGTERM\)"):
        train(config(data_dir, tmp_path / "sig", "train.steps=10"))
    assert [s for s, _ in list_checkpoints(tmp_path / "sig")] == [3]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL     # handlers restored


def test_nonfinite_skip_then_stop_never_checkpoints_bad_weights(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(cli(data_dir, run_dir, "train.steps=10", "checkpoint.every=1",
                              "train.nonfinite_max_consecutive=3", *HUGE_LR),
                          capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == EXIT_NONFINITE, proc.stderr[-2000:]
    assert "stopped by the non-finite guard: non-finite step 3" in proc.stderr and "Traceback" not in proc.stderr
    assert "3 step(s) in a row from step 1" in proc.stderr
    assert [s for s, _ in list_checkpoints(run_dir)] == [1]   # none during the non-finite steps
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "nonfinite"] == [1, 2, 3]   # not "train": no throughput
    assert not (run_dir / "eval.json").exists()


def test_nonfinite_skip_policy_finishes_with_finite_weights_and_eval(data_dir, tmp_path):
    summary = train(config(data_dir, tmp_path / "run", "train.steps=4", "train.nonfinite_max_consecutive=100",
                           *HUGE_LR))
    assert summary["nonfinite_skipped"] == 3
    evaluation = (tmp_path / "run" / "eval.json").read_text()
    assert "NaN" not in evaluation and "Infinity" not in evaluation


def test_nonfinite_rollback_goes_back_to_the_last_good_checkpoint(data_dir, tmp_path, capsys):
    with pytest.raises(NonFiniteStop):
        train(config(data_dir, tmp_path / "run", "train.steps=20", "checkpoint.every=1",
                     "train.nonfinite_policy=rollback", "train.nonfinite_max_consecutive=2", *HUGE_LR))
    out = capsys.readouterr().out
    assert out.count("rolled back to") == 3 and "step_00000001" in out
    assert "continuing after step 2" in out and "continuing after step 4" in out
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [1]


def test_new_run_over_checkpoints_is_refused_unless_overwrite(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(config(data_dir, run_dir, "train.steps=4"))
    before = snapshot(run_dir)
    proc = subprocess.run(cli(data_dir, run_dir, "train.steps=2", "checkpoint.resume=none"),
                          capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 2 and "checkpoint.resume=none" in proc.stderr and "checkpoint.overwrite=true" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert snapshot(run_dir) == before
    summary = train(config(data_dir, run_dir, "train.steps=2", "checkpoint.resume=none", "checkpoint.overwrite=true"))
    assert sorted(summary["losses"]) == [0, 1]
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    assert [s for s, _ in train_losses(run_dir)] == [0, 1]


def test_second_trainer_on_the_run_dir_is_refused(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(config(data_dir, run_dir, "train.steps=2"))
    before = snapshot(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        proc = subprocess.run(cli(data_dir, run_dir, "train.steps=4"), capture_output=True, text=True,
                              timeout=300, env=env())
    finally:
        lock.release()
    assert proc.returncode == 2 and "is in use by another trainer" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(run_dir) == before


def test_damaged_checkpoints_are_skipped_or_refused(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(config(data_dir, run_dir, "train.steps=4", "train.stop_at_step=3", "checkpoint.every=1",
                 "checkpoint.keep=3"))
    newest = list_checkpoints(run_dir)[-1][1]
    (newest / "trainer_state.json").write_text("{")
    capsys.readouterr()
    summary = train(config(data_dir, run_dir, "train.steps=4"))
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step_00000003" in out and "trainer_state.json is unreadable" in out
    assert sorted(summary["losses"]) == [2, 3]                      # resumed from step 2
    with pytest.raises(ConfigError, match="checkpoint.resume=.*cannot resume from it: DCP .metadata"):
        bad = list_checkpoints(run_dir)[-1][1]
        (bad / ".metadata").unlink()
        train(config(data_dir, run_dir, "train.steps=4", f"checkpoint.resume={bad}"))


def test_interrupted_final_evaluation_runs_on_the_rerun(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(config(data_dir, run_dir, "train.steps=3"))
    (run_dir / "eval.json").unlink()   # what a kill during the final evaluation leaves
    summary = train(config(data_dir, run_dir, "train.steps=3"))
    assert summary["losses"] == {} and json.loads((run_dir / "eval.json").read_text())["step"] == 2
    again = train(config(data_dir, run_dir, "train.steps=3"))
    assert again["eval"] == {}                                      # done once, not repeated


def test_checkpoint_dir_outside_the_run_directory(data_dir, tmp_path):
    from pretrain.model_loading import load_model

    shared = tmp_path / "shared" / "ckpts"
    run_dir = tmp_path / "run"
    train(config(data_dir, run_dir, "train.steps=4", "train.stop_at_step=2", f"checkpoint.dir={shared}"))
    assert (run_dir / "checkpoints").is_symlink() and (shared / "step_00000002" / ".metadata").is_file()
    summary = train(config(data_dir, run_dir, "train.steps=4", f"checkpoint.dir={shared}"))
    assert sorted(summary["losses"]) == [2, 3]
    model, tokenizer = load_model(run_dir)
    assert tokenizer is not None and model.cfg.n_layers == 4
    with pytest.raises(ConfigError, match="checkpoint.dir=.*already links to"):
        train(config(data_dir, run_dir, "train.steps=4", f"checkpoint.dir={tmp_path / 'elsewhere'}"))


def test_wandb_resume_keeps_the_run_id(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(config(data_dir, run_dir, "train.steps=4", "train.stop_at_step=2", "logging.wandb.mode=offline"))
    first = (run_dir / "wandb_run_id").read_text().strip()
    train(config(data_dir, run_dir, "train.steps=4", "logging.wandb.mode=offline"))
    assert (run_dir / "wandb_run_id").read_text().strip() == first
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # W&B names an invocation's folder offline-run-<time>-<id>, adding -N when two start in one second
    assert runs and all(re.fullmatch(rf"offline-run-\d{{8}}_\d{{6}}-{first}(-\d+)?", name) for name in runs), runs


def test_full_disk_during_training_is_one_clear_error(data_dir, tmp_path, monkeypatch):
    """ENOSPC while the trainer writes a checkpoint (simulated in DCP's file writer): a
    CheckpointWriteError naming the step and the disk, the partial directory gone, the previous
    checkpoint and metrics.jsonl intact, and the rerun resumes."""
    import errno

    import torch.distributed.checkpoint.filesystem as dcp_fs
    from pretrain.checkpoint.writer import CheckpointWriteError

    run_dir = tmp_path / "run"
    train(config(data_dir, run_dir, "train.steps=6", "train.stop_at_step=2"))
    real = dcp_fs._write_item

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp_fs, "_write_item", full)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint step 4 .*disk full"):
        train(config(data_dir, run_dir, "train.steps=6", "checkpoint.every=2"))
    monkeypatch.setattr(dcp_fs, "_write_item", real)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name != ".lock") == ["step_00000002"]
    summary = train(config(data_dir, run_dir, "train.steps=6", "checkpoint.every=2"))
    assert sorted(summary["losses"]) == [2, 3, 4, 5]
    assert [s for s, _ in train_losses(run_dir)] == list(range(6))
