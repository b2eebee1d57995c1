"""Memory/speed wrappers for a plain LayerSkipTransformer: activation checkpointing and
torch.compile (the single-process trainer's `parallelize`).

Under a parallel layout the order per model part is: tensor parallel -> activation checkpointing
-> FSDP (see parallel/engine.py; the layout, mesh and process group come from parallel/layout.py
and parallel/mesh.py; pipeline stages from parallel/pipeline.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from pretrain.config import RunConfig


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward (per block, so skipped rows cost nothing)."""
    for name, block in list(model.layers.items()):
        model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block separately: blocks are identical, so one compiled graph is reused."""
    for name, block in list(model.layers.items()):
        model.layers[name] = torch.compile(block, dynamic=True)


def parallelize(model: nn.Module, cfg: RunConfig) -> nn.Module:
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        apply_compile(model)
    return model
