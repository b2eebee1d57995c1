"""torch.compile (train.compile=true) at every parallel layout, on CPU with gloo.

In `make test` (cheap): the real trainer entry under tensor parallelism - the layout whose backward
used to fail ("'Tensor' object has no attribute '_local_tensor'") - compiled with the aot_eager
backend (the same Dynamo/AOTAutograd tracing as inductor, without inductor's code generation), gives
the eager run's losses and writes the compile counts to metrics.jsonl; a compiled one-process run
evaluates and decodes at its end.

In `make test-compile` (LAYERSKIP_COMPILE_TESTS=1; inductor, about 15-20 minutes on 2 busy cores):
every layout - FSDP, HSDP, TP + sequence parallel, every pipeline schedule, their 2-D combinations -
with activation checkpointing on and off and with the chunked exit loss, against the one-process
eager reference step (tests/parallel_scripts/equality.py): losses and per-exit losses within 1e-5
relative over the first steps; and 30 steps of per-sample layer dropout with a bounded number of
recompilations. One torchrun launch per world size; one inductor cache directory for the session.
"""
import json
import os
from pathlib import Path

import pytest

from parallel_scripts.launch import torchrun
from test_parallel_equality import check
from test_parallel_training import STEPS, job, run_config
from pretrain.trainer.loop import train

RUN_MATRIX = os.environ.get("LAYERSKIP_COMPILE_TESTS") == "1"
LOSS_RTOL = 1e-5
MAX_RECOMPILES = 4      # per process over 30 steps: the shape variants (a block run on one row is specialised)


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory):
    """One inductor cache for every launch of this module: a graph compiled once is reused."""
    path = tmp_path_factory.mktemp("inductor_cache")
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "train"]


def test_compiled_tensor_parallel_trains_like_eager(prepared_data, tmp_path):
    tp2 = ("parallel.tp=2",)
    results = torchrun(2, "train_entry.py", [
        job("eager", prepared_data, tmp_path / "eager", *tp2),
        job("compiled", prepared_data, tmp_path / "compiled", *tp2, "train.compile=true",
            "train.compile_backend=aot_eager", "train.watchdog_factor=0")], timeout=400)
    losses = {r["job"]: r["losses"] for r in results}
    assert sorted(losses["eager"]) == sorted(losses["compiled"]) and len(losses["eager"]) == STEPS
    for step, loss in losses["eager"].items():
        assert abs(losses["compiled"][step] - loss) <= LOSS_RTOL * abs(loss), (step, losses)
    rows = train_rows(tmp_path / "compiled")
    assert [r["loss"] for r in rows] == [losses["compiled"][str(r["step"])] for r in rows]
    # the blocks were compiled, counted from the first compilation (also without the watchdog)
    assert all(r["compile_graphs"] >= 1 and r["compile_s"] > 0 for r in rows)
    assert rows[-1]["compile_recompiles"] <= MAX_RECOMPILES
    assert "compile_recompiles" not in train_rows(tmp_path / "eager")[0]


def test_one_process_compiled_run_evaluates_and_decodes(prepared_data, tmp_path):
    """The final evaluation decodes through the training model's blocks: they run eagerly there
    (compiled, each decoded token's new sizes recompiled until fullgraph's recompile limit failed)."""
    cfg = run_config(prepared_data, tmp_path / "one", "train.steps=2", "train.compile=true",
                     "train.compile_backend=aot_eager", "eval.decode_prompts=2", "eval.decode_prompt_len=8",
                     "eval.decode_new_tokens=8")
    summary = train(cfg)
    assert sorted(summary["losses"]) == [0, 1] and summary["eval"]["decoding"]
    assert train_rows(tmp_path / "one")[-1]["compile_graphs"] >= 1


# ---- make test-compile: the whole matrix with inductor

matrix = pytest.mark.skipif(not RUN_MATRIX, reason="LAYERSKIP_COMPILE_TESTS=1 not set (make test-compile)")

TWO = [
    "tp=2",                                                        # TP2 + sequence parallel
    "tp=2,tie=1,ac=1,ckpt_heads=1",                                # + tied vocabulary-parallel head, recompute
    "tp=2,chunk=16",                                               # chunked exit loss, vocabulary-parallel
    "pp=2,pp_schedule=1F1B",
    "pp=2,pp_schedule=Interleaved1F1B,virtual_stages=2",
    "pp=2,pp_schedule=GPipe,tie=1,micro_batch=1,ac=1",
    "dp_shard=2,ac=1,chunk=16",                                    # FSDP2, checkpointing inside the compiled block
    "dp_replicate=2",                                              # HSDP with a replicate dim only
]
FOUR = [
    "tp=2,dp_shard=2,ac=1",                                        # FSDP2 over TP
    "pp=2,tp=2,pp_schedule=1F1B,chunk=16",
    "pp=2,dp_shard=2,pp_schedule=Interleaved1F1B,virtual_stages=2,micro_batch=1",
    "dp_replicate=2,dp_shard=2",                                   # HSDP 2-D
]
# 30 steps of per-sample layer dropout: recompilations must settle
LONG = ["tp=2,steps=30", "dp_shard=2,global_batch=4,micro_batch=1,p_max=0.9,steps=30"]


def compiled(specs: list[str], steps: int = 4) -> list[str]:
    return [s + ",compile=1" + ("" if "steps=" in s else f",steps={steps}") for s in specs]


def check_compiled(results: list[dict], expected: int) -> None:
    check(results, expected)                                       # losses 1e-5, weights, replicas, dropout
    for r in results:
        assert r["compile_graphs"] >= 1 and r["compile_s"] > 0, r      # the blocks were compiled


@matrix
def test_matrix_two_processes(inductor_cache):
    results = torchrun(2, "equality.py", compiled(TWO), timeout=1800)
    check_compiled(results, len(TWO))


@matrix
def test_matrix_four_processes(inductor_cache):
    results = torchrun(4, "equality.py", compiled(FOUR), timeout=1800)
    check_compiled(results, len(FOUR))


@matrix
def test_recompiles_are_bounded_over_30_steps(inductor_cache):
    results = torchrun(2, "equality.py", compiled(LONG), timeout=1800)
    assert len(results) == len(LONG)
    for r in results:
        assert r["compile_recompiles"] <= MAX_RECOMPILES, r
        assert min(r["blocks_run_fraction"]) < 1.0, r
        # 30 Adam steps amplify float rounding: eager TP2 drifts to 5e-6 from one process, compiled
        # TP2 (inductor reorders sums) to 1.4e-5 (measured); FSDP2 stays at 2e-7
        assert r["loss_rel"] < 1e-4, r
