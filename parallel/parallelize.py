"""The one place that wraps a model part for a parallel layout, in this order:

    tensor parallel -> activation checkpointing -> torch.compile -> FSDP

Tensor parallelism first (it replaces weights by DTensors that the later wrappers see), FSDP last
(it shards whatever the part has become). Checkpointing inside the compiled block lets the compiler
choose what to recompute; under tensor parallelism it wraps the compiled block instead (checkpoint
-> compile): torch 2.13's partitioner saves a DeviceMesh among the tensors of a recomputed DTensor
region ("expected all tensors_saved_with_vc_check to be Tensors"). The settings are plain values,
not the run config.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from parallel.compile import apply_compile
from parallel.dims import ParallelDims
from parallel.fsdp import apply_fsdp
from parallel.tensor_parallel import apply_tensor_parallel


WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")   # checkpoint_wrapper, torch.compile


@dataclass(frozen=True)
class ParallelizeSettings:
    activation_checkpointing: bool = False
    compile: bool = False
    compile_backend: str = "inductor"   # torch.compile backend (tests use aot_eager to skip code generation)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (per block, so skipped rows cost nothing)."""
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def parallelize(part: nn.Module, dims: ParallelDims, settings: ParallelizeSettings) -> nn.Module:
    """Wrap one model part (a parallel.stage.LayerSkipStage) in place and return it."""
    if dims.tp > 1:
        apply_tensor_parallel(part, dims.tp_mesh)
    checkpoint_outside = settings.compile and dims.tp > 1
    if settings.activation_checkpointing and not checkpoint_outside:
        apply_activation_checkpointing(part)
    if settings.compile:
        apply_compile(part, settings.compile_backend)
    if settings.activation_checkpointing and checkpoint_outside:
        apply_activation_checkpointing(part)
    if dims.dp > 1:
        # Under pipelining, weights stay gathered from forward to backward (each micro-batch
        # would otherwise all-gather them twice); the schedule reshards.
        apply_fsdp(part, dims.dp_mesh, reshard_after_forward=dims.pp == 1)
        part.dummy_row_for_empty = True
    return part


def canonical_parameter_name(name: str) -> str:
    """A parameter name without the levels the wrappers above insert (activation checkpointing,
    torch.compile): the name in the plain model."""
    for segment in WRAPPER_SEGMENTS:
        name = name.replace(segment, "")
    return name
