"""One optimizer step of LayerSkip training on one data-parallel rank (no pipeline).

Gradient accumulation over micro-batches; every micro-batch loss is already divided by the
token count of the whole step, so gradients are plain sums and do not depend on the split.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.device import autocast
from pretrain.layerskip.early_exit_loss import IGNORE_INDEX, early_exit_loss
from pretrain.layerskip.plan import StepPlan


@dataclass
class StepResult:
    loss: float                                  # sum_l w(t,l)·CE_l
    exit_losses: dict[int, float]                # mean CE at each exit that was on
    grad_norm: float
    tokens: int                                  # target tokens in the step (all ranks)
    rows_run: int = 0                            # block-rows computed on this rank (work done)
    rows_total: int = 0                          # block-rows without layer dropout
    extra: dict = field(default_factory=dict)


def split_micro_batches(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    n = batch["tokens"].shape[0]
    return [{k: v[i:i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]


def count_step_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["targets"] != IGNORE_INDEX).sum())


def materialize_missing_grads(model: torch.nn.Module) -> None:
    """Give parameters that received no gradient (a block every row skipped) a zero gradient,
    as a sharded run that runs the block on an empty batch would; keeps AdamW's updates and
    state identical across parallel layouts."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def forward_backward(model: torch.nn.Module, plan: StepPlan, micro: dict[str, torch.Tensor], *,
                     step_tokens: int, dtype: str, checkpoint_heads: bool, chunk_tokens: int = 0
                     ) -> tuple[torch.Tensor, dict[int, torch.Tensor], int]:
    """Loss and backward of one micro-batch; returns (loss, per-exit losses, block-rows run)."""
    tokens, targets = micro["tokens"], micro["targets"]
    keep = plan.keep_masks(micro["sample_ids"].to(tokens.device))
    with autocast(tokens.device, dtype):
        hiddens = model(tokens, keep=keep, exits=plan.exit_weights.keys())
        loss, per_exit = early_exit_loss(model.exit_logits, hiddens, targets, plan.exit_weights,
                                         step_tokens, checkpoint_heads, chunk_tokens=chunk_tokens)
    loss.backward()
    rows = tokens.shape[0] * model.cfg.n_layers if keep is None else int(keep.sum())
    return loss.detach(), per_exit, rows


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Global gradient norm (before clipping); clips when max_norm > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"),
                                          foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, plan: StepPlan,
               batch: dict[str, torch.Tensor], *, micro_batch_size: int, step_tokens: int,
               dtype: str = "float32", checkpoint_heads: bool = False, grad_clip: float = 0.0, chunk_tokens: int = 0
               ) -> StepResult:
    total = torch.zeros((), device=batch["tokens"].device)
    exit_sums: dict[int, torch.Tensor] = {}
    rows_run = 0
    for micro in split_micro_batches(batch, micro_batch_size):
        loss, per_exit, rows = forward_backward(model, plan, micro, step_tokens=step_tokens,
                                                dtype=dtype, checkpoint_heads=checkpoint_heads, chunk_tokens=chunk_tokens)
        total += loss
        rows_run += rows
        for layer, value in per_exit.items():
            exit_sums[layer] = exit_sums.get(layer, 0.0) + value
    materialize_missing_grads(model)
    grad_norm = clip_gradients(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss=float(total), exit_losses={l: float(v) for l, v in exit_sums.items()},
                      grad_norm=grad_norm, tokens=step_tokens, rows_run=rows_run,
                      rows_total=batch["tokens"].shape[0] * model.cfg.n_layers)
