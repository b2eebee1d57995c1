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
