"""bench/ablation.py end to end at toy size: six variants trained through the Hydra config, per-exit
evaluation, measured self-speculative decoding, results file and figures; run directories are
never silently overwritten, and --reuse keeps finished runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from bench.ablation import CONTINUAL, FROM_SCRATCH, main  # noqa: E402
from tests.test_plots import assert_png  # noqa: E402

TOY = ["--model", "tiny", "--layers", "4", "--dim", "32", "--heads", "4", "--kv-heads", "2", "--ffn-dim", "64",
       "--steps", "8", "--continual-fraction", "0.5", "--batch-size", "4", "--warmup", "2", "--p-max", "0.3",
       "--eval-batches", "2", "--eval-batch-size", "4", "--max-draft-len", "4", "--prompts", "2",
       "--prompt-len", "8", "--new-tokens", "8", "--repeats", "1"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablation")
    subprocess.run([sys.executable, "-m", "pretrain.data.prepare", "--out", str(root / "data"), "--max-files", "30",
                    "--vocab-size", "512", "--seq-len", "32"], check=True, capture_output=True, timeout=300)
    args = ["--data-dir", str(root / "data"), "--runs-dir", str(root / "runs"), "--results-dir", str(root / "res"),
            *TOY]
    return root, args, main(args)


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == "train"]


def test_every_variant_trains_with_its_own_layerskip_settings(ablation):
    root, _, results = ablation
    runs = root / "runs"
    assert list(results) == list(FROM_SCRATCH + CONTINUAL)
    steps = {v: [r["step"] for r in metrics(runs / v)] for v in results}
    assert all(steps[v] == list(range(8)) for v in FROM_SCRATCH)
    assert all(steps[v] == list(range(4)) for v in CONTINUAL)
    exits = {v: {l for r in metrics(runs / v) for l in r["exit_loss"]} for v in results}
    run_fraction = {v: min(r["blocks_run_fraction"] for r in metrics(runs / v)) for v in results}
    # final exit only, no dropout
    for v in ("baseline", "continual_plain"):
        assert exits[v] == {"4"} and run_fraction[v] == 1.0
    assert exits["layer_dropout"] == {"4"} and metrics(runs / "layer_dropout")[-1]["layer_dropout_rate"][-1] == 0.3
    assert exits["early_exit"] == {"1", "2", "3", "4"} and run_fraction["early_exit"] == 1.0
    assert exits["layerskip"] == {"1", "2", "3", "4"}
    # S(t) = exp from scratch: no dropout at step 0; S = 1 in continual pretraining: full rate at once
    assert metrics(runs / "layerskip")[0]["layer_dropout_rate"][-1] == 0.0
    assert metrics(runs / "continual_layerskip")[0]["layer_dropout_rate"][-1] == pytest.approx(0.3)
    # gradual over the first T_C = 2 of 4 steps (exit l on once t·L >= T_C·(L-l)): last exit first
    ramp = [sorted(map(int, r["exit_loss"])) for r in metrics(runs / "continual_layerskip")]
    assert ramp == [[4], [2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]
    cfg = (runs / "continual_layerskip" / "config.yaml").read_text()
    assert f"init_from: {runs / 'baseline'}" in cfg


def test_results_per_variant_and_exit(ablation):
    root, _, results = ablation
    for variant, r in results.items():
        assert sorted(r["exits"]) == [1, 2, 3, 4]
        assert r["exits"][4]["agreement"] == 1.0
        d = r["decoding"]
        assert d["identical_tokens"] is True, variant
        assert (d["exit_layer"], d["draft_len"]) == (r["best"]["exit_layer"], r["best"]["draft_len"])
        assert 0.0 <= d["acceptance"] <= 1.0 and d["tokens_per_s"] > 0 and d["autoregressive_tokens_per_s"] > 0
        # per token: at least E draft-layer evaluations' share and at most drafting γ plus a full pass
        assert d["layer_evals_per_token"] <= d["draft_len"] * d["exit_layer"] + 4
        assert r["training"]["tokens_per_s"] > 0
    md = (root / "res" / "ablation.md").read_text()
    for label in ("baseline (no LayerSkip)", "layer dropout only", "early-exit loss only", "LayerSkip (both)",
                  "continual: plain", "continual: LayerSkip", "Δ vs baseline", "measured speedup"):
        assert label in md
    saved = json.loads((root / "res" / "ablation.json").read_text())
    assert saved["results"]["layerskip"]["exits"]["4"]["loss"] == pytest.approx(results["layerskip"]["exits"][4]["loss"])
    figures = sorted(p.name for p in (root / "res" / "ablation").glob("*.png"))
    assert figures == ["agreement.png", "dropout_schedule.png", "exit_loss.png",
                       "training_curves_continual_layerskip.png", "training_curves_layerskip.png"]
    for name in figures:
        assert_png(root / "res" / "ablation" / name)
        assert f"(ablation/{name})" in md


def test_existing_runs_are_kept_unless_asked(ablation):
    root, args, results = ablation
    with pytest.raises(SystemExit, match="exists; pass --reuse"):
        main(args + ["--variants", "baseline"])
    before = (root / "runs" / "baseline" / "metrics.jsonl").read_text()
    again = main(args + ["--variants", "baseline", "--reuse", "--name", "again"])
    assert (root / "runs" / "baseline" / "metrics.jsonl").read_text() == before  # not retrained
    assert again["baseline"]["exits"][4]["loss"] == pytest.approx(results["baseline"]["exits"][4]["loss"])


def test_bad_arguments_fail_early(tmp_path):
    with pytest.raises(SystemExit, match="no prepared data"):
        main(["--data-dir", str(tmp_path / "nothing")])
