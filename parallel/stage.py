"""A model part: the blocks [start, stop) of the LayerSkip model, the embedding when start is 0,
and on EVERY part a replica of the shared exit head (final norm + output projection), so that the
early-exit losses of a part's own blocks are computed where those blocks live. Without pipelining
the whole model is one part, [0, L).

`as_stage` turns a (pruned) LayerSkipTransformer into a `LayerSkipStage` in place (a class swap,
as FSDP does), which keeps parameter names - and so checkpoints - identical to the plain model.
Its forward is the plain model's, unless a `step` is passed: then `step(part, inputs, **kwargs)`
runs instead, inside the part's forward so that FSDP's hooks (which gather the part's weights)
fire around it. The trainer's LayerSkip step (pretrain/trainer/step.py) is that function.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from pretrain.model import LayerSkipTransformer


class LayerSkipStage(LayerSkipTransformer):
    stage_start: int
    stage_stop: int
    seq_shards: int                   # sequence-parallel degree of the activations between blocks
    dummy_row_for_empty: bool         # see _run_block; set by parallelize under FSDP

    @property
    def is_first_stage(self) -> bool:
        return self.stage_start == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_stop == self.cfg.n_layers

    def exits_here(self, exits) -> list[int]:
        """Those of `exits` (1-based) whose block lives on this part (exit l = output of block l-1)."""
        return sorted(l for l in exits if self.stage_start < l <= self.stage_stop)

    def _run_block(self, block, h, cos, sin, rows, cache, layer):
        """FSDP needs every rank to run every block, forward and backward, in the same order.
        A rank whose rows all skip a block therefore runs it on one row and adds 0 x its output:
        h is unchanged and the block's gradients are exactly zero. (Running it on an empty batch
        is not enough: DTensor cannot run a zero-row batch, and FSDP's backward hooks did not fire
        reliably for one - a collective mismatch under the interleaved schedule.)"""
        if self.dummy_row_for_empty and rows is not None and not bool(rows.any()):
            out = block(h[:1], cos, sin, cache, layer)
            return h + 0.0 * out.sum()
        return super()._run_block(block, h, cos, sin, rows, cache, layer)

    def positions(self, h: torch.Tensor) -> torch.Tensor | None:
        """Under sequence parallelism the local activation holds seq_len / tp positions, but RoPE
        is applied after the sequence is gathered: pass the full position range explicitly."""
        if self.seq_shards == 1:
            return None
        return torch.arange(h.shape[1] * self.seq_shards, device=h.device)

    def forward(self, inputs: torch.Tensor, step: Callable | None = None, **kwargs):
        if step is not None:
            return step(self, inputs, **kwargs)
        if self.seq_shards > 1 and kwargs.get("positions") is None:
            kwargs["positions"] = torch.arange(inputs.shape[1], device=inputs.device)
        return super().forward(inputs, **kwargs)


def as_stage(model: LayerSkipTransformer, start: int, stop: int, seq_shards: int = 1) -> LayerSkipStage:
    """Make `model` (holding at least blocks [start, stop)) a LayerSkipStage in place."""
    if type(model) is not LayerSkipTransformer:
        raise TypeError(f"as_stage expects a plain LayerSkipTransformer, got {type(model).__name__}")
    model.__class__ = LayerSkipStage
    model.stage_start, model.stage_stop, model.seq_shards = start, stop, seq_shards
    model.dummy_row_for_empty = False
    return model


def stage_layer_ranges(n_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Contiguous, equal [start, stop) block ranges, one per pipeline stage."""
    if n_layers % num_stages:
        raise ValueError(f"{n_layers} layers do not split into {num_stages} equal stages")
    per = n_layers // num_stages
    return [(s * per, (s + 1) * per) for s in range(num_stages)]


def stages_of_rank(pp_rank: int, pp: int, virtual_stages: int) -> list[int]:
    """Stage indices held by pipeline rank `pp_rank`: looped placement r, r+pp, r+2pp, ...
    (what torch's interleaved schedules expect)."""
    return [pp_rank + v * pp for v in range(virtual_stages)]


def prune_to_stage(model: LayerSkipTransformer, start: int, stop: int) -> LayerSkipTransformer:
    """Keep blocks [start, stop); drop the embedding unless this is the first stage. The exit
    head (norm, output) stays on every stage."""
    for name in list(model.layers.keys()):
        if not start <= int(name) < stop:
            del model.layers[name]
    if start > 0:
        del model.tok_embeddings
        if model.cfg.tie_embeddings:
            # This stage's output projection is a replica of the tied embedding: checkpoint its
            # optimizer state under the embedding's name, as the single model does.
            model.checkpoint_aliases = {"output.weight": "tok_embeddings.weight"}
    return model


def split_into_stages(model: LayerSkipTransformer, num_stages: int, stage_ids: list[int], seq_shards: int = 1
                      ) -> list[tuple[int, LayerSkipStage]]:
    """(stage index, stage module) for the stages `stage_ids` of `num_stages`; one stage of one is
    the whole model."""
    ranges = stage_layer_ranges(model.cfg.n_layers, num_stages)
    stages = []
    for i, s in enumerate(stage_ids):
        part = model if i == len(stage_ids) - 1 else copy.deepcopy(model)
        start, stop = ranges[s]
        stages.append((s, as_stage(prune_to_stage(part, start, stop), start, stop, seq_shards)))
    return stages
