"""Hydra composition, overrides, presets, and early, clear errors for bad values."""
import subprocess
import sys

import pytest

from pretrain.config import ConfigError, RunConfig, compose_run_config


def compose_run(*overrides: str) -> RunConfig:
    return compose_run_config(list(overrides))[0]


def test_defaults_compose_and_overrides_apply():
    cfg = compose_run("train.steps=200", "layerskip.layer_dropout.p_max=0.2", "model=tiny")
    assert cfg.train.steps == 200
    assert cfg.layerskip.layer_dropout.p_max == 0.2
    assert cfg.model.dim == 64 and cfg.run_dir == "runs/layerskip"


def test_presets_set_the_two_regimes():
    scratch = compose_run("preset=from_scratch")
    assert scratch.layerskip.layer_dropout.time_scale == "exp"
    continual = compose_run("preset=continual")
    assert continual.layerskip.layer_dropout.time_scale == "constant"
    assert continual.optim.lr < scratch.optim.lr
    demo = compose_run("preset=demo")
    assert demo.run_dir == "runs/demo" and demo.model.n_layers == 6


@pytest.mark.parametrize("override, key", [
    ("layerskip.early_exit.exit_layers=[0,2]", "layerskip.early_exit.exit_layers"),
    ("layerskip.early_exit.exit_layers=[13]", "layerskip.early_exit.exit_layers"),
    ("layerskip.layer_dropout.p_max=1.0", "layerskip.layer_dropout.p_max"),
    ("layerskip.layer_dropout.p_max=-0.1", "layerskip.layer_dropout.p_max"),
    ("layerskip.layer_dropout.depth_scale=cubic", "layerskip.layer_dropout.depth_scale"),
    ("layerskip.layer_dropout.time_scale=fast", "layerskip.layer_dropout.time_scale"),
    ("layerskip.early_exit.curriculum=random", "layerskip.early_exit.curriculum"),
    ("layerskip.early_exit.importance=cube", "layerskip.early_exit.importance"),
    ("train.seq_len=4096", "train.seq_len"),
    ("train.global_batch_size=12", "train.global_batch_size"),
    ("optim.decay=step", "optim.decay"),
    ("model.n_kv_heads=5", "model.n_kv_heads"),
    ("train.dtype=float16", "train.dtype"),
    ("train.compile_backend=tensorrt", "train.compile_backend"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose_run(override)


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.steps"):
        compose_run("train.steps=lots")


def test_unknown_key_is_rejected():
    with pytest.raises(Exception, match="trian"):
        compose_run("+trian.steps=3")


def test_cli_reports_config_error_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.train", "model=tiny",
                           "layerskip.layer_dropout.p_max=1.5", f"run_dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "layerskip.layer_dropout.p_max" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- the CLI refuses bad input before any work: exit 2, one line naming the key, nothing written

BASE = ["model=tiny", "train.seq_len=32", "train.steps=2", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.device=cpu", "logging.wandb.mode=disabled", "logging.progress_bar=false", "eval.batches=1",
        "eval.batch_size=2", "eval.decode_prompts=0"]


@pytest.fixture(scope="module")
def bad_sources(prepared_data, tmp_path_factory):
    """Data with an empty validation split; an HF model this project cannot represent; an HF model
    whose vocabulary is smaller than the data's tokenizer."""
    import json
    import shutil

    from pretrain.hf_interop import hf_config_from_model_config
    from pretrain.model import ModelConfig

    tmp = tmp_path_factory.mktemp("bad")
    empty_val = tmp / "empty_val"
    shutil.copytree(prepared_data, empty_val)
    manifest = json.loads((empty_val / "manifest.json").read_text())
    manifest["splits"]["val"] = {"shards": [], "samples": 0}
    (empty_val / "manifest.json").write_text(json.dumps(manifest))
    shape = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    for name, edit in (("mistral", {"model_type": "mistral"}), ("small_vocab", {})):
        (tmp / name).mkdir()
        (tmp / name / "config.json").write_text(json.dumps({**hf_config_from_model_config(shape), **edit}))
    return {"data": prepared_data, "empty_val": empty_val, "mistral": tmp / "mistral", "small_vocab": tmp / "small_vocab"}


def cli(run_dir, *overrides, data=None) -> int:
    """pretrain.train's command line, in this process; its exit code."""
    from pretrain.train import main

    try:
        main([*BASE, f"run_dir={run_dir}", *([f"data.dir={data}"] if data else []), *overrides])
    except SystemExit as leave:
        return leave.code
    return 0


@pytest.mark.parametrize("override, key", [
    ("eval.batch_size=0", "eval.batch_size"),
    ("eval.batches=0", "eval.batches"),
    ("eval.max_draft_len=0", "eval.max_draft_len"),
    ("preset=form_scratch", "preset"),
    ("model=tinyy", "model"),
    ("model.dim=-64", "model.dim"),
    ("model.ffn_dim=0", "model.ffn_dim"),
    ("data.dir={empty_val}", "data.dir"),                       # empty validation split, found at start
    ("checkpoint.init_from={mistral}", "checkpoint.init_from"),  # unsupported HF model
    ("checkpoint.init_from={small_vocab}", "checkpoint.init_from"),  # data tokenizer larger than the model
])
def test_bad_input_exits_2_naming_the_key_before_writing(bad_sources, tmp_path, capsys, override, key):
    run_dir = tmp_path / "run"
    code = cli(run_dir, override.format(**bad_sources), data=bad_sources["data"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("config error: ") and key in err[0], err
    assert not run_dir.exists()


def test_failed_resume_with_other_data_leaves_the_run_directory_alone(bad_sources, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(run_dir, "train.stop_at_step=1", data=bad_sources["data"]) == 0
    recorded = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json")}
    assert {"config.yaml", "tokenizer.json", "overrides.yaml"} <= {p.name for p in recorded}
    capsys.readouterr()
    assert cli(run_dir, data=bad_sources["empty_val"]) == 2
    assert "data.dir" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in recorded} == recorded


def test_data_with_another_tokenizer_than_the_run_or_the_initial_model_is_refused(bad_sources, tmp_path, capsys):
    """Same vocabulary size, other token ids: caught before any work, nothing written."""
    import json
    import shutil

    other = tmp_path / "other_tokenizer"
    shutil.copytree(bad_sources["data"], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids
    (other / "tokenizer.json").write_text(json.dumps(tok))

    run_dir = tmp_path / "run"
    assert cli(run_dir, "train.stop_at_step=1", data=bad_sources["data"]) == 0
    recorded = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert cli(run_dir, data=other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint.resume" in err[0] and "2 token ids" in err[0], err
    assert {p: p.read_bytes() for p in recorded} == recorded

    init = tmp_path / "init"  # an exported model dir with the original tokenizer
    init.mkdir()
    shutil.copy(bad_sources["data"] / "tokenizer.json", init / "tokenizer.json")
    from pretrain.trainer.preflight import check_tokenizers

    cfg = RunConfig()
    cfg.data.dir, cfg.run_dir, cfg.checkpoint.init_from = str(other), str(tmp_path / "fresh"), str(init)
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        check_tokenizers(cfg)
    cfg.data.dir = str(bad_sources["data"])
    check_tokenizers(cfg)  # the same tokenizer passes
