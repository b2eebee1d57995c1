"""Gather a model trained under any layout into one plain LayerSkipTransformer on rank 0:
for evaluation during training and for export (e.g. the Hugging Face layout).

Sharded weights (FSDP, tensor parallel) are gathered with DTensor.full_tensor() inside each
pipeline stage; the stages' state dicts are then gathered to global rank 0 over the pipeline
group of the ranks at data-parallel and tensor-parallel coordinate 0. The whole model is held in
rank 0's CPU memory; for models too large for that, export from a saved checkpoint instead
(`pretrain.model_loading.load_model` loads a DCP checkpoint of any layout into one process).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from pretrain.model import LayerSkipTransformer
from parallel.dims import ParallelDims
from parallel.parallelize import canonical_parameter_name


def local_full_state_dict(parts: Sequence[nn.Module]) -> dict[str, torch.Tensor]:
    """Unsharded CPU copies of this rank's parts' parameters (collective over each stage's mesh)."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for name, value in part.state_dict().items():
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            out[canonical_parameter_name(name)] = value.detach().cpu().clone()
    return out


def full_state_dict(parts: Sequence[nn.Module], dims: ParallelDims) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on global rank 0 (None on other ranks). All ranks call."""
    state = local_full_state_dict(parts)
    if dims.pp_group is None:
        return state if dims.is_main else None
    if dims.dp_rank != 0 or dims.tp_rank != 0:
        return None
    gathered: list | None = [None] * dist.get_world_size(dims.pp_group) if dims.is_main else None
    dist.gather_object(state, gathered, dst=0, group=dims.pp_group)
    if not dims.is_main:
        return None
    merged: dict[str, torch.Tensor] = {}
    for piece in gathered:
        merged.update(piece)
    return merged


def consolidated_model(parts: Sequence[nn.Module], dims: ParallelDims,
                       device: torch.device | str = "cpu") -> LayerSkipTransformer | None:
    """A plain LayerSkipTransformer with the trained weights on rank 0; None elsewhere."""
    state = full_state_dict(parts, dims)
    if state is None:
        return None
    model = LayerSkipTransformer(parts[0].cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device)
