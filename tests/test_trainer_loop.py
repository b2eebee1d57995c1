"""End to end on one process: prepare stdlib data, train a tiny LayerSkip model, log, evaluate,
checkpoint, resume exactly."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import pretrain.checkpoint.store as store
from pretrain.checkpoint.layout import list_checkpoints
from pretrain.config import to_run_config
from pretrain.trainer.loop import train

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@pytest.fixture(scope="module")
def data_dir(prepared_data):
    return prepared_data


def run_config(data_dir, run_dir, *overrides):
    base = ["model=tiny", f"data.dir={data_dir}", f"run_dir={run_dir}", "train.seq_len=32",
            "train.global_batch_size=8", "train.micro_batch_size=4", "optim.lr=3e-3",
            "optim.warmup_steps=5", "logging.every=1", "logging.progress_bar=false",
            "logging.wandb.mode=disabled", "eval.batches=2", "eval.batch_size=4",
            "layerskip.layer_dropout.p_max=0.3", "layerskip.early_exit.rotation_period=2"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=base + list(overrides)))


def read_metrics(run_dir, kind="train"):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_training_lowers_loss_and_logs_everything(data_dir, tmp_path):
    cfg = run_config(data_dir, tmp_path / "run", "train.steps=40")
    summary = train(cfg)
    losses = [summary["losses"][s] for s in range(40)]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(40))
    first = records[0]
    for key in ("loss", "exit_loss", "lr", "grad_norm", "tokens_per_s", "layer_dropout_rate"):
        assert key in first
    assert len(first["layer_dropout_rate"]) == 4
    # rotational R=2 over exits 1..4: steps alternate between {2, 4} and {1, 3, 4}
    assert sorted(map(int, records[0]["exit_loss"])) == [2, 4]
    assert sorted(map(int, records[1]["exit_loss"])) == [1, 3, 4]
    # from scratch: S(t) = exp ramps dropout up over training, D = exp is 0 at block 0
    assert records[0]["layer_dropout_rate"][-1] == 0.0
    assert records[-1]["layer_dropout_rate"][-1] == pytest.approx(0.3)
    assert records[-1]["layer_dropout_rate"][0] == 0.0
    assert records[-1]["blocks_run_fraction"] < 1.0
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert sorted(map(int, evaluation["exits"])) == [1, 2, 3, 4]
    assert evaluation["exits"]["4"]["agreement"] == 1.0
    assert 1 <= evaluation["best"]["exit_layer"] <= 3
    assert list_checkpoints(tmp_path / "run")[-1][1].name == "step_00000040"


def test_resume_reproduces_uninterrupted_losses(data_dir, tmp_path):
    full = train(run_config(data_dir, tmp_path / "full", "train.steps=10"))["losses"]
    part = train(run_config(data_dir, tmp_path / "split", "train.steps=10", "train.stop_at_step=4",
                            "checkpoint.every=2"))["losses"]
    rest = train(run_config(data_dir, tmp_path / "split", "train.steps=10"))["losses"]
    assert sorted(part) == [0, 1, 2, 3] and sorted(rest) == list(range(4, 10))
    resumed = {**part, **rest}
    assert resumed == full  # exact float equality on CPU


def test_crash_mid_save_keeps_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(run_config(data_dir, run_dir, "train.steps=4", "train.stop_at_step=2"))
    assert list_checkpoints(run_dir)[-1][1].name == "step_00000002"

    def crash(*args, **kwargs):
        raise RuntimeError("node died mid-save")

    monkeypatch.setattr(store.dcp, "save", crash)
    with pytest.raises(RuntimeError, match="mid-save"):
        train(run_config(data_dir, run_dir, "train.steps=4"))
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    resumed = train(run_config(data_dir, run_dir, "train.steps=4"))["losses"]
    assert sorted(resumed) == [2, 3]


def test_accumulation_split_gives_same_losses(data_dir, tmp_path):
    a = train(run_config(data_dir, tmp_path / "a", "train.steps=3", "train.micro_batch_size=8"))["losses"]
    b = train(run_config(data_dir, tmp_path / "b", "train.steps=3", "train.micro_batch_size=2"))["losses"]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4


def test_cli_train_then_eval(data_dir, tmp_path):
    run_dir = tmp_path / "cli"
    subprocess.run([sys.executable, "-m", "pretrain.train", "model=tiny", f"data.dir={data_dir}",
                    f"run_dir={run_dir}", "train.seq_len=32", "train.steps=3",
                    "train.global_batch_size=4", "train.micro_batch_size=2",
                    "logging.wandb.mode=offline", "eval.batches=1"],
                   check=True, capture_output=True, timeout=300)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "wandb").is_dir()
    proc = subprocess.run([sys.executable, "-m", "pretrain.eval", "--checkpoint", str(run_dir),
                           "--batches", "2"], check=True, capture_output=True, text=True, timeout=300)
    assert "best self-speculative config" in proc.stdout
    assert json.loads((run_dir / "eval.json").read_text())["checkpoint"].endswith("step_00000003")


def test_seq_len_mismatch_with_data_is_a_config_error(data_dir, tmp_path):
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match="train.seq_len"):
        train(run_config(data_dir, tmp_path / "x", "train.seq_len=16"))


def test_continual_pretraining_from_hf_checkpoint(data_dir, tmp_path):
    """preset=continual with checkpoint.init_from=<HF dir>: the model shape and weights come from
    the checkpoint; the first step's loss equals transformers' loss on the same batch."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrain.data.dataset import PackedDataset
    from pretrain.data.loader import TrainBatches

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=48, intermediate_size=96,
                                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = run_config(data_dir, tmp_path / "run", "preset=continual", f"checkpoint.init_from={tmp_path / 'hf'}",
                     "train.steps=2", "layerskip=off", "layerskip.layer_dropout.p_max=0.0",
                     "train.micro_batch_size=8")
    summary = train(cfg)
    batch = TrainBatches(PackedDataset(data_dir), 8, seed=0).batch(0)
    with torch.no_grad():
        logits = hf(input_ids=batch["tokens"]).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
    assert summary["losses"][0] == pytest.approx(float(expected), rel=1e-5)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "dim: 48" in saved and "tie_embeddings: true" in saved and "time_scale: constant" in saved


def test_generate_cli_on_a_trained_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "gen"
    train(run_config(data_dir, run_dir, "train.steps=3"))
    evaluation = json.loads((run_dir / "eval.json").read_text())
    decoding = evaluation["decoding"]  # measured next to predicted, at the best (E, γ)
    assert decoding["exit_layer"] == evaluation["best"]["exit_layer"]
    assert set(decoding["measured"]) >= {"acceptance", "tokens_per_round", "layer_evals_per_token"}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "def f(x):"}) + "\n" + json.dumps({"text": "import os"}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pretrain.generate", "--checkpoint", str(run_dir),
                           "--prompts-file", str(prompts), "--prompt", "class A:", "--max-new-tokens", "8",
                           "--exit-layer", "2", "--draft-len", "3", "--measure-speedup", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    assert stats["exit_layer"] == 2 and stats["draft_len"] == 3
    assert stats["identical_to_autoregressive"] is True
    assert stats["generated_tokens"] > 0 and "speedup" in stats
    assert proc.stdout.count("--- ") == 3
    bad = subprocess.run([sys.executable, "-m", "pretrain.generate", "--checkpoint", str(run_dir),
                          "--prompt", "x", "--exit-layer", "9"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "exit_layer=9" in bad.stderr and "Traceback" not in bad.stderr
