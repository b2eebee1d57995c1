"""The LayerSkip training step on one micro-batch of one model part, written once for every
layout (one process, data / tensor / pipeline parallel):

    keep masks (per global sample) -> the part's blocks, kept rows only -> early-exit loss at the
    exits on at this step whose block lives here -> block-rows counted -> loss (last part) or the
    activation carrying the part's loss (other pipeline parts).

`LayerSkipStep` is called from inside the part's forward (parallel/stage.py), by the trainer's
micro-batch loop or by the pipeline schedule. It sums what it reports (per-exit losses, rows run)
over the micro-batches; the trainer reduces those over ranks. Every exit's loss is a token sum
divided by the token count of the whole optimizer step, so gradients are plain sums over
micro-batches and ranks and do not depend on the split.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.device import autocast
from pretrain.layerskip.early_exit_loss import IGNORE_INDEX, early_exit_loss
from pretrain.layerskip.plan import StepPlan
from parallel.pipeline import stage_output
from parallel.stage import LayerSkipStage


@dataclass
class StepResult:
    loss: float                                  # sum_l w(t,l)·CE_l
    exit_losses: dict[int, float]                # mean CE at each exit that was on
    grad_norm: float
    tokens: int                                  # target tokens in the step (all ranks)
    rows_run: int = 0                            # block-rows computed (all ranks)
    rows_total: int = 0                          # block-rows without layer dropout
    skipped: bool = False                        # the optimizer step was skipped (apply_update)


def split_micro_batches(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    n = batch["tokens"].shape[0]
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]


def count_step_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE_INDEX).sum())


@dataclass
class LayerSkipStep:
    plan: StepPlan
    step_tokens: int                  # target tokens of the whole step, all data-parallel ranks
    dtype: str = "float32"
    checkpoint_heads: bool = False
    chunk_tokens: int = 0             # early-exit loss over token chunks (0 = plain path)
    exit_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # detached, over micro-batches
    rows_run: int = 0                 # block-rows computed on this rank

    def __call__(self, part: LayerSkipStage, inputs: torch.Tensor, *, targets: torch.Tensor,
                 sample_ids: torch.Tensor) -> torch.Tensor:
        start, stop = part.stage_start, part.stage_stop
        exits = part.exits_here(self.plan.exit_weights)
        with autocast(inputs.device, self.dtype):
            h = part.tok_embeddings(inputs) if part.is_first_stage else inputs
            keep = self.plan.keep_masks(sample_ids)
            h, hiddens = part.run_layers(h, keep=keep, exits=exits, positions=part.positions(h),
                                         start=start, stop=stop)
            loss = None
            if exits:
                loss, per_exit = early_exit_loss(part.exit_logits, hiddens, targets,
                                                 {l: self.plan.exit_weights[l] for l in exits},
                                                 self.step_tokens, self.checkpoint_heads, chunk_tokens=self.chunk_tokens)
                for layer, value in per_exit.items():
                    self.exit_sums[layer] = self.exit_sums.get(layer, 0.0) + value
        self.rows_run += h.shape[0] * (stop - start) if keep is None else int(keep[start:stop].sum())
        return stage_output(part, h, loss)
