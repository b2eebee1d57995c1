"""The Checkpointer (pretrain/checkpoint/): when it saves, the lock on the directory the
checkpoints live in, clear refusals on resume, and eval / generate / export reading through the
loader resume uses (checksums required, fallback, damage marks)."""
import json
import time

import pytest
import torch

from pretrain.checkpoint.checksums import CHECKSUMS
from pretrain.checkpoint.errors import CheckpointDirInUse
from pretrain.checkpoint.layout import list_checkpoints
from pretrain.checkpoint.lock import DirectoryLock
from pretrain.checkpoint.policy import SavePolicy
from pretrain.config import ConfigError
from pretrain.trainer.loop import train
from tests.test_trainer_loop import data_dir  # noqa: F401 - the fixture
from tests.test_trainer_loop import run_config as trainer_run_config


def run_config(data_dir, run_dir, *overrides):
    return trainer_run_config(data_dir, run_dir, "eval.batches=1", "eval.decode_prompts=0", "train.device=cpu",
                              *overrides)


def files_under(directory):
    """{relative path: bytes} of every file (links followed), lock files aside."""
    return {str(f.relative_to(directory)): f.read_bytes() for f in sorted(directory.rglob("*"))
            if f.is_file() and f.name != ".lock"}


def test_save_policy():
    """Independent restatement: stop or last step -> blocking save; every N steps or the clock ->
    background save, but only after a clean (finite) step."""
    policy = SavePolicy(every=3, every_minutes=1.0, end=10)
    for done in range(1, 11):
        for stop in (False, True):
            for due in (False, True):
                for clean in (False, True):
                    got = policy.decide(done, stop=stop, minutes_due=due, clean=clean)
                    must = stop or done == 10
                    assert got.save == (must or ((done % 3 == 0 or due) and clean)), (done, stop, due, clean)
                    assert got.blocking == must
    assert policy.minutes_due(1000.0, 1000.0 - 60.0) and not policy.minutes_due(1000.0, 1000.0 - 59.0)
    assert not SavePolicy(every_minutes=0.0).minutes_due(1e9, 0.0)


def test_two_runs_sharing_a_checkpoint_dir_are_locked_against_each_other(data_dir, tmp_path):
    """Run A trains into a shared checkpoint.dir and is still running (it holds the directory's
    lock); run B, another run directory on the same checkpoint.dir, stops at once naming A, and
    A's checkpoints are untouched (B used to resume from them and overwrite A's newest). Once A
    is done, B is still refused: the directory belongs to A."""
    shared = tmp_path / "shared"
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    train(run_config(data_dir, run_a, "train.steps=4", "train.stop_at_step=2", f"checkpoint.dir={shared}"))
    before = files_under(shared)
    held = DirectoryLock(shared, run_a).acquire()        # A, running again
    try:
        with pytest.raises(CheckpointDirInUse, match=f"checkpoint directory {shared} is in use by another "
                                                     f"trainer \\(run {run_a}, pid \\d+"):
            train(run_config(data_dir, run_b, "train.steps=4", f"checkpoint.dir={shared}"))
    finally:
        held.release()
    assert files_under(shared) == before
    assert not (run_b / "metrics.jsonl").exists()
    # the lock is the run's for its whole length, and goes with it
    train(run_config(data_dir, run_a, "train.steps=4", f"checkpoint.dir={shared}"))
    assert [s for s, _ in list_checkpoints(run_a)] == [2, 4]
    # A has finished: B still may not continue (and prune) A's final checkpoints
    after = files_under(shared)
    with pytest.raises(ConfigError, match=f"checkpoint.dir=.*holds the checkpoints of run {run_a}"):
        train(run_config(data_dir, run_b, "train.steps=6", f"checkpoint.dir={shared}"))
    assert files_under(shared) == after


def test_a_deadline_already_past_is_refused_before_any_step(data_dir, tmp_path, monkeypatch):
    requeue = tmp_path / "requeue.json"
    monkeypatch.setenv("LAYERSKIP_DEADLINE", str(time.time() - 100))
    monkeypatch.setenv("LAYERSKIP_REQUEUE_FILE", str(requeue))
    with pytest.raises(ConfigError, match=r"LAYERSKIP_DEADLINE=\d+: the deadline passed \d+ s ago"):
        train(run_config(data_dir, tmp_path / "run", "train.steps=3"))
    assert not requeue.exists() and list_checkpoints(tmp_path / "run") == []


def test_resume_with_another_model_shape_or_batch_size_is_a_clear_error(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(run_config(data_dir, run_dir, "train.steps=4", "train.stop_at_step=2"))
    before = files_under(run_dir / "checkpoints")
    with pytest.raises(ConfigError, match=r"model\.dim=128 \(the checkpoint has 64\).*another model") as err:
        train(run_config(data_dir, run_dir, "train.steps=4", "model.dim=128"))
    assert "overwrite" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size: the checkpoint was saved with "
                                          r"global_batch_size=8 but this run has global_batch_size=16"):
        train(run_config(data_dir, run_dir, "train.steps=4", "train.global_batch_size=16"))
    with pytest.raises(ConfigError, match=r"train\.seed: the checkpoint was saved with seed=\d+ but this run has "
                                          r"seed=1234; resuming would feed a different sample order"):
        train(run_config(data_dir, run_dir, "train.steps=4", "train.seed=1234"))
    assert files_under(run_dir / "checkpoints") == before       # nothing skipped, marked or deleted
    assert sorted(train(run_config(data_dir, run_dir, "train.steps=4"))["losses"]) == [2, 3]


def test_resume_with_another_data_mix_is_a_clear_error(data_dir, tmp_path):
    def mix(a, b):
        return f"data.sources=[{{dir: '{data_dir}', weight: {a}}}, {{dir: '{data_dir}', weight: {b}}}]"

    run_dir = tmp_path / "run"
    train(run_config(data_dir, run_dir, "train.steps=4", "train.stop_at_step=2", mix(0.7, 0.3)))
    before = files_under(run_dir / "checkpoints")
    with pytest.raises(ConfigError, match=r"data\.sources \(the mix\): the checkpoint was saved with sources=.*0\.7.*"
                                          r"but this run has sources=.*0\.5"):
        train(run_config(data_dir, run_dir, "train.steps=4", mix(0.5, 0.5)))
    assert files_under(run_dir / "checkpoints") == before
    assert sorted(train(run_config(data_dir, run_dir, "train.steps=4", mix(0.7, 0.3)))["losses"]) == [2, 3]


@pytest.fixture(scope="module")
def damaged_run(data_dir, tmp_path_factory):
    """A run with checkpoints 1 and 2 where step 2 lost its checksums.json and then got flipped
    bytes in its weights (same size): nothing can tell it from a sound one but the checksums."""
    run_dir = tmp_path_factory.mktemp("damaged") / "run"
    train(run_config(data_dir, run_dir, "train.steps=2", "checkpoint.every=1", "checkpoint.keep=2"))
    newest = list_checkpoints(run_dir)[-1][1]
    (newest / CHECKSUMS).unlink()
    f = next(newest.glob("*.distcp"))
    data = bytearray(f.read_bytes())
    data[200:260] = b"\x7f" * 60
    f.write_bytes(bytes(data))
    return run_dir


def test_eval_generate_and_export_use_the_resume_loader(damaged_run, tmp_path, capsys):
    """Each entry point skips the unverifiable newest checkpoint with a line saying why and uses
    the older one; named explicitly, the damaged one is refused in one line (exit 2)."""
    from pretrain import eval as eval_cli
    from pretrain import generate as generate_cli
    from pretrain.hf_interop.__main__ import main as hf_main

    older, newest = [p for _, p in list_checkpoints(damaged_run)]
    out = tmp_path / "eval.json"
    assert eval_cli.main(["--checkpoint", str(damaged_run), "--batches", "1", "--decode-prompts", "0",
                          "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["checkpoint"] == str(older)
    assert hf_main(["export", "--checkpoint", str(damaged_run), "--out", str(tmp_path / "hf")]) == 0
    with torch.no_grad():
        assert generate_cli.main(["--checkpoint", str(damaged_run), "--prompt", "def", "--max-new-tokens", "2",
                                  "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    exported = json.loads([l for l in captured.out.splitlines() if l.startswith('{"exported"')][0])
    assert exported["source"] == str(older)
    skipped = [l for l in captured.err.splitlines() if "skipping checkpoint" in l]
    assert len(skipped) == 3 and all(newest.name in l and "checksums.json is missing" in l for l in skipped)
    for main, args in ((eval_cli.main, ["--checkpoint", str(newest), "--device", "cpu"]),
                       (generate_cli.main, ["--checkpoint", str(newest), "--prompt", "x", "--device", "cpu"]),
                       (hf_main, ["export", "--checkpoint", str(newest), "--out", str(tmp_path / "hf2")])):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot be loaded: checksums.json is missing" in err[0], err
    assert not (tmp_path / "hf2").exists()
