"""Checkpoint storage: checksums, resume fallback past each kind of damage, a full disk, the
asynchronous writer (snapshot, overlap, keep-last-K order), checkpoint.dir."""
import errno
import json
import threading

import pytest
import torch

import pretrain.checkpoint.writer as writer_mod
import torch.distributed.checkpoint.filesystem as dcp_fs
from pretrain.checkpoint.checksums import CHECKSUMS, checksum_problem
from pretrain.checkpoint.errors import CheckpointWriteError, NoSoundCheckpoint
from pretrain.checkpoint.__main__ import main as checkpoint_cli
from pretrain.checkpoint.integrity import all_finite, checkpoint_problem
from pretrain.checkpoint.layout import list_checkpoints
from pretrain.checkpoint.loader import choose_checkpoint, load_newest_good, load_sound
from pretrain.checkpoint.store import load_checkpoint
from pretrain.checkpoint.writer import CheckpointWriter, save_checkpoint
from pretrain.model import LayerSkipTransformer


def _model(cfg, seed):
    torch.manual_seed(seed)
    model = LayerSkipTransformer(cfg)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _save(run_dir, step, model, opt, keep=5):
    return save_checkpoint(run_dir, step, model, opt, {"data": {"pos": step}}, "model: {}\n", keep)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _damage(ckpt, kind):
    if kind == "truncated_dcp":
        f = next(ckpt.glob("*.distcp"))
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif kind == "garbage_dcp":
        f = next(ckpt.glob("*.distcp"))
        data = bytearray(f.read_bytes())
        data[100:110] = b"\xff" * 10   # same size: only the checksum can tell
        f.write_bytes(bytes(data))
    elif kind == "bad_metadata":
        (ckpt / ".metadata").write_bytes(b"not a pickle")
    elif kind == "bad_trainer_state":
        (ckpt / "trainer_state.json").write_text('{"step": 2, "data"')
    elif kind == "truncated_rng":
        f = ckpt / "rng_rank0.pt"
        f.write_bytes(f.read_bytes()[:40])


KINDS = ["truncated_dcp", "garbage_dcp", "bad_metadata", "bad_trainer_state", "truncated_rng"]


@pytest.mark.parametrize("kind", KINDS)
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, tiny_cfg, kind):
    model, opt = _model(tiny_cfg, 0)
    _save(tmp_path, 1, model, opt)
    good = _params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    newest = _save(tmp_path, 2, model, opt)
    assert checkpoint_problem(newest) is None
    _damage(newest, kind)
    assert checkpoint_problem(newest) is not None
    lines = []
    candidates, start = choose_checkpoint(tmp_path, lines.append)
    assert [c.name for c in candidates] == ["step_00000002", "step_00000001"] and start == 1
    assert len(lines) == 1 and "skipping checkpoint" in lines[0] and "step_00000002" in lines[0]
    fresh, fresh_opt = _model(tiny_cfg, 1)
    path, state = load_newest_good(candidates, start, lambda p: load_checkpoint(p, fresh, fresh_opt),
                                   lines.append, world_size=1)
    assert path.name == "step_00000001" and state["step"] == 1 and state["data"] == {"pos": 1}
    assert _same(_params(fresh), good)


def test_a_checkpoint_without_checksums_is_not_trusted_and_resume_falls_back(tmp_path, tiny_cfg):
    """checksums.json deleted from the newest checkpoint, whose weights then got a flipped byte
    (same size): nothing can verify it, so it is skipped with a line saying why, and the loader
    takes the older, verified one (it used to load the flipped bytes silently)."""
    model, opt = _model(tiny_cfg, 0)
    _save(tmp_path, 1, model, opt)
    good = _params(model)
    newest = _save(tmp_path, 2, model, opt)
    (newest / CHECKSUMS).unlink()
    _damage(newest, "garbage_dcp")
    lines = []
    fresh, fresh_opt = _model(tiny_cfg, 1)
    path, state = load_sound(tmp_path, lambda p: load_checkpoint(p, fresh, fresh_opt), report=lines.append)
    assert path.name == "step_00000001" and state["step"] == 1 and _same(_params(fresh), good)
    assert any("step_00000002" in l and "checksums.json is missing" in l and "trust" in l for l in lines)
    with pytest.raises(NoSoundCheckpoint, match="step_00000002 cannot be loaded: checksums.json is missing"):
        load_sound(newest, lambda p: load_checkpoint(p, fresh, fresh_opt))


def test_vouched_for_checkpoints_load_and_a_failing_load_still_falls_back(tmp_path, tiny_cfg, capsys):
    """`python -m pretrain.checkpoint trust` (the explicit override) makes checkpoints without
    checksums loadable; one whose load then fails is skipped for the older one."""
    model, opt = _model(tiny_cfg, 0)
    _save(tmp_path, 1, model, opt)
    newest = _save(tmp_path, 2, model, opt)
    for ckpt in (tmp_path / "checkpoints").iterdir():
        (ckpt / CHECKSUMS).unlink()
    assert choose_checkpoint(tmp_path, lambda line: None)[1] == -1       # neither is trusted
    _damage(newest, "truncated_dcp")    # vouched for as it is: only the load itself can tell
    assert checkpoint_cli(["check", str(tmp_path)]) == 1
    for _, ckpt in list_checkpoints(tmp_path):
        assert checkpoint_cli(["trust", str(ckpt)]) == 0
    assert checkpoint_cli(["check", str(tmp_path)]) == 0     # the truncation was vouched for as it is
    out = capsys.readouterr().out
    assert out.count("checksums.json is missing") == 2 and out.count("wrote") == 2 and out.count(": ok") == 2
    lines = []
    fresh, fresh_opt = _model(tiny_cfg, 1)
    candidates, start = choose_checkpoint(tmp_path, lines.append)
    assert start == 0
    path, state = load_newest_good(candidates, start, lambda p: load_checkpoint(p, fresh, fresh_opt),
                                   lines.append, world_size=1)
    assert path.name == "step_00000001" and state["step"] == 1
    assert any("step_00000002" in l for l in lines)


def test_non_finite_weights_at_load_are_marked_and_skipped_from_then_on(tmp_path, tiny_cfg):
    """A checkpoint that passes every check but holds NaN weights: the first load marks it
    damaged and falls back; the next load skips it without loading it."""
    model, opt = _model(tiny_cfg, 0)
    _save(tmp_path, 1, model, opt)
    good = _params(model)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    bad = _save(tmp_path, 2, model, opt)
    assert checkpoint_problem(bad) is None
    loads, lines = [], []

    def load(path):
        loads.append(path.name)
        return load_checkpoint(path, fresh, fresh_opt)

    def finite(state):
        return None if all_finite(fresh.parameters()) else "non-finite weights at load"

    fresh, fresh_opt = _model(tiny_cfg, 1)
    path, _ = load_sound(tmp_path, load, verify=finite, report=lines.append)
    assert path.name == "step_00000001" and _same(_params(fresh), good)
    assert loads == ["step_00000002", "step_00000001"] and "marked damaged" in checkpoint_problem(bad)
    loads.clear()
    path, _ = load_sound(tmp_path, load, verify=finite, report=lines.append)
    assert path.name == "step_00000001" and loads == ["step_00000001"]   # not loaded again
    with pytest.raises(NoSoundCheckpoint, match="marked damaged .non-finite weights at load"):
        load_sound(bad, load, verify=finite)
    assert checkpoint_cli(["trust", str(bad)]) == 2                     # a mark is not vouched away
    assert checkpoint_cli(["check", str(tmp_path / "nowhere")]) == 2


def test_checksums_catch_a_flipped_byte(tmp_path, tiny_cfg):
    model, opt = _model(tiny_cfg, 0)
    ckpt = _save(tmp_path, 1, model, opt)
    listed = json.loads((ckpt / CHECKSUMS).read_text())
    assert {".metadata", "trainer_state.json", "rng_rank0.pt", "config.yaml"} <= set(listed)
    f = ckpt / "config.yaml"
    f.write_text(f.read_text().replace("m", "n"))
    assert "config.yaml does not match its sha256" in checksum_problem(ckpt)


def _enospc_write_item(*args, **kwargs):
    stream = args[1]
    stream.write(b"\0" * 64)  # a partial file, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("async_save", [False, True])
def test_full_disk_gives_a_clear_error_and_removes_the_partial_directory(tmp_path, tiny_cfg, monkeypatch,
                                                                       async_save):
    model, opt = _model(tiny_cfg, 0)
    _save(tmp_path, 1, model, opt)
    monkeypatch.setattr(dcp_fs, "_write_item", _enospc_write_item)
    writer = CheckpointWriter(async_save=async_save)
    with pytest.raises(CheckpointWriteError, match=r"step 2 .*No space left on device \(disk full"):
        writer.save(tmp_path, 2, [model], [opt], {"data": None}, "x: 1\n", keep=1)
        writer.wait()
    writer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    monkeypatch.undo()
    writer = CheckpointWriter(async_save=async_save)  # the retry is not blocked by leftovers
    writer.save(tmp_path, 2, [model], [opt], {"data": None}, "x: 1\n", keep=1)
    writer.close()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]


def test_async_save_snapshots_the_state_and_prunes_only_after_completion(tmp_path, tiny_cfg, monkeypatch):
    model, opt = _model(tiny_cfg, 0)
    for step in (1, 2):
        _save(tmp_path, step, model, opt, keep=2)
    release = threading.Event()
    original = writer_mod.finalize_checkpoint

    def held_finalize(*args, **kwargs):
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "finalize_checkpoint", held_finalize)
    writer = CheckpointWriter(async_save=True)
    before = _params(model)
    writer.save(tmp_path, 3, [model], [opt], {"data": None}, "x: 1\n", keep=2)
    with torch.no_grad():     # the next optimizer step changes the weights while the save runs
        for p in model.parameters():
            p.mul_(-2.0)
    assert writer.in_flight == 3 and not writer.done()
    # nothing is pruned, and step 3 is not visible, before it is complete
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2]
    release.set()
    writer.close()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    assert writer.last_blocking_s < writer.last_total_s
    fresh, fresh_opt = _model(tiny_cfg, 1)
    load_checkpoint(list_checkpoints(tmp_path)[-1][1], fresh, fresh_opt)
    assert _same(_params(fresh), before)
