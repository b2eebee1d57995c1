"""The first hour with the configuration (issue 20 items 3 and 5): model.vocab_size=auto takes the
data's tokenizer; Hydra's `--cfg job` / `--print-config`; "did you mean" for misspelt keys; every
error stays one line with exit code 2."""
import pytest
import yaml

from pretrain.cli_overrides import parse_command_line, schema_keys
from pretrain.config import ConfigError, RunConfig, compose_run_config
from pretrain.data.dataset import read_manifest
from pretrain.trainer.preflight import check_run
from pretrain.trainer.vocab import padded_vocab, resolve_vocab_size


def run_train(capsys, *args: str) -> tuple[int, str, str]:
    """pretrain.train's command line in this process: (exit code, stdout, stderr)."""
    from pretrain.train import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as leave:
        code = leave.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- model.vocab_size=auto

def test_every_model_group_takes_its_vocabulary_from_the_data(prepared_data):
    data_vocab = read_manifest(prepared_data)["vocab_size"]
    for model in ("tiny", "demo", "small"):
        cfg = compose_run_config([f"model={model}", f"data.dir={prepared_data}", "train.seq_len=32",
                                  "train.device=cpu"])[0]
        assert cfg.model.vocab_size == "auto"
        if model == "tiny":  # the others are too large to open quickly; the resolution is the same
            assert check_run(cfg, 1).cfg.model.vocab_size == data_vocab
        assert resolve_vocab_size(cfg).model.vocab_size == data_vocab


def test_auto_vocabulary_is_padded_to_the_tensor_parallel_degree(prepared_data):
    data_vocab = read_manifest(prepared_data)["vocab_size"]
    cfg = compose_run_config(["model=tiny", f"data.dir={prepared_data}", "parallel.tp=3"])[0]
    resolved = resolve_vocab_size(cfg).model.vocab_size
    assert resolved % 3 == 0 and data_vocab <= resolved < data_vocab + 3
    assert [padded_vocab(v, 4) for v in (1, 4, 5, 8)] == [4, 4, 8, 8]


def test_an_explicit_vocabulary_below_the_tokenizer_names_both_numbers_and_the_override(prepared_data):
    data_vocab = read_manifest(prepared_data)["vocab_size"]
    cfg = compose_run_config(["model=tiny", f"data.dir={prepared_data}", "train.seq_len=32", "train.device=cpu",
                              f"model.vocab_size={data_vocab - 16}"])[0]
    with pytest.raises(ConfigError) as err:
        check_run(cfg, 1)
    message = str(err.value)
    assert f"{data_vocab} tokens" in message and f"model.vocab_size={data_vocab - 16}" in message
    assert "model.vocab_size=auto" in message
    larger = compose_run_config(["model=tiny", f"data.dir={prepared_data}", "train.seq_len=32", "train.device=cpu",
                                 f"model.vocab_size={data_vocab + 16}"])[0]
    assert check_run(larger, 1).cfg.model.vocab_size == data_vocab + 16  # padding is kept


# ---- --cfg job, did you mean

def test_cfg_job_prints_the_composed_config_and_exits(tmp_path, capsys):
    code, out, err = run_train(capsys, "--cfg", "job", "model=tiny", "train.steps=7", f"run_dir={tmp_path}/run")
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 7 and printed["model"]["dim"] == 64
    assert set(printed) == set(compose_run_config(["model=tiny"])[1])
    assert not (tmp_path / "run").exists()
    resolved = yaml.safe_load(run_train(capsys, "--print-config", "--resolve", "name=x")[1])
    assert resolved["run_dir"] == "runs/x"


@pytest.mark.parametrize("override, suggestion", [
    ("train.stpes=3", "did you mean train.steps?"),
    ("trian.steps=3", "did you mean train.steps?"),
    ("+layerskip.early_exit.curriculm=gradual", "did you mean layerskip.early_exit.curriculum?"),
    ("data.sources=[{dir: a, wieght: 1}]", "did you mean weight?"),
])
def test_a_misspelt_key_gets_the_closest_one(override, suggestion):
    with pytest.raises(ConfigError, match=suggestion.replace(".", r"\.").replace("?", r"\?")):
        compose_run_config([override])


def test_command_line_errors_are_one_line_with_exit_2(capsys):
    for args in (["train.stpes=3"], ["--cfg", "hydra"], ["--frobnicate"]):
        code, _, err = run_train(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("config error: "), err
    assert "did you mean train.steps?" in run_train(capsys, "train.stpes=3")[2]


def test_parse_command_line_keeps_the_overrides_in_order():
    line = parse_command_line(["a=1", "--cfg", "job", "b=2", "--resolve"])
    assert line.overrides == ["a=1", "b=2"] and line.print_config and line.resolve
    assert not parse_command_line(["a=1"]).print_config
    keys = schema_keys(RunConfig)
    assert "layerskip.layer_dropout.p_max" in keys and keys["data.sources"] and not keys["train"]
