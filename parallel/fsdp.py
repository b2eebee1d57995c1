"""FSDP2 (fully_shard) per block plus the root; HSDP when the mesh has dp_replicate.

Two LayerSkip-specific settings:
  * gradients are SUMMED over data-parallel ranks, not averaged: every micro-batch loss is
    already divided by the token count of the whole step on all ranks, so the sum is exactly the
    single-process gradient (a sum-only reduction, which gloo and NCCL both support);
  * FSDP all-gathers a block's weights when the block runs, so a rank whose samples all skip a
    block must still run it or the job hangs: parallelize sets the stage's dummy_row_for_empty
    (parallel/stage.py) on every part it shards.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, reshard_after_forward: bool = True) -> None:
    """Shard every block, then the root (embedding, exit head), over `dp_mesh` (1-D: FSDP;
    2-D (dp_replicate, dp_shard): HSDP)."""
    for block in model.layers.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def set_gradient_sync(model: nn.Module, last_micro_batch: bool, reduce_every_micro_batch: bool) -> None:
    """Gradient reduction for the micro-batch about to run backward.

    reduce_every_micro_batch: every micro-batch's gradients are reduce-scattered and accumulate
    sharded (1/dp_shard of the float32 gradients in memory); HSDP's all-reduce over the replicas
    waits for the last. Otherwise the reduction waits for the last micro-batch and gradients
    accumulate unsharded: one reduce-scatter a step, but the full model's float32 gradients on
    every rank (25 GiB at 7B parameters), which defeats sharding."""
    if not isinstance(model, FSDPModule):
        return
    if reduce_every_micro_batch:
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last_micro_batch)
    else:
        model.set_requires_gradient_sync(last_micro_batch)
