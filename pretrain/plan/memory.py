"""What one training step holds in memory on this rank, measured by torch's MemTracker
(torch.distributed._tools) - the same way for a simulated step (fake tensors) and a real one.

"Peak" here is the largest total of live tensor storage bytes on the rank's device during the step
(parameters, buffers, gradients, optimizer state, activations, temporaries), tracked op by op; the
optimizer state already exists (as from the second step of a run on). It excludes what an allocator
adds on top (caching, fragmentation) and what the runtime holds outside tensors (CUDA context,
NCCL buffers): plan.memory_margin is kept free for those.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor._sharding_prop import ShardingPropagator

KINDS = ("Parameter", "Buffer", "Gradient", "Optstate", "Activation", "Temp", "Other")


class MicroBatchMemTracker(MemTracker):
    """MemTracker that allows the root module to run once per micro-batch within one step
    (MemTracker refuses a second top-level call, taking it for the next iteration), and that does
    not count DTensor's sharding propagation (see `_sharding_propagation_untracked`)."""

    _propagating = 0   # > 0 while DTensor derives an op's output metadata

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if MicroBatchMemTracker._propagating:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _pre_fw_hook(self, module, inputs):
        parents = self._mod_tracker.parents
        again = module in self.memory_tracking and not self._mod_tracker.is_bw
        if again:
            parents.add("micro-batches of one step")
        try:
            super()._pre_fw_hook(module, inputs)
        finally:
            if again:
                parents.discard("micro-batches of one step")


@dataclass
class StepMemory:
    peak: int                          # bytes, see the module docstring
    by_kind: dict[str, int]            # the peak's breakdown, KINDS


def warm_optimizer_state(parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
    """Create the optimizer state as a first step would (zero gradients, one step, gradients
    freed), so the tracked step holds it from its start as every later step does."""
    for part in parts:
        for p in part.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _sharding_propagation_untracked() -> Iterator[None]:
    """DTensor derives an op's output shapes by running it on empty global-shape tensors under
    the active fake mode, or a fresh one when there is none. In a real run MemTracker skips that
    fresh mode's ops; under the simulation's fake mode it counted them as the rank's memory (at
    the fused AdamW step: parameters, gradients and both moments at global shape, +34% at TP 2).
    Neither side counts them now: they are metadata, not memory on the device."""
    propagate = ShardingPropagator._propagate_tensor_meta_non_cached

    def untracked(self, op_schema):
        MicroBatchMemTracker._propagating += 1
        try:
            return propagate(self, op_schema)
        finally:
            MicroBatchMemTracker._propagating -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = untracked
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = propagate


def tracked_step(trainer, plan, batch: dict[str, torch.Tensor], warm: bool = True) -> StepMemory:
    """Run trainer.train_step(plan, batch) under the tracker (after warm_optimizer_state unless the
    caller did it); the peak and its breakdown."""
    if warm:
        warm_optimizer_state(trainer.model_parts, trainer.optimizer_parts)
    tracker = MicroBatchMemTracker()
    tracker.track_external(*trainer.model_parts, *trainer.optimizer_parts)
    with _sharding_propagation_untracked(), tracker:
        trainer.train_step(plan, batch)
    snapshot = tracker.get_tracker_snapshot("peak")
    device_snap = max(snapshot.values(), key=lambda s: s.get("Total", 0)) if snapshot else {}
    named = {getattr(k, "value", str(k)): int(v) for k, v in device_snap.items()}
    return StepMemory(peak=named.get("Total", 0), by_kind={k: named.get(k, 0) for k in KINDS})


def random_batch(vocab_size: int, batch_size: int, seq_len: int, first_sample: int,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A batch of this rank's shape as the data loader gives it (tokens, targets, global sample ids)."""
    g = torch.Generator().manual_seed(first_sample)
    tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g)
    ids = torch.arange(first_sample, first_sample + batch_size)
    return {"tokens": tokens[:, :-1].to(device), "targets": tokens[:, 1:].to(device), "sample_ids": ids.to(device)}


@dataclass
class RankMemory:
    rank: int
    pp_rank: int
    stages: list[int]                # pipeline stage indices held ([0] without pipelining)
    memory: StepMemory
    exit_logits: int | None          # peak - peak of the same step with the final exit only
    in_flight: int
    exits_here: int = 0              # exits on at the simulated step on this rank's stages
