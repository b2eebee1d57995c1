"""Figures of per-exit evaluation and training (pretrain/evaluation/plots.py), `pretrain.eval --plot`,
and the per-exit wandb.Table + figure logged at each evaluation (pretrain/metrics/wandb_eval.py),
on a tiny run trained here with W&B offline."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from pretrain.config import to_run_config  # noqa: E402
from pretrain.eval import main as eval_main  # noqa: E402
from pretrain.evaluation.plots import (agreement_figure, dropout_heatmap_figure, exit_loss_curves,  # noqa: E402
                                       exit_loss_figure, per_exit_figure, training_curves_figure)
from pretrain.metrics.wandb_eval import eval_result_from_record, eval_table_rows  # noqa: E402
from pretrain.trainer.loop import train  # noqa: E402
from schedules.layer_dropout import layer_dropout_rates  # noqa: E402

CONF = str(Path(__file__).resolve().parents[1] / "conf")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    """A real PNG file that matplotlib reads back at a plausible size."""
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert 200 <= height <= 3000 and 300 <= width <= 4000, image.shape
    assert image.shape[2] in (3, 4)
    assert image.std() > 0.01  # not a blank canvas


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 4-layer run: 6 steps, evaluated at steps 3 and 6, W&B offline into the run directory."""
    root = tmp_path_factory.mktemp("plots")
    data = root / "data"
    subprocess.run([sys.executable, "-m", "pretrain.data.prepare", "--out", str(data), "--max-files", "30",
                    "--vocab-size", "512", "--seq-len", "32"], check=True, capture_output=True, timeout=300)
    overrides = ["model=tiny", f"data.dir={data}", f"run_dir={root / 'run'}", "train.seq_len=32", "train.steps=6",
                 "train.global_batch_size=8", "train.micro_batch_size=8", "optim.warmup_steps=2",
                 "logging.every=1", "logging.progress_bar=false", "logging.wandb.mode=offline", "eval.every=3",
                 "eval.batches=2", "eval.batch_size=4", "eval.decode_prompts=0",
                 "layerskip.layer_dropout.p_max=0.3", "layerskip.early_exit.rotation_period=2"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        train(to_run_config(compose(config_name="config", overrides=overrides)))
    return root / "run"


def records(run_dir, kind):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_eval_plot_writes_the_per_exit_figure(run, tmp_path, capsys):
    assert eval_main(["--checkpoint", str(run), "--batches", "2", "--batch-size", "4", "--decode-prompts", "0",
                      "--out", str(tmp_path / "eval.json"), "--plot"]) == 0
    assert_png(run / "plots" / "per_exit.png")
    assert eval_main(["--checkpoint", str(run), "--batches", "1", "--decode-prompts", "0",
                      "--out", str(tmp_path / "eval2.json"), "--plot", str(tmp_path / "mine.png")]) == 0
    assert_png(tmp_path / "mine.png")
    assert "mine.png" in capsys.readouterr().out


def test_wandb_gets_the_per_exit_table_and_figure_at_each_evaluation(run):
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [2, 5]
    media = next((run / "wandb").glob("offline-run-*")) / "files" / "media"
    tables = sorted((media / "table").rglob("*.table.json"))
    images = sorted((media / "images").rglob("*.png"))
    assert len(tables) == 2 and len(images) == 2
    for step in (2, 5):
        assert_png(run / "plots" / f"per_exit_step_{step}.png")
    # the table of the last evaluation holds its per-exit numbers, and the expected speedup at the
    # best γ computed here from the formula (1-α^(γ+1))/((1-α)(1+γE/L))
    table = json.loads(next(t for t in tables if "per_exit_5_" in t.name).read_text())
    last = evals[-1]
    assert table["columns"][:4] == ["exit", "loss", "perplexity", "agreement"]
    assert [row[0] for row in table["data"]] == [1, 2, 3, 4]
    for layer, loss, ppl, agreement, gamma, speedup in table["data"]:
        stats = last[f"exit_{layer}"]
        assert (loss, ppl, agreement) == pytest.approx((stats["loss"], stats["perplexity"], stats["agreement"]))
        if layer < 4:
            a = agreement
            formula = [(1 - a ** (g + 1)) / ((1 - a) * (1 + g * layer / 4)) if a < 1 else (g + 1) / (1 + g * layer / 4)
                       for g in range(1, 9)]
            assert speedup == pytest.approx(max(formula)) and gamma == 1 + formula.index(max(formula))


def test_eval_record_round_trip():
    record = {"step": 7, "exit_2": {"loss": 2.0, "perplexity": math.exp(2), "agreement": 1.0},
              "exit_1": {"loss": 3.0, "perplexity": math.exp(3), "agreement": 0.5}, "exit_loss": {"1": 9.0},
              "best": {"exit_layer": 1, "draft_len": 2, "speedup": 1.2, "acceptance": 0.5}}
    result = eval_result_from_record(record)
    assert list(result["exits"]) == [1, 2] and result["best"]["draft_len"] == 2
    rows = eval_table_rows(result)
    assert rows[1] == [2, 2.0, math.exp(2), 1.0, 0, 1.0]
    # α = 0.5, E/L = 1/2: γ=1 gives 1.5/1.5 = 1.0, γ=2 gives 1.75/2 = 0.875 -> γ = 1
    assert rows[0][4:] == [1, pytest.approx(1.0)]


def test_training_curves_and_schedule_heatmap(run, tmp_path):
    train_records = records(run, "train")
    curves = exit_loss_curves(train_records)
    # rotational R=2 over 4 exits: exits 2 and 4 at even steps, 1, 3 and 4 at odd steps
    assert curves[2][0] == [0, 2, 4] and curves[1][0] == [1, 3, 5] and curves[4][0] == list(range(6))
    assert curves[4][1] == [r["exit_loss"]["4"] for r in train_records]
    assert_png(training_curves_figure(train_records, tmp_path / "curves.png"))
    # the heatmap's p(l, t) from schedules/ is what the trainer logged for every step
    rates = [layer_dropout_rates(t, num_layers=4, total_steps=6, p_max=0.3, depth="exp", time="exp") for t in range(6)]
    for expected, record in zip(rates, train_records, strict=True):
        assert expected == pytest.approx(record["layer_dropout_rate"])
    assert_png(dropout_heatmap_figure({"from scratch": rates, "continual": [[0.0, 0.1, 0.2, 0.3]] * 3},
                                      tmp_path / "heat.png"))


def test_comparison_figures(run, tmp_path):
    result = json.loads((run / "eval.json").read_text())
    other = {"exits": {k: {**v, "loss": v["loss"] + 0.5} for k, v in result["exits"].items()}}
    results = {"LayerSkip": result, "baseline": other, "continual: plain": other}
    assert_png(exit_loss_figure(results, tmp_path / "loss.png"))
    assert_png(agreement_figure(results, tmp_path / "agree.png"))
    assert_png(per_exit_figure(result, tmp_path / "one.png"))


def test_no_curves_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no per-exit training losses"):
        training_curves_figure([{"kind": "eval", "step": 0}], tmp_path / "x.png")
