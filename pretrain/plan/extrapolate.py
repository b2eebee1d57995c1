"""Memory of a deep model from simulations of a shallow one (plan.layers): a model with K and 2K
blocks is simulated and each rank's memory carried to model.n_layers - linearly in the blocks for
the plain step, per exit for the early exits' share."""
from __future__ import annotations

import copy

from pretrain.config import RunConfig
from pretrain.layerskip.plan import step_plan
from pretrain.plan.memory import RankMemory, StepMemory
from parallel.stage import stage_layer_ranges


def exits_on_stages(cfg: RunConfig, step: int, stages: list[int], num_stages: int) -> int:
    """Exits on at `step` whose block lives on one of `stages` (exit l = output of block l-1)."""
    ranges = stage_layer_ranges(cfg.model.n_layers, num_stages)
    return sum(any(ranges[s][0] < l <= ranges[s][1] for s in stages) for l in step_plan(cfg, step).exit_weights)


def with_layers(cfg: RunConfig, n_layers: int) -> RunConfig:
    """cfg with n_layers blocks (exit_layers beyond them dropped)."""
    short = copy.deepcopy(cfg)
    short.model.n_layers = n_layers
    ee = short.layerskip.early_exit
    if ee.exit_layers:
        ee.exit_layers = [l for l in ee.exit_layers if l <= n_layers] or None
    return short


def exit_bytes_per_exit(a: RankMemory, b: RankMemory, last_stage: int) -> float | None:
    """Bytes one early exit adds at the peak on this rank (from the depth with more of them on it),
    or None when neither simulated depth had one here (or exit_cost was off)."""
    final = 1 if last_stage in a.stages else 0     # the final exit belongs to the plain step
    known = max((a, b), key=lambda r: r.exits_here)
    if known.exit_logits is None or known.exits_here <= final:
        return None
    return known.exit_logits / (known.exits_here - final)


def extrapolate(a: RankMemory, b: RankMemory, la: int, lb: int, layers: int, exits_full: int, last_stage: int,
                per_exit: float) -> RankMemory:
    """The rank's memory at `layers` blocks from simulations at la and lb blocks.

    Without the early exits' share, every byte count is linear in the blocks (parameters, gradients,
    optimizer state, activations kept per block; under pipelining a stage's share of them; the
    embedding, head and one gathered block are the constant): v(L) = v(la) + (v(lb) - v(la))·(L - la)/(lb - la).
    The early exits' share (exit_logits, known with plan.exit_cost) is per exit on this rank and
    does not depend on the depth (tokens x vocabulary): per_exit·(exits(L) - f), f = 1 on the rank
    holding the final exit (part of the plain step), else 0 (`exit_bytes_per_exit`). Without
    exit_cost the peak is extrapolated linearly."""
    def line(x: int, y: int) -> int:
        return int(round(x + (y - x) * (layers - la) / (lb - la)))

    kinds = {k: line(a.memory.by_kind[k], b.memory.by_kind[k]) for k in a.memory.by_kind}
    exit_logits = None
    if a.exit_logits is not None and b.exit_logits is not None:
        plain = line(a.memory.peak - a.exit_logits, b.memory.peak - b.exit_logits)
        final = 1 if last_stage in a.stages else 0
        exit_logits = int(round(per_exit * max(0, exits_full - final)))
        peak = plain + exit_logits
    else:
        peak = line(a.memory.peak, b.memory.peak)
    kinds["Activation"] += peak - sum(kinds.values())   # the breakdown adds up to the extrapolated peak
    return RankMemory(rank=a.rank, pp_rank=a.pp_rank, stages=a.stages, memory=StepMemory(peak=peak, by_kind=kinds),
                      exit_logits=exit_logits, in_flight=a.in_flight, exits_here=exits_full)


def extrapolate_ranks(cfg: RunConfig, num_stages: int, step: int, shallow: list[RankMemory], deeper: list[RankMemory],
                      layers: int) -> list[RankMemory]:
    """Each simulated rank at cfg.model.n_layers from its simulations at `layers` and 2·`layers`
    blocks; `step` is the full run's worst step."""
    last = num_stages - 1
    full = [exits_on_stages(cfg, step, r.stages, num_stages) for r in shallow]
    per_exit = [exit_bytes_per_exit(a, b, last) for a, b in zip(shallow, deeper)]
    known = [p for p in per_exit if p is not None]
    fallback = max(known) if known else 0.0   # a rank with no early exit at either depth: the largest seen
    return [extrapolate(a, b, layers, 2 * layers, cfg.model.n_layers, e, last, fallback if p is None else p)
            for a, b, e, p in zip(shallow, deeper, full, per_exit)]
