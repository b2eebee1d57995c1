"""One training step of the real Trainer for a layout, simulated at one rank of a fake cluster
(pretrain/plan/fake_cluster.py), at the worst case LayerSkip can hit: nothing dropped by layer
dropout (every block runs on every row) and the curriculum's step with the most exits on.
"""
from __future__ import annotations

import copy
import multiprocessing

import torch

from pretrain.config import RunConfig, check_layout
from pretrain.layerskip.plan import step_plan
from pretrain.model import LayerSkipTransformer
from pretrain.plan.fake_cluster import fake_process_group, fake_tensors, keep_in_place
from pretrain.plan.extrapolate import exits_on_stages, extrapolate_ranks, with_layers
from pretrain.plan.memory import RankMemory, StepMemory, random_batch, tracked_step
from pretrain.trainer.trainer import Trainer
from parallel.dims import ParallelDims
from parallel.stage import stages_of_rank


def worst_case_config(cfg: RunConfig) -> RunConfig:
    """cfg with layer dropout off: every block runs on every row (dropout only ever removes work)."""
    worst = copy.deepcopy(cfg)
    worst.layerskip.layer_dropout.p_max = 0.0
    return worst


def worst_exit_step(cfg: RunConfig, scan: int = 4096) -> tuple[int, int]:
    """(step, exits on) for the step of the run with the most exits on (the first such step among
    up to `scan` steps spread over the run, the last step included)."""
    steps = cfg.train.steps
    stride = max(1, steps // scan)
    candidates = sorted(set(range(0, steps, stride)) | {steps - 1})
    best = max(candidates, key=lambda t: (len(step_plan(cfg, t).exit_weights), -t))
    return best, len(step_plan(cfg, best).exit_weights)


def stage_ranks(dims: ParallelDims, every_stage_up_to: int = 4) -> list[int]:
    """Ranks to simulate, one per pipeline rank: all of them for pp <= every_stage_up_to, else the
    first (embedding), the middle and the last (final head). Pipeline is the outermost mesh
    dimension, so pipeline rank s starts at global rank s·world/pp. Without pipelining: rank 0."""
    pp = dims.pp
    chosen = range(pp) if pp <= every_stage_up_to else sorted({0, pp // 2, pp - 1})
    return [s * (dims.world_size // pp) for s in chosen]


def in_flight_micro_batches(dims: ParallelDims, pp_rank: int) -> int:
    """Micro-batches whose activations a pipeline rank holds at once under its schedule: one
    without pipelining (gradient accumulation runs them in turn); all under GPipe; pp - pp_rank
    under 1F1B (its warm-up); under Interleaved1F1B the stage-forwards of its warm-up,
    (v-1)·pp + 2·(pp-1-pp_rank) + 1, at most micro-batches·v."""
    m, pp, v = dims.microbatches, dims.pp, dims.virtual_stages
    if pp == 1:
        return 1
    if dims.pp_schedule == "GPipe":
        return m
    if dims.pp_schedule == "1F1B":
        return min(m, pp - pp_rank)
    return min(m * v, (v - 1) * pp + 2 * (pp - 1 - pp_rank) + 1)


def fewer_micro_batches(cfg: RunConfig, world_size: int, keep: int = 2) -> RunConfig:
    """Without pipelining, micro-batches run one after another and the peak is the same from the
    second on (gradients already allocated): simulate `keep` of them (the batch shrinks to
    dp·micro_batch_size·keep). Pipelined layouts keep theirs (the schedule's in-flight count)."""
    dims = check_layout(cfg, world_size)
    tr = cfg.train
    if dims.pp > 1 or tr.global_batch_size // dims.dp // tr.micro_batch_size <= keep:
        return cfg
    short = copy.deepcopy(cfg)
    short.train.global_batch_size = dims.dp * tr.micro_batch_size * keep
    return short


def simulate_step(cfg: RunConfig, world_size: int, rank: int, step: int) -> StepMemory:
    """The tracked memory of one step of `cfg` at `rank` of a fake world of `world_size`, in a fresh
    process, forked from this one (a process group, and the device meshes cached with it, cannot be
    re-created reliably in one process for another rank)."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply(_simulate_step_here, (cfg, world_size, rank, step))


class SimulationError(RuntimeError):
    """The fake step failed (the message is the innermost error, picklable across the process)."""


def _simulate_step_here(cfg: RunConfig, world_size: int, rank: int, step: int) -> StepMemory:
    try:
        return _simulate_step_in_process(cfg, world_size, rank, step)
    except Exception as err:  # torch errors may not pickle back to the parent
        raise SimulationError(f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                              ) from None


def _simulate_step_in_process(cfg: RunConfig, world_size: int, rank: int, step: int) -> StepMemory:
    torch.set_num_threads(1)   # fake tensors compute nothing
    with fake_process_group(world_size, rank):
        dims = check_layout(cfg, world_size)
        dims.build_mesh()
        local = cfg.train.global_batch_size // dims.dp
        batch = random_batch(cfg.model.vocab_size, local, cfg.train.seq_len, dims.dp_rank * local)
        with fake_tensors():
            torch.manual_seed(cfg.train.seed)
            trainer = Trainer(cfg, dims, keep_in_place(LayerSkipTransformer(cfg.model)))
            return tracked_step(trainer, step_plan(cfg, step), batch)


def simulate_rank(cfg: RunConfig, world_size: int, rank: int, step: int, exit_cost: bool = True) -> RankMemory:
    """Worst-case memory at `rank`; with exit_cost, also the step with the final exit only (what
    LayerSkip's early-exit heads add on this rank)."""
    worst = fewer_micro_batches(worst_case_config(cfg), world_size)
    memory = simulate_step(worst, world_size, rank, step)
    exit_logits = None
    if exit_cost and cfg.layerskip.early_exit.enabled:
        plain = copy.deepcopy(worst)
        plain.layerskip.early_exit.enabled = False
        exit_logits = memory.peak - simulate_step(plain, world_size, rank, step).peak
    dims = check_layout(cfg, world_size)
    pp_rank = rank // (world_size // dims.pp)
    return RankMemory(rank=rank, pp_rank=pp_rank, stages=stages_of_rank(pp_rank, dims.pp, dims.virtual_stages),
                      memory=memory, exit_logits=exit_logits, in_flight=in_flight_micro_batches(dims, pp_rank))


def simulate_layout(cfg: RunConfig, world_size: int, exit_cost: bool = True, layers: int = 0
                    ) -> tuple[ParallelDims, int, int, list[RankMemory]]:
    """(resolved dims, worst step, exits on at it, memory of each simulated rank). With 0 < layers <
    model.n_layers, the model is simulated with `layers` and 2·`layers` blocks and the memory
    extrapolated to model.n_layers (see `extrapolate`)."""
    dims = check_layout(cfg, world_size)
    step, exits = worst_exit_step(cfg)
    if 0 < layers < cfg.model.n_layers:
        shallow, deeper = (_simulate_all(with_layers(cfg, n), world_size, exit_cost) for n in (layers, 2 * layers))
        ranks = extrapolate_ranks(cfg, dims.num_stages, step, shallow, deeper, layers)
    else:
        ranks = [simulate_rank(cfg, world_size, r, step, exit_cost) for r in stage_ranks(dims)]
    return dims, step, exits, ranks


def _simulate_all(cfg: RunConfig, world_size: int, exit_cost: bool) -> list[RankMemory]:
    step, _ = worst_exit_step(cfg)
    dims = check_layout(cfg, world_size)
    ranks = [simulate_rank(cfg, world_size, r, step, exit_cost) for r in stage_ranks(dims)]
    for r in ranks:
        r.exits_here = exits_on_stages(cfg, step, r.stages, dims.num_stages)
    return ranks
