"""`pretrain.eval` never reports a wrong evaluation as right (issue 17 items 4 and 6): a checkpoint
with non-finite weights and data of another tokenizer are refused with one line (exit 2, eval.json
unchanged); a worse-founded evaluation is written beside the run's eval.json, not over it;
`pretrain.generate` does not take (E, γ) from an unsound eval.json; bad flags are one-line errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.operations.nonfinite import finite_tree
from hydra import compose, initialize_config_dir

from pretrain.checkpoint.writer import save_checkpoint
from pretrain.config import to_run_config
from pretrain.eval import main as eval_main
from pretrain.generate import best_from_eval
from pretrain.model_loading import load_model
from pretrain.trainer.loop import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def run(prepared_data, tmp_path_factory):
    """3 steps of a tiny model; the trainer's final evaluation (2 batches of 4) is eval.json."""
    run_dir = tmp_path_factory.mktemp("eval_faults") / "run"
    overrides = ["model=tiny", f"data.dir={prepared_data}", f"run_dir={run_dir}", "train.seq_len=32",
                 "train.steps=3", "train.global_batch_size=4", "train.micro_batch_size=4", "logging.every=1",
                 "logging.progress_bar=false", "logging.wandb.mode=disabled", "eval.batches=2",
                 "eval.batch_size=4", "eval.decode_prompts=0"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        train(to_run_config(compose(config_name="config", overrides=overrides)))
    return run_dir


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_checkpoint_with_nonfinite_weights_is_refused(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "eval.json").read_bytes()
    model, _ = load_model(copy)
    with torch.no_grad():
        model.layers["1"].feed_forward.w2.weight[0, 0] = float("nan")
    bad = save_checkpoint(copy, 4, model, [], {}, (copy / "config.yaml").read_text(), keep=5)
    assert eval_main(["--checkpoint", str(bad), "--decode-prompts", "0"]) == 2   # named: refused
    err = capsys.readouterr().err   # the mark it leaves (a warning), then the one-line error
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: ")
    assert "non-finite weights" in err.splitlines()[-1] and "step_00000004" in err.splitlines()[-1], err
    assert (copy / "eval.json").read_bytes() == before
    # the run directory: the loader skips the (now marked) checkpoint and evaluates the newest sound one
    assert eval_main(["--checkpoint", str(copy), "--decode-prompts", "0"]) == 0
    out = capsys.readouterr()
    assert "step_00000004" in out.err and "nan" not in out.out.lower()
    written = json.loads((copy / "eval.json").read_text())   # the sound checkpoint's, which it may replace
    assert "step_00000004" not in written["checkpoint"] and finite_tree(written)


def test_data_of_another_tokenizer_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    subprocess.run([sys.executable, "-m", "pretrain.data.prepare", "--out", str(other), "--max-files", "10",
                    "--vocab-size", "300", "--seq-len", "32"], check=True, capture_output=True, timeout=300)
    before = (run / "eval.json").read_bytes()
    assert eval_main(["--checkpoint", str(run), "--data-dir", str(other), "--decode-prompts", "0"]) == 2
    one_line_error(capsys, f"--data-dir {other}", "tokenizer differs", "token ids")
    assert (run / "eval.json").read_bytes() == before


def test_worse_founded_evaluation_is_written_beside_eval_json(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    good = json.loads((copy / "eval.json").read_text())
    assert good["tokens"] == 2 * 4 * 32  # the trainer's: 2 batches of 4 samples of 32 targets
    # fewer tokens than eval.json rests on: kept, the new one beside it
    assert eval_main(["--checkpoint", str(copy), "--batches", "1", "--batch-size", "2", "--decode-prompts", "0"]) == 0
    out = capsys.readouterr().out
    assert json.loads((copy / "eval.json").read_text()) == good
    beside = copy / "eval-step_00000003.json"
    assert f"kept {copy / 'eval.json'}" in out and "fewer tokens (64 < 256)" in out and str(beside) in out
    assert json.loads(beside.read_text())["tokens"] == 64
    # as many tokens or more, same data and checkpoint: replaces it, and says so
    assert eval_main(["--checkpoint", str(copy), "--batches", "3", "--batch-size", "4", "--decode-prompts", "0"]) == 0
    assert f"replaced {copy / 'eval.json'}" in capsys.readouterr().out
    assert json.loads((copy / "eval.json").read_text())["tokens"] == 3 * 4 * 32


def test_generate_does_not_take_e_and_gamma_from_an_unsound_eval_json(tmp_path, capsys):
    sound = {"exits": {"1": {"loss": 3.0}}, "best": {"exit_layer": 2, "draft_len": 3, "speedup": 1.4}}
    (tmp_path / "eval.json").write_text(json.dumps(sound))
    assert best_from_eval(str(tmp_path), n_layers=4) == sound["best"]
    for bad in ({**sound, "exits": {"1": {"loss": float("nan")}}},
                {**sound, "best": {"exit_layer": 4, "draft_len": 3}},      # the last layer is no draft
                {**sound, "best": {"exit_layer": 2, "draft_len": 0}}):
        (tmp_path / "eval.json").write_text(json.dumps(bad))
        assert best_from_eval(str(tmp_path), n_layers=4) == {}
        assert "not a sound evaluation" in capsys.readouterr().err


def test_bad_flags_and_paths_are_one_line_errors(run, tmp_path, capsys):
    for flag in ("--batches", "--batch-size", "--max-draft-len", "--decode-new-tokens"):
        with pytest.raises(SystemExit) as exit_:
            eval_main(["--checkpoint", str(run), flag, "0"])
        assert exit_.value.code == 2
        assert f"argument {flag}: 0 must be >= 1" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(run), "--out", str(tmp_path / "missing" / "e.json")]) == 2
    one_line_error(capsys, "--out", "does not exist")
    (tmp_path / "file").write_text("x")
    assert eval_main(["--checkpoint", str(tmp_path / "file")]) == 2
    one_line_error(capsys, "is a file")
    # a manifest that understates the vocabulary (the shards hold larger token ids)
    data = tmp_path / "data"
    shutil.copytree(_data_dir(run), data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["vocab_size"] = 50
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert eval_main(["--checkpoint", str(run), "--data-dir", str(data), "--decode-prompts", "0"]) == 2
    one_line_error(capsys, "understates the vocabulary")


def _data_dir(run: Path) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(run / "config.yaml").data.dir


def test_a_nonfinite_evaluation_never_becomes_eval_json(tmp_path):
    from pretrain.evaluation.eval_file import destination
    from pretrain.operations.nonfinite import finite_tree

    path = tmp_path / "eval.json"
    bad = {"exits": {"1": {"loss": float("nan")}}, "checkpoint_step": 3, "tokens": 64}
    where, note = destination(path, bad, finite_tree)  # even with no eval.json yet
    assert where == tmp_path / "eval-step_00000003.json" and "non-finite" in note
    path.write_text('{"exits": {"1": {"loss": NaN}}, "step": 9}')  # a bad one from an older version
    good = {"exits": {"1": {"loss": 3.0}}, "checkpoint_step": 3, "tokens": 64}
    assert destination(path, good, finite_tree) == (path, f"replaced {path}, which held non-finite values")


def test_per_exit_evaluation_keeps_the_downstream_results_of_eval_json(run, tmp_path):
    """`pretrain.eval --tasks` writes its results under eval.json's "downstream" key; a later
    per-exit evaluation replacing eval.json keeps them (they name their own checkpoint)."""
    from pretrain.downstream.report import merge_into_eval_json

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    downstream = {"checkpoint": str(copy / "checkpoints" / "step_00000003"), "exits": {"2": {"task": {"value": 0.5}}}}
    merge_into_eval_json(copy / "eval.json", downstream)
    assert eval_main(["--checkpoint", str(copy), "--decode-prompts", "0"]) == 0
    written = json.loads((copy / "eval.json").read_text())
    assert written["downstream"] == downstream and "exits" in written and written["exits"] != downstream["exits"]
