"""Pipeline parallelism with torch.distributed.pipelining: one way of running the trainer's step
over the micro-batches of a rank's batch.

The model's blocks are cut into `pp · virtual_stages` contiguous, equal ranges (parallel/stage.py);
pipeline rank r holds stages r, r + pp, ... (one for GPipe / 1F1B, several for Interleaved1F1B).

Per-micro-batch inputs other than the activation — targets and the global sample ids that key
the layer-dropout masks — are passed to `schedule.step` as keyword arguments on every rank; the
schedule splits tensors into micro-batches like the positional input and hands the `step`
function (not a tensor) unchanged to every stage's forward. Losses are token sums over the step's
global token count, so the schedule must not rescale gradients (scale_grads=False).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from parallel.dims import ParallelDims
from parallel.stage import LayerSkipStage


class AddStageLoss(torch.autograd.Function):
    """y = h in forward. In backward, grad_h passes through unchanged and the stage's loss
    receives gradient 1 — as if the stage's loss had been added to the pipeline's final loss.
    The pipeline schedule only back-propagates from the tensor a stage sends, so this is how a
    middle stage's losses reach its (and earlier stages') parameters."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, loss: torch.Tensor | None) -> torch.Tensor:
        ctx.has_loss = loss is not None
        if ctx.has_loss:
            ctx.loss_dtype, ctx.loss_device = loss.dtype, loss.device
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        if not ctx.has_loss:
            return grad_h, None
        return grad_h, torch.ones((), dtype=ctx.loss_dtype, device=ctx.loss_device)


def stage_output(part: LayerSkipStage, h: torch.Tensor, loss: torch.Tensor | None) -> torch.Tensor:
    """What a part's training forward returns: its loss on the last stage; otherwise the
    activation to send on, carrying the part's own loss into the backward pass. Always a fresh
    tensor, never a block's own output: FSDP hooks the module output for its pre-backward, and
    the hooks' order on a shared tensor would depend on which rows ran."""
    return loss if part.is_last_stage else AddStageLoss.apply(h, loss)


def _loss_is_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The last stage already returns the step's (weighted, token-normalised) loss."""
    return output


def build_schedule(stages: list[tuple[int, LayerSkipStage]], dims: ParallelDims, *, micro_batch: int,
                   seq_len: int):
    """PipelineStage per held stage with static shapes (no shape-inference forward: the training
    forward records losses), and the schedule named by dims.pp_schedule."""
    pipe_stages = []
    dim = stages[0][1].cfg.dim
    act = torch.empty(micro_batch, seq_len // dims.tp, dim, device="meta", requires_grad=True)
    tokens = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
    for index, module in stages:
        inputs = tokens if index == 0 else act
        outputs = torch.empty((), device="meta", requires_grad=True) if module.is_last_stage else act
        pipe_stages.append(PipelineStage(module, index, dims.num_stages, dims.device, input_args=inputs,
                                         output_args=outputs, group=dims.pp_group))
    cls = get_schedule_class(dims.pp_schedule)
    first = pipe_stages[0] if issubclass(cls, PipelineScheduleSingle) else pipe_stages
    return cls(first, dims.microbatches, loss_fn=_loss_is_output, scale_grads=False)


def run_schedule(schedule, stages: list[tuple[int, LayerSkipStage]], batch: dict[str, torch.Tensor],
                 step: Callable) -> None:
    """Forward and backward of `step` over all micro-batches of this rank's batch."""
    has_first = any(i == 0 for i, _ in stages)
    has_last = any(m.is_last_stage for _, m in stages)
    args = (batch["tokens"],) if has_first else ()
    schedule.step(*args, target=batch["targets"] if has_last else None, return_outputs=False,
                  targets=batch["targets"], sample_ids=batch["sample_ids"], step=step)
