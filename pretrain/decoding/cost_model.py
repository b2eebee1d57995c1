"""Measured costs of the decoder's pieces on this machine, for schedules.speedup.DecodeCosts.

The paper's speedup formula counts blocks: a block on γ+1 positions costs what it costs on one,
and the shared head costs nothing. Neither holds everywhere: a small model's head weighs as much
as a few blocks, and on a CPU a block's matmuls on γ+1 positions take longer than on one. Timing
the pieces where they run (one row after a context, through the same KV cache and compiled or
eager blocks the decoder uses) gives the cost model that predicts the speedup on this hardware
and lets the dynamic exit choose (E, γ) by time instead of by layer count. What a forward pass
costs beyond its blocks and head (embedding, choosing the token, cache bookkeeping) is measured
too: autoregressive decoding pays it per token, self-speculative decoding per draft or verify
pass. Strategy auto also calibrates these parts on the decoder's own steps and rounds at its exit
(`calibrate_on_decodes`): what a round costs besides its passes (accepting the drafts, committing,
cropping every layer's cache) is not in the parts, and without it auto drafted where drafting lost
(the late-exit case of bench.decoding_auto, E=5 at batch 8).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
import weakref
from collections.abc import Callable

import torch

from pretrain.decoding.compiled import decoding_cache_type
from pretrain.decoding.kv_cache import ExitQueryCache
from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.sampling import SamplingConfig
from pretrain.decoding.self_speculative import speculative_round
from pretrain.decoding.sequences import Sequences
from pretrain.decoding.stats import DecodeStats
from pretrain.decoding.stepwise import decode_step, decode_stepwise, prefill
from pretrain.device import synchronize
from schedules.speedup import DecodeCosts, round_cost


# the pass overhead is the slope of autoregressive decoding time over this many extra tokens
_STEP_TOKENS = (2, 18)


def greedy_autoregressive(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy autoregressive decoding as generate() runs it (prefill, then one token per forward
    through every block); here so that the cost model does not import generate(), which uses it."""
    device = model.tok_embeddings.weight.device
    seqs = Sequences(prompts, new_tokens, None, spare=1, device=device)
    runner = BlockRunner(model, decoding_cache_type(model).for_model(model, seqs.batch, seqs.capacity), DecodeStats())
    greedy = SamplingConfig()
    prefill(runner, seqs, model.cfg.n_layers, greedy, None)
    decode_stepwise(runner, seqs, model.cfg.n_layers, greedy, None)
    return seqs.outputs()


@torch.no_grad()
def measure_decode_costs(model: torch.nn.Module, max_positions: int, context: int | None = None,
                         repeats: int = 15, warmup: int = 3, seed: int = 0, batch: int = 1) -> DecodeCosts:
    """Median seconds (CPU seconds on the CPU) of one block (all blocks on M positions, divided by L)
    and of the head with the greedy argmax on M positions, M = 1..max_positions, for `batch` rows
    after `context` cached tokens of random ids (default: up to 64, what the model's max_seq_len
    leaves); and the rest of a forward pass: the per-token slope of autoregressive decoding time
    less L b(1) + h(1). A forward of `batch` rows costs more than one of a single row (and not
    `batch` times as much): the costs of one batch size do not predict another's."""
    cfg = model.cfg
    longest = max(max_positions, _STEP_TOKENS[1])
    if context is None:
        context = min(64, cfg.max_seq_len - longest)
    if max_positions < 1 or context < 1 or repeats < 1 or batch < 1:
        raise ValueError(f"max_positions={max_positions}, context={context}, repeats={repeats} and batch={batch} "
                         "must be >= 1")
    if context + longest > cfg.max_seq_len:
        raise ValueError(f"context={context} + {longest} positions exceeds the model's max_seq_len={cfg.max_seq_len}")
    device = model.tok_embeddings.weight.device
    was_training = model.training
    model.eval()
    try:
        cache = decoding_cache_type(model).for_model(model, batch, context + max_positions)
        runner = BlockRunner(model, cache, DecodeStats())
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(cfg.vocab_size, (batch, context + max_positions), generator=generator).to(device)
        runner.blocks(runner.embed(ids[:, :context]), 0, cfg.n_layers)
        kept = torch.full((batch,), context, dtype=torch.long, device=device)
        block, head = [], []
        for m in range(1, max_positions + 1):
            h = runner.embed(ids[:, context:context + m])

            def blocks(h=h):
                runner.blocks(h, 0, cfg.n_layers)

            block.append(_median_seconds(blocks, lambda: cache.crop(kept), device, repeats, warmup) / cfg.n_layers)
            head.append(_median_seconds(lambda h=h: runner.head(h).argmax(-1), lambda: None, device, repeats,
                                        warmup))
        prompts = ids[:, :context].tolist()
        short, long = (_median_seconds(lambda n=n: greedy_autoregressive(model, prompts, n), lambda: None, device,
                                       max(repeats // 3, 3), 1)
                       for n in _STEP_TOKENS)
        per_token = (long - short) / (_STEP_TOKENS[1] - _STEP_TOKENS[0])
        step = max(per_token - cfg.n_layers * block[0] - head[0], 0.0)
    finally:
        model.train(was_training)
    return DecodeCosts(block=tuple(block), head=tuple(head), step=step, batch=batch)


@torch.no_grad()
def calibrate_on_decodes(model: torch.nn.Module, costs: DecodeCosts, exit_layer: int, context: int = 32,
                        repeats: int = 9, seed: int = 0) -> DecodeCosts:
    """`costs` calibrated on the decoder's own steps at `exit_layer`, for costs.batch rows of greedy
    decoding after `context` random tokens: a plain autoregressive step A and a draft-verify round
    R(γ) (speculative_round) for γ = 1..max_positions-1, timed in turn, `repeats` times, each in
    its own running decode (restarted untimed when it runs out of room), medians; R through the
    least-squares line over γ (from 3 draft lengths on). The rest of a pass becomes
    s = A - L b(1) - h(1) (negative if need be), and round_extra(γ) = R(γ) - round_cost(γ) of the
    passes, so that the model prices a step and every round as measured. Interleaving matters: on
    a shared machine the speed drifts between separate measurements by more than drafting gains."""
    cfg, L = model.cfg, model.cfg.n_layers
    longest = costs.max_positions - 1
    context = min(context, cfg.max_seq_len - 2 * (longest + 1) - 2)
    if not 1 <= exit_layer < L or context < 1 or longest < 1:
        raise ValueError(f"round costs need 1 <= exit_layer={exit_layer} < {L}, costs of 2+ positions "
                         f"(have {costs.max_positions}) and room for a context (max_seq_len={cfg.max_seq_len})")
    device = model.tok_embeddings.weight.device
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(cfg.vocab_size, (costs.batch, context), generator=generator).tolist()
    greedy, cache_type = SamplingConfig(), decoding_cache_type(model)
    clock = decode_clock(device)

    class Running:
        """A decode that takes one step (gamma 0) or round (gamma > 0) at a time."""

        def __init__(self, gamma: int):
            self.gamma = gamma
            self.restart()

        def restart(self):
            # room for every timed step or round and the untimed one (a cache of max_seq_len for
            # each γ would not fit a large model's memory), fewer where max_seq_len says so
            room = min((repeats + 1) * (self.gamma + 1) + 2, cfg.max_seq_len - context)
            self.seqs = Sequences(prompts, room, None, spare=self.gamma + 1, device=device)
            cache = cache_type.for_model(model, costs.batch, self.seqs.capacity)
            self.runner = BlockRunner(model, cache, DecodeStats())
            self.queries = ExitQueryCache(costs.batch, self.gamma + 2, cfg.dim,
                                          dtype=model.tok_embeddings.weight.dtype, device=device)
            prefill(self.runner, self.seqs, L, greedy, None)
            self.advance()   # untimed: the first step after a prefill pays for what the prefill left

        def advance(self):
            if self.gamma:
                speculative_round(self.runner, self.seqs, self.queries, exit_layer, self.gamma, greedy, None)
                drafted = self.runner.stats.draft_lens[-1]
                if drafted != self.gamma:
                    raise RuntimeError(f"the timed round drafted {drafted}, not γ={self.gamma}")
            else:
                decode_step(self.runner, self.seqs, L, greedy, None, track_lengths=True, states=(self.queries,))

        def timed(self) -> float:
            if self.seqs.most_remaining < self.gamma + 2:
                self.restart()
            synchronize(device)
            start = clock()
            self.advance()
            synchronize(device)
            return clock() - start

    was_training = model.training
    model.eval()
    try:
        decodes = [Running(gamma) for gamma in range(longest + 1)]
        times = [[d.timed() for d in decodes] for _ in range(repeats)]
    finally:
        model.train(was_training)
    step, *rounds = (statistics.median(column) for column in zip(*times))
    # s may come out negative (a block timed alone costs more than inside a step): kept, so that the
    # plain step is priced as measured; a round's (γ + 1) passes each pay s, its extra makes up the rest
    calibrated_step = step - L * costs.block_cost(1) - costs.head_cost(1)
    shift = calibrated_step - costs.step
    extra = tuple(r - round_cost(g, exit_layer, L, dataclasses.replace(costs, round_extra=())) - (g + 1) * shift
                  for g, r in enumerate(_fitted_line(rounds), start=1))
    return dataclasses.replace(costs, step=calibrated_step, round_extra=extra, exit_layer=exit_layer)


def _fitted_line(values: list[float]) -> list[float]:
    """values[i] (i = 0..n-1) replaced by the least-squares line through them, when n >= 3: a
    round's time grows by about one draft pass a draft, and the line through every γ's median is
    steadier than each median alone."""
    n = len(values)
    if n < 3:
        return list(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    slope = (sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
             / sum((i - mean_x) ** 2 for i in range(n)))
    return [mean_y + slope * (i - mean_x) for i in range(n)]


# model -> {(batch, positions, cache type, exit): costs}: measured once per model and batch size in a process
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_costs_at(model: torch.nn.Module, batch: int, max_positions: int, exit_layer: int | None = None,
                    repeats: int = 5) -> DecodeCosts:
    """The costs at this batch size (with `exit_layer`, also a round's extra cost at that exit),
    measured on first use and kept for the model's lifetime (a compiled model is measured anew).
    Under tensor parallelism every rank takes rank 0's timings, so that every rank makes the same
    choices (diverging ones would desynchronise the collectives)."""
    key = (batch, max_positions, decoding_cache_type(model).__name__, exit_layer)
    known = _MEASURED.setdefault(model, {})
    if key not in known:
        costs = [measure_decode_costs(model, max_positions, repeats=repeats, warmup=1, batch=batch)]
        if exit_layer is not None:
            costs = [calibrate_on_decodes(model, costs[0], exit_layer, repeats=repeats)]
        group = _tensor_parallel_group(model)
        if group is not None:
            import torch.distributed as dist

            dist.broadcast_object_list(costs, src=dist.get_global_rank(group, 0), group=group)
        known[key] = costs[0]
    return known[key]


def _tensor_parallel_group(model: torch.nn.Module):
    """The process group a tensor-parallel model's weights are sharded over, or None."""
    weight = next(iter(model.layers.values())).attention.wk.weight
    mesh = getattr(weight, "device_mesh", None)
    return None if mesh is None else mesh.get_group()


def decode_clock(device: torch.device) -> Callable[[], float]:
    """The clock decode costs are measured by: this process's CPU time on the CPU (on a machine
    shared with other work wall time mostly measures the others), wall time on an accelerator."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def tensor_parallel(model: torch.nn.Module) -> bool:
    return _tensor_parallel_group(model) is not None


def _median_seconds(fn: Callable[[], object], reset: Callable[[], None], device: torch.device, repeats: int,
                    warmup: int) -> float:
    """Median time of fn() (decode_clock) after the device finished its queued work; reset() runs
    untimed after each."""
    clock = decode_clock(device)
    times = []
    for i in range(warmup + repeats):
        synchronize(device)
        start = clock()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(clock() - start)
        reset()
    return statistics.median(times)
