"""Evaluation, import and decoding reports as a new user meets them (issue 20 items 4, 6, 7): the
per-source table when sources are mixed (training's final table and pretrain.eval), the checkpoint
step named, an imported model without --data-dir answered by one line, `hf_interop import` saying
what it wrote, the generate report's settings and acceptance figures, and the figures' legend,
labels, speedup series, per-source curves, short title and late-exit note."""
import contextlib
import io
import json

import pytest

from pretrain.decoding.report import decode_settings, explain
from pretrain.eval import main as eval_main

TINY = ["model=tiny", "train.seq_len=32", "train.steps=4", "train.global_batch_size=4", "train.micro_batch_size=2",
        "train.device=cpu", "logging.wandb.mode=disabled", "logging.progress_bar=false", "eval.batches=1",
        "eval.batch_size=2", "eval.decode_prompts=0", "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def mixed_run(prepared_data, tmp_path_factory):
    """A 4-step run on two sources (the same data under two names); its console output."""
    from pretrain.train import main as train_main

    run_dir = tmp_path_factory.mktemp("mixed") / "run"
    sources = (f"data.sources=[{{dir: {prepared_data}, weight: 0.5, name: web}}, "
               f"{{dir: {prepared_data}, weight: 0.5, name: code}}]")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train_main([*TINY, sources, f"run_dir={run_dir}"])
    return run_dir, out.getvalue()


def run_eval(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = eval_main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_mixed_sources_get_a_per_source_table_and_the_step_is_named(mixed_run, tmp_path, capsys, monkeypatch):
    run_dir, train_output = mixed_run
    assert train_output.count("per source (held-out loss / agreement with the last layer):") == 1
    assert "data web: weight 0.5 (50.0% of the stream)" in train_output  # the start-up summary
    table = train_output.split("per source")[1].splitlines()
    assert "web" in table[1] and "code" in table[1] and len(table) >= 2 + 4  # a row per exit
    titles = []
    from pretrain.evaluation import plots

    monkeypatch.setattr(plots, "per_exit_figure", lambda result, png, title: titles.append(title) or png)
    code, out, err = run_eval(capsys, "--checkpoint", str(run_dir), "--batches", "1", "--batch-size", "2",
                              "--decode-prompts", "0", "--out", str(tmp_path / "eval.json"), "--plot",
                              str(tmp_path / "p.png"))
    assert code == 0, err
    assert out.splitlines()[0] == f"evaluating {run_dir}/checkpoints/step_00000004 (step 4)"
    assert "per source (held-out loss" in out
    assert json.loads((tmp_path / "eval.json").read_text())["checkpoint_step"] == 4
    assert titles == ["run, step 4"]  # the run's name and step, not the checkpoint's path


def test_imported_model_import_report_and_eval_without_data(mixed_run, prepared_data, tmp_path, capsys):
    from pretrain.hf_interop.__main__ import main as hf_main

    run_dir, _ = mixed_run
    assert hf_main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert hf_main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    out = capsys.readouterr()
    written = sorted(p.name for p in (tmp_path / "imported").iterdir())
    assert json.loads(out.out)["files"] == written and "checkpoints" in written
    said = out.err.strip()
    assert said.startswith(f"imported {tmp_path / 'hf'} into {tmp_path / 'imported'}: 4 layers, dim 64")
    assert f"wrote {', '.join(written)}" in said and "--data-dir" in said

    code, _, err = run_eval(capsys, "--checkpoint", str(tmp_path / "imported"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--data-dir DIR" in lines[0] and "imported from" in lines[0], err
    code, out, err = run_eval(capsys, "--checkpoint", str(tmp_path / "imported"), "--data-dir", str(prepared_data),
                              "--batches", "1", "--batch-size", "2", "--decode-prompts", "0",
                              "--out", str(tmp_path / "e.json"))
    assert code == 0 and "no training step" in out.splitlines()[0], err
    code, _, err = run_eval(capsys, "--checkpoint", str(tmp_path / "hf"))
    assert code == 2 and "Hugging Face model directory: import it first" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_eval(capsys, "--checkpoint", str(run_dir), "--data-dir", str(tmp_path / "nothing"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--data-dir" in err and "Traceback" not in err


def test_generate_reports_only_the_settings_that_steered_it(mixed_run, capsys):
    assert decode_settings("autoregressive", 2, 4, False, False) == {"strategy": "autoregressive",
                                                                     "adaptive_draft": False, "dynamic_exit": False}
    assert decode_settings("early_exit", 2, 4, False, False)["exit_layer"] == 2
    static = decode_settings("self_speculative", 2, 4, False, False)
    assert static["exit_layer"] == 2 and static["draft_len"] == 4
    dynamic = decode_settings("self_speculative", 2, 4, False, True)
    assert "exit_layer" not in dynamic and dynamic["start_exit_layer"] == 2 and dynamic["start_draft_len"] == 4

    from pretrain.generate import main as generate_main

    run_dir, _ = mixed_run
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(run_dir), "--prompt", "def f(", "--max-new-tokens", "6",
                          "--strategy", "self_speculative", "--dynamic-exit", "--no-eos"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.out.strip().splitlines()[-1])
    assert "exit_layer" not in report and "draft_len" not in report and report["mean_exit_layer"] is not None
    assert out.err.strip().splitlines()[-1] == explain(report)
    assert explain(report).startswith(f"acceptance {report['acceptance']:.3f} (acceptance = accepted / drafts the "
                                      f"verifier judged")
    assert "accepted_per_drafted" in explain(report) and "dynamic exit: mean E" in explain(report)


def test_per_exit_figure_has_a_legend_labels_speedups_and_source_curves():
    pytest.importorskip("matplotlib")
    from pretrain.evaluation.plots import best_speedup_per_exit, per_exit_axes, per_exit_title

    stats = lambda loss, agree: {"loss": loss, "perplexity": 1.0, "agreement": agree}  # noqa: E731
    result = {"exits": {"1": stats(3.0, 0.5), "2": stats(2.5, 0.7), "3": stats(2.0, 1.0)},
              "speedup": {"1": {"1": 1.1, "2": 1.3}, "2": {"1": 1.2, "2": 1.05}},
              "best": {"exit_layer": 1, "draft_len": 2, "speedup": 1.3, "acceptance": 0.5},
              "sources": {"web": {"1": stats(3.1, 0.5), "2": stats(2.6, 0.7), "3": stats(2.1, 1)},
                          "code": {"1": stats(2.9, 0.5), "2": stats(2.4, 0.7), "3": stats(1.9, 1)}}}
    assert best_speedup_per_exit(result) == {1: 1.3, 2: 1.2}
    fig = per_exit_axes(result, per_exit_title("demo", 300))
    ax, ax2 = fig.axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["held-out loss (all sources)", "held-out loss: code", "held-out loss: web",
                      "top-1 agreement with last layer", "expected speedup (best γ), ×"]
    speedup_line = [line for line in ax2.get_lines() if line.get_label().startswith("expected speedup")][0]
    assert list(speedup_line.get_ydata()) == [1.3, 1.2]
    assert [t.get_text() for t in ax2.texts] == ["best E=1, γ=2: 1.30×"]
    assert ax.get_title() == "demo, step 300"
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_training_curves_say_why_exits_appear_late():
    pytest.importorskip("matplotlib")
    from pretrain.evaluation.plots import late_exit_note, training_curves_axes
    from schedules.exit_loss import exits_on

    def records(curriculum, **kw):
        return [{"kind": "train", "step": t, "exit_loss": {str(l): 5.0 - t / 100 for l in
                                                          exits_on(t, num_layers=4, curriculum=curriculum, **kw)}}
                for t in range(0, 200, 2)]

    fig = training_curves_axes(records("gradual", gradual_steps=160))
    note = " ".join(t.get_text() for t in fig.texts).replace("\n", " ")
    assert "exit 1 from step 120" in note and "gradual curriculum" in note
    assert late_exit_note({4: ([0, 1], [1, 1]), 1: ([0, 1], [1, 1])}) is None
    rotational = training_curves_axes(records("rotational", rotation_period=4))
    assert rotational.texts == []  # every exit is on within the first R steps: nothing late
    import matplotlib.pyplot as plt

    plt.close("all")


def test_wandb_figure_gets_the_speedup_series_and_source_curves():
    """The W&B figure is drawn from the logged eval record: it carries the expected speedups (the
    formula at each exit's agreement) and the per-source statistics too."""
    pytest.importorskip("matplotlib")
    from pretrain.evaluation.plots import best_speedup_per_exit, per_exit_axes
    from pretrain.metrics.wandb_eval import eval_result_from_record

    stats = {"loss": 2.0, "perplexity": 7.4, "agreement": 0.5}
    record = {"step": 9, "exit_1": stats, "exit_2": {**stats, "agreement": 1.0},
              "sources": {"web": {"1": stats, "2": stats}}, "best": {"exit_layer": 1, "draft_len": 1,
                                                                    "speedup": 1.0, "acceptance": 0.5}}
    result = eval_result_from_record(record)
    # α = 0.5, E/L = 1/2, γ ≤ 8: the best is γ = 1, (1 - 0.25) / (0.5 · 1.5) = 1.0
    assert best_speedup_per_exit(result) == {1: pytest.approx(1.0)}
    fig = per_exit_axes(result, "run, step 9")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert "held-out loss: web" in labels and "expected speedup (best γ), ×" in labels
    import matplotlib.pyplot as plt

    plt.close(fig)
