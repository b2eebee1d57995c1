"""Measured costs of the decoder's pieces on this machine, for schedules.speedup.DecodeCosts.

The paper's speedup formula counts blocks: a block on γ+1 positions costs what it costs on one,
and the shared head costs nothing. Neither holds everywhere: a small model's head weighs as much
as a few blocks, and on a CPU a block's matmuls on γ+1 positions take longer than on one. Timing
the pieces where they run (one row after a context, through the same KV cache and compiled or
eager blocks the decoder uses) gives the cost model that predicts the speedup on this hardware
and lets the dynamic exit choose (E, γ) by time instead of by layer count. What a forward pass
costs beyond its blocks and head (embedding, choosing the token, cache bookkeeping) is measured
too: autoregressive decoding pays it per token, self-speculative decoding per draft or verify
pass. And so is what a draft-verify round costs besides its passes (accepting the drafts,
committing, cropping every layer's cache): the parts alone under-predicted a batch-8 round on this
CPU by 3-6%, enough for strategy auto to draft where drafting lost.
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
from pretrain.decoding.stepwise import decode_stepwise, prefill
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
def measure_round_extra(model: torch.nn.Module, costs: DecodeCosts, exit_layer: int, context: int = 32,
                        repeats: int = 5, warmup: int = 1, seed: int = 0) -> DecodeCosts:
    """`costs` with round_extra measured at `exit_layer`: for γ = 1..max_positions-1, the median
    time of one real greedy draft-verify round (speculative_round) of costs.batch rows after
    `context` cached random tokens, less round_cost(γ) of its passes without it. Each timed round
    starts from a fresh prefill (untimed), so the measurement needs context + γ + 1 positions."""
    cfg, L = model.cfg, model.cfg.n_layers
    longest = costs.max_positions - 1
    context = min(context, cfg.max_seq_len - longest - 1)
    if not 1 <= exit_layer < L or context < 1 or longest < 1:
        raise ValueError(f"round costs need 1 <= exit_layer={exit_layer} < {L}, costs of 2+ positions "
                         f"(have {costs.max_positions}) and room for a context (max_seq_len={cfg.max_seq_len})")
    device = model.tok_embeddings.weight.device
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(cfg.vocab_size, (costs.batch, context), generator=generator).tolist()
    greedy, cache_type = SamplingConfig(), decoding_cache_type(model)
    was_training = model.training
    model.eval()
    try:
        extra = []
        for gamma in range(1, longest + 1):
            state = {}

            def fresh(gamma=gamma, state=state):
                seqs = Sequences(prompts, gamma + 1, None, spare=gamma + 1, device=device)
                runner = BlockRunner(model, cache_type.for_model(model, seqs.batch, seqs.capacity), DecodeStats())
                prefill(runner, seqs, L, greedy, None)
                queries = ExitQueryCache(seqs.batch, gamma + 1, cfg.dim, dtype=model.tok_embeddings.weight.dtype,
                                         device=device)
                state.update(seqs=seqs, runner=runner, queries=queries)

            def one_round(gamma=gamma, state=state):
                speculative_round(state["runner"], state["seqs"], state["queries"], exit_layer, gamma, greedy, None)

            fresh()
            seconds = _median_seconds(one_round, fresh, device, repeats, warmup)
            extra.append(seconds - round_cost(gamma, exit_layer, L, costs))
    finally:
        model.train(was_training)
    return dataclasses.replace(costs, round_extra=tuple(extra), exit_layer=exit_layer)


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
            costs = [measure_round_extra(model, costs[0], exit_layer, repeats=repeats)]
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


def _median_seconds(fn: Callable[[], object], reset: Callable[[], None], device: torch.device, repeats: int,
                    warmup: int) -> float:
    """Median time of fn() after the device finished its queued work; reset() runs untimed after each.
    On the CPU this process's CPU time: the ratios of the costs are what decide, and on a machine
    shared with other work wall time mostly measures the others (an accelerator: wall time)."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
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
