"""lm-evaluation-harness's own command line (`lm_eval`, and the registering wrapper pretrain.lm_eval_cli)
and an unknown task name: each needs the harness's index of its thousands of task files (about a
minute on a busy 2-core machine), so this suite runs under `make test-harness-cli`
(LAYERSKIP_HARNESS_CLI_TESTS=1), not in `make test`."""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

if os.environ.get("LAYERSKIP_HARNESS_CLI_TESTS") != "1":
    pytest.skip("the harness command-line suite runs under `make test-harness-cli` (LAYERSKIP_HARNESS_CLI_TESTS=1)",
                allow_module_level=True)
pytest.importorskip("lm_eval")

from downstream_fixtures import build_checkpoints  # noqa: E402

from pretrain.downstream import LOCAL_TASKS  # noqa: E402
from pretrain.downstream.harness_hook import PTH_FILE  # noqa: E402
from pretrain.downstream.source import ModelSource  # noqa: E402
from pretrain.downstream.sweep import run_sweep  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
       "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}


@pytest.fixture(scope="module")
def run_dir(prepared_data, tmp_path_factory):
    run, _ = build_checkpoints(prepared_data, tmp_path_factory.mktemp("downstream_cli"))
    ENV["HF_DATASETS_CACHE"] = os.environ["HF_DATASETS_CACHE"]
    return run


def _cli(*args, module="pretrain.lm_eval_cli"):
    return subprocess.run([sys.executable, "-m", module, *args], env=ENV, capture_output=True, text=True, timeout=900)


def test_harness_cli_evaluates_the_registered_model_at_an_exit(run_dir, tmp_path):
    """The harness's own `lm_eval` executable, `--model layerskip --model_args
    checkpoint=...,exit_layer=2` (found through the start-up hook `make setup` installs), gives the
    accuracy our sweep computes in-process at exit 2 on the same documents."""
    lm_eval = Path(sys.executable).parent / "lm_eval"
    site = Path(sysconfig.get_paths()["purelib"])
    assert (site / PTH_FILE).is_file(), f"{site / PTH_FILE} missing: make setup installs it"
    proc = subprocess.run([str(lm_eval), "--model", "layerskip", "--model_args", f"checkpoint={run_dir},exit_layer=2",
                           "--tasks", "layerskip_tiny_mc,layerskip_tiny_gen", "--include_path", str(LOCAL_TASKS),
                           "--limit", "8", "--output_path", str(tmp_path / "out")],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    expected = run_sweep(ModelSource.open(run_dir, torch.device("cpu")), ["layerskip_tiny_mc", "layerskip_tiny_gen"],
                         [2], limit=8, progress=lambda line: None)["exits"][2]
    assert results["layerskip_tiny_mc"]["acc,none"] == expected["layerskip_tiny_mc"]["value"]
    assert results["layerskip_tiny_gen"]["exact_match,none"] == expected["layerskip_tiny_gen"]["value"]


def test_harness_cli_bad_model_args_one_line_exit_2(run_dir):
    proc = _cli("--model", "layerskip", "--model_args", f"checkpoint={run_dir},exit_layer=9",
                "--tasks", "layerskip_tiny_mc", "--include_path", str(LOCAL_TASKS), "--limit", "2")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "exit 9 is outside 1..4" in last, proc.stderr[-2000:]


def test_unknown_task_one_line_exit_2(run_dir):
    proc = _cli("--checkpoint", str(run_dir), "--tasks", "layerskip_tiny_mc,hellaswagg", module="pretrain.eval")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown task 'hellaswagg'; did you mean hellaswag")


def test_tensor_parallel_evaluation_equals_one_process(run_dir, tmp_path):
    """torchrun with 2 processes (heads, ffn and vocabulary split): the same per-exit accuracies and
    perplexities as one process, and the same self-speculative acceptance."""
    args = ["--checkpoint", str(run_dir), "--tasks", "layerskip_tiny_mc,layerskip_tiny_ppl,layerskip_tiny_gen",
            "--exits", "2,all", "--strategies", "self_speculative:1:3", "--limit", "8", "--wandb", "disabled"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "pretrain.eval",
                           *args, "--out", str(tmp_path / "tp.json")], env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _cli(*args, "--out", str(tmp_path / "one.json"), module="pretrain.eval").returncode == 0
    tp, one = (json.loads((tmp_path / f).read_text())["downstream"] for f in ("tp.json", "one.json"))
    for exit_layer in ("2", "4"):
        assert tp["exits"][exit_layer]["layerskip_tiny_mc"]["value"] == one["exits"][exit_layer]["layerskip_tiny_mc"]["value"]
        assert tp["exits"][exit_layer]["layerskip_tiny_ppl"]["value"] == pytest.approx(
            one["exits"][exit_layer]["layerskip_tiny_ppl"]["value"], rel=1e-5)
    spec = "self_speculative:1:3"
    assert tp["strategies"][spec]["acceptance"] == one["strategies"][spec]["acceptance"] > 0
    assert proc.stdout.count("exit 2:") == 1   # rank 0 alone reports
