"""pretrain.plan: the cluster simulator. One fake training step of the real Trainer per simulated
rank (fake tensors, fake process group), checked against a real run and independent arithmetic."""
import json
import math

import pytest

from pretrain.config import compose_run_config
from pretrain.metrics.flops import block_flops_per_token, head_flops_per_token
from pretrain.model import LayerSkipTransformer
from pretrain.plan.__main__ import main
from pretrain.plan.devices import DEVICES
from pretrain.plan.estimate import predict_throughput
from pretrain.plan.extrapolate import exit_bytes_per_exit, extrapolate
from pretrain.plan.memory import RankMemory, StepMemory
from pretrain.plan.simulate import in_flight_micro_batches, stage_ranks, worst_exit_step
from parallel.dims import ParallelDims

TINY = ["model=tiny", "model.vocab_size=512", "train.seq_len=32", "train.global_batch_size=4", "train.micro_batch_size=2",
        "layerskip.early_exit.rotation_period=2"]


def run_plan(tmp_path, *args, name="plan.json"):
    out = tmp_path / name
    code = main([*TINY, *args, f"plan.json={out}"])
    assert code == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The plan of one process (also with the final exit alone, for the exit logits' cost)."""
    return run_plan(tmp_path_factory.mktemp("plan"), "plan.world_size=1", "plan.exit_cost=true")


def test_cli_reports_each_layout_and_shards_the_parameters(tmp_path, capsys, one_process):
    one = one_process
    fsdp = run_plan(tmp_path, "plan.world_size=2", "parallel.dp_shard=2", "plan.exit_cost=false", name="fsdp.json")
    pp = run_plan(tmp_path, "plan.world_size=2", "parallel.pp=2", "plan.exit_cost=false", name="pp.json")
    text = capsys.readouterr().out
    assert "| rank |" in text and "FITS on h100-80gb" in text
    cfg, _ = compose_run_config(TINY)
    param_bytes = sum(p.numel() * p.element_size() for p in LayerSkipTransformer(cfg.model).parameters())
    r1 = one["ranks"][0]
    assert r1["parameters"] == param_bytes                       # float32 weights, one process
    assert r1["gradients"] == param_bytes and r1["optimizer_state"] >= 2 * param_bytes   # Adam's m and v (+ steps)
    assert r1["exit_logits"] > 0                                 # LayerSkip's exit heads cost memory
    model = LayerSkipTransformer(cfg.model)
    root = sum(p.numel() * 4 for m in (model.tok_embeddings, model.output, model.norm) for p in m.parameters())
    block = sum(p.numel() * 4 for p in model.layers["0"].parameters())
    # FSDP 2: half of every weight, plus the root (embedding, head) gathered through the step, plus at most
    # the halves of the one block gathered at the peak
    assert param_bytes / 2 + root <= fsdp["ranks"][0]["parameters"] <= param_bytes / 2 + root + block / 2
    assert [r["rank"] for r in pp["ranks"]] == [0, 1] and [r["stages"] for r in pp["ranks"]] == [[0], [1]]
    assert pp["ranks"][0]["in_flight_micro_batches"] == 2 and pp["ranks"][1]["in_flight_micro_batches"] == 1
    assert one["fits"] and one["usable_bytes"] == int(80 * 2**30 * 0.9)
    assert one["exits_on"] == 3 and one["worst_step"] == 1      # L=4, period 2: step 1 has exits 1, 3 and the final 4


def test_prediction_matches_a_real_run_of_the_same_step(monkeypatch, one_process):
    from pretrain.plan.measure import measure

    predicted = one_process["ranks"][0]["peak"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    measured = measure([*TINY, "train.device=cpu"])["peak"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_chunked_exit_loss_prediction_matches_a_real_run(tmp_path, monkeypatch):
    """The chunked loss indexes with boolean masks (data-dependent shapes): simulated as all-selected."""
    from pretrain.plan.measure import measure

    chunked = ["layerskip.early_exit.loss_chunk_tokens=16"]
    predicted = run_plan(tmp_path, *chunked, "plan.world_size=1", "plan.exit_cost=false")["ranks"][0]["peak"]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    measured = measure([*TINY, *chunked, "train.device=cpu"])["peak"]
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_fsdp_gradient_accumulation_stays_sharded_unless_asked(tmp_path):
    """Two micro-batches a step under FSDP 2: reduce-scattering each (the default) keeps about half
    of the float32 gradients; one reduction a step keeps all of them, unsharded, until the last."""
    cfg, _ = compose_run_config(TINY)
    param_bytes = sum(p.numel() * p.element_size() for p in LayerSkipTransformer(cfg.model).parameters())
    fsdp = ["plan.world_size=2", "parallel.dp_shard=2", "plan.exit_cost=false", "train.global_batch_size=8"]
    every = run_plan(tmp_path, *fsdp, name="every.json")["ranks"][0]
    once = run_plan(tmp_path, *fsdp, "parallel.fsdp_reduce_every_micro_batch=false", name="once.json")["ranks"][0]
    assert once["gradients"] >= param_bytes
    assert every["gradients"] < 0.75 * param_bytes and every["peak"] < once["peak"]


def test_tensor_parallel_prediction_matches_a_real_run(tmp_path):
    """TP 2 against a real torchrun run of the same step. DTensor's sharding propagation of the fused
    AdamW step (global-shape metadata tensors under the simulation's fake mode) once read as +34%."""
    from tests.parallel_scripts.launch import results, torchrun_stdout

    tp = ["parallel.tp=2", "model.dim=128", "model.ffn_dim=352", "train.seq_len=64"]
    predicted = run_plan(tmp_path, *tp, "plan.world_size=2", "plan.exit_cost=false")["ranks"][0]
    measured = {r["rank"]: r for r in results(torchrun_stdout(2, ["-m", "pretrain.plan.measure", *TINY, *tp]))}[0]
    assert abs(predicted["peak"] - measured["peak"]) <= 0.10 * measured["peak"], (predicted, measured)
    assert predicted["optimizer_state"] == measured["by_kind"]["Optstate"]


def test_search_returns_fitting_layouts_ranked(tmp_path, capsys):
    reports = run_plan(tmp_path, "plan.world_size=2", "plan.search=true")
    meshes = {(r["layout"]["dp_shard"], r["layout"]["tp"], r["layout"]["pp"]) for r in reports}
    assert meshes == {(2, 1, 1), (1, 2, 1), (1, 1, 2)}
    order = [(not r["fits"], -r["throughput"]["tokens_per_s"]) for r in reports]
    assert order == sorted(order) and all(r["fits"] for r in reports)
    assert reports[0]["layout"]["pp"] == 1                       # a pipeline bubble never wins on speed
    assert "best:" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["plan.device=h900"], "plan.device='h900': unknown device; choose one of h100-80gb"),
    (["plan.world_size=3"], "but the job has world size 3"),
    (["plan.world_size=two"], "plan.world_size"),
    (["plan.speed=1"], "plan.speed"),
    (["plan.mfu=1.5"], "plan.mfu=1.5: must be in (0, 1]"),
    (["plan.world_size=4", "parallel.tp=4", "model.n_kv_heads=2"], "model.n_kv_heads=2: not divisible by parallel.tp=4"),
    (["plan.world_size=0"], "plan.world_size=0: must be >= 1"),
    (["plan.world_size=2", "parallel.pp=2", "plan.layers=3"], "plan.layers=3: must be below model.n_layers=4"),
    (["train.nosuch=1"], "train.nosuch"),
    (["plan.json=/nonexistent-dir/plan.json"], "plan.json='/nonexistent-dir/plan.json': its directory does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main([*TINY, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_throughput_from_the_flops():
    cfg, _ = compose_run_config([*TINY, "train.activation_checkpointing=true", "parallel.pp=2"])
    dims = ParallelDims(pp=2, pp_schedule="1F1B", microbatches=2)
    h100 = DEVICES["h100-80gb"]
    t = predict_throughput(cfg, dims, exits_on=3, device=h100, mfu=0.5)
    B, T, L = 4, 32, 4
    block, head = block_flops_per_token(cfg.model, T), head_flops_per_token(cfg.model)
    model = B * T * (L * block + 3 * head)
    executed = model + B * T * L * block / 3                     # activation checkpointing: the forward again
    step = executed / (2 * h100.peak_bf16_flops * 0.5) * (1 + 1 / 2)   # bubble (pp-1)/microbatches
    assert math.isclose(t.step_s, step) and math.isclose(t.tokens_per_s, B * T / step)
    assert math.isclose(t.mfu, model / (step * 2 * h100.peak_bf16_flops))


def test_worst_step_in_flight_and_stage_ranks():
    cfg, _ = compose_run_config([*TINY, "train.steps=10", "layerskip.early_exit.curriculum=gradual",
                                 "layerskip.early_exit.gradual_steps=8"])
    step, exits = worst_exit_step(cfg)
    assert exits == 4 and step <= 9                              # gradual: every exit on once switched on
    dims = ParallelDims(pp=4, dp_shard=2, pp_schedule="1F1B", microbatches=8)
    assert [in_flight_micro_batches(dims, r) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches(ParallelDims(pp=4, pp_schedule="GPipe", microbatches=8), 3) == 8
    assert stage_ranks(dims) == [0, 2, 4, 6]
    assert stage_ranks(ParallelDims(pp=8)) == [0, 4, 7]


def test_extrapolation_is_linear_in_blocks_and_per_exit():
    def rank(plain, exit_bytes, exits):
        kinds = {"Parameter": plain // 2, "Gradient": plain // 2, "Buffer": 0, "Optstate": 0, "Activation": exit_bytes,
                 "Temp": 0, "Other": 0}
        return RankMemory(rank=0, pp_rank=0, stages=[0], memory=StepMemory(peak=plain + exit_bytes, by_kind=kinds),
                          exit_logits=exit_bytes, in_flight=1, exits_here=exits)
    a, b = rank(100, 10, exits=2), rank(140, 10, exits=2)           # 2 and 4 blocks: 20 bytes a block
    per_exit = exit_bytes_per_exit(a, b, last_stage=0)
    assert per_exit == 10                                             # one early exit besides the final one
    r = extrapolate(a, b, 2, 4, layers=10, exits_full=4, last_stage=0, per_exit=per_exit)
    assert r.memory.peak == 100 + 20 * 8 + 3 * 10 and r.exit_logits == 30
    assert sum(r.memory.by_kind.values()) == r.memory.peak and r.memory.by_kind["Parameter"] == 50 + 10 * 8
