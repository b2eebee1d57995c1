"""Pipeline parallelism with torch.distributed.pipelining.

The model's blocks are cut into `pp · virtual_stages` contiguous, equal ranges; pipeline rank r
holds stages r, r + pp, ... (one for GPipe / 1F1B, several for Interleaved1F1B). Each stage is a
pruned copy of the full model (so parameter names stay those of the single model) turned into a
`LayerSkipStage`: embedding on stage 0 only, its blocks, and a replica of the exit head
(tied to the embedding on stage 0 when the model ties them).

Per-micro-batch inputs other than the activation — targets and the global sample ids that key
the layer-dropout masks — are passed to `schedule.step` as keyword arguments on every rank; the
schedule splits them into micro-batches like the positional input and hands micro-batch i's
slice to every stage's forward. Losses are token sums over the step's global token count, so the
schedule must not rescale gradients (scale_grads=False).
"""
from __future__ import annotations

import copy

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from pretrain.model import LayerSkipTransformer
from parallel.layout import Layout, stage_layer_ranges, stages_of_rank
from parallel.stage import LayerSkipStage, as_stage


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


def split_into_stages(model: LayerSkipTransformer, layout: Layout, pp_rank: int, seq_shards: int
                      ) -> list[tuple[int, LayerSkipStage]]:
    """(stage index, stage module) for the stages held by this pipeline rank."""
    ranges = stage_layer_ranges(model.cfg.n_layers, layout.num_stages)
    ids = stages_of_rank(pp_rank, layout.pp, layout.virtual_stages)
    stages = []
    for i, s in enumerate(ids):
        part = model if i == len(ids) - 1 else copy.deepcopy(model)
        start, stop = ranges[s]
        stages.append((s, as_stage(prune_to_stage(part, start, stop), start, stop, seq_shards)))
    return stages


def _loss_is_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns the step's (weighted, token-normalised) loss."""
    return output


def build_schedule(stages: list[tuple[int, LayerSkipStage]], layout: Layout, *, device: torch.device,
                   pp_group, micro_batch: int, seq_len: int, dim: int, seq_shards: int):
    """PipelineStage per held stage with static shapes (no shape-inference forward: our forward
    records losses), and the schedule named by parallel.pp_schedule."""
    pipe_stages = []
    act = torch.empty(micro_batch, seq_len // seq_shards, dim, device="meta", requires_grad=True)
    tokens = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
    for index, module in stages:
        inputs = tokens if index == 0 else act
        outputs = torch.empty((), device="meta", requires_grad=True) if module.is_last_stage else act
        pipe_stages.append(PipelineStage(module, index, layout.num_stages, device, input_args=inputs,
                                         output_args=outputs, group=pp_group))
    cls = get_schedule_class(layout.pp_schedule)
    first = pipe_stages[0] if issubclass(cls, PipelineScheduleSingle) else pipe_stages
    return cls(first, layout.microbatches, loss_fn=_loss_is_output, scale_grads=False)


def run_schedule(schedule, batch: dict[str, torch.Tensor], *, has_first: bool, has_last: bool) -> None:
    """One forward/backward over all micro-batches of this rank's batch."""
    args = (batch["tokens"],) if has_first else ()
    schedule.step(*args, target=batch["targets"] if has_last else None, return_outputs=False,
                  targets=batch["targets"], sample_ids=batch["sample_ids"])
