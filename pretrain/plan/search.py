"""plan.search: the layouts of N devices worth trying, each simulated, ranked - those that fit
first, then by predicted tokens/s.

Meshes: tp in 1, 2, 4, 8 (within a node), pp dividing the layers, data parallel the rest, as FSDP
(dp_shard = dp) or, above one node, HSDP with dp_shard filling a node (8 devices). Impossible ones
are dropped by the trainer's own check (pretrain.config.check_layout) before anything runs. For
each mesh the settings - activation checkpointing off/on, micro-batch size, chunked exit loss -
are tried fastest first (predicted tokens/s) and the first that fits ends that mesh's search
(at most `per_mesh` simulations), so a search costs a few fake steps per mesh.
"""
from __future__ import annotations

import copy
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from pretrain.config import ConfigError, RunConfig, check_layout
from pretrain.plan.devices import Device
from pretrain.plan.estimate import predict_throughput
from pretrain.plan.simulate import SimulationError, simulate_layout, worst_exit_step

NODE = 8


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(n: int) -> Iterator[dict]:
    for tp in (t for t in (1, 2, 4, 8) if n % t == 0):
        for pp in _divisors(n // tp):
            dp = n // tp // pp
            yield {"tp": tp, "pp": pp, "dp_shard": dp, "dp_replicate": 1}
            shard = NODE // tp
            if dp > shard > 1 and dp % shard == 0:
                yield {"tp": tp, "pp": pp, "dp_shard": shard, "dp_replicate": dp // shard}


def with_layout(cfg: RunConfig, mesh: dict, ac: bool, micro: int, chunk: int) -> RunConfig:
    c = copy.deepcopy(cfg)
    for key, value in mesh.items():
        setattr(c.parallel, key, value)
    c.parallel.microbatches = 0
    c.parallel.virtual_stages = 1
    if mesh["pp"] > 1 and c.parallel.pp_schedule.lower() == "interleaved1f1b":
        c.parallel.pp_schedule = "1F1B"
    c.train.activation_checkpointing = ac
    c.train.micro_batch_size = micro
    c.layerskip.early_exit.loss_chunk_tokens = chunk
    return c


@dataclass
class Candidate:
    cfg: RunConfig
    tokens_per_s: float


def settings(cfg: RunConfig, mesh: dict, world_size: int, device: Device, mfu: float, exits_on: int
             ) -> list[Candidate]:
    """The valid settings of one mesh worth trying, fastest first. Settings of equal predicted speed
    differ only in micro-batch size: the largest (the most efficient on a real device) is tried,
    then the smallest (the least activation memory), before a slower setting."""
    dp = mesh["dp_shard"] * mesh["dp_replicate"]
    if cfg.train.global_batch_size % dp:
        return []
    local = cfg.train.global_batch_size // dp
    chunk = cfg.layerskip.early_exit.loss_chunk_tokens
    chunks = [chunk] + ([min(4096, cfg.train.seq_len * local)] if chunk == 0 and exits_on > 1 else [])
    found = []
    for ac in (False, True):
        for c in chunks:
            for micro in sorted((d for d in _divisors(local)), reverse=True):
                candidate = with_layout(cfg, mesh, ac, micro, c)
                try:
                    dims = check_layout(candidate, world_size)
                except ConfigError:
                    continue
                speed = predict_throughput(candidate, dims, exits_on, device, mfu).tokens_per_s
                found.append(Candidate(candidate, speed))
    found.sort(key=lambda c: (-c.tokens_per_s, -c.cfg.train.micro_batch_size))
    tiers: dict[float, list[Candidate]] = {}
    for cand in found:
        tiers.setdefault(round(cand.tokens_per_s, 6), []).append(cand)
    return [c for tier in tiers.values() for c in ([tier[0], tier[-1]] if len(tier) > 1 else tier)]


def search(cfg: RunConfig, world_size: int, device: Device, margin: float, mfu: float, per_mesh: int = 4,
           layers: int = 0) -> list[tuple[RunConfig, object]]:
    """[(candidate config, simulate_layout result)], the best tried setting of each mesh."""
    usable = device.memory_bytes * (1 - margin)
    _, exits_on = worst_exit_step(cfg)
    results = []
    for mesh in meshes(world_size):
        tried = None
        for cand in settings(cfg, mesh, world_size, device, mfu, exits_on)[:per_mesh]:
            stages = cand.cfg.parallel.pp * cand.cfg.parallel.virtual_stages
            depth = -(-layers // stages) * stages          # plan.layers rounded up to whole stages
            try:
                tried = (cand.cfg, simulate_layout(cand.cfg, world_size, exit_cost=False, layers=depth))
            except SimulationError as err:   # reported, and the search goes on with the next mesh
                print(f"plan.search: {mesh} not simulated: {err}", file=sys.stderr)
                break
            if max(r.memory.peak for r in tried[1][3]) <= usable:
                break
        if tried is not None:
            results.append(tried)
    return results
