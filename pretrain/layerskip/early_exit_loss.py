"""Early-exit loss: J = sum_l w(t,l) · CE(g(h_l), y), computed only at exits that are on.

Each exit's cross-entropy is a token SUM divided by the token count of the whole optimizer step
(all micro-batches, all data-parallel ranks), so micro-batch losses add up to the same loss, and
the same gradients, whatever the accumulation split.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def exit_cross_entropy_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                           targets: torch.Tensor) -> torch.Tensor:
    """sum over tokens of CE(head(hidden), targets), in float32. With vocabulary-sharded logits
    (tensor parallel's loss_parallel) the sum is a DTensor replicated over the ranks: its local
    value, differentiable, is returned."""
    logits = head(hidden)
    ce_sum = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                             reduction="sum", ignore_index=IGNORE_INDEX)
    return ce_sum.to_local() if hasattr(ce_sum, "to_local") else ce_sum


def early_exit_loss(head: Callable[[torch.Tensor], torch.Tensor], hiddens: dict[int, torch.Tensor],
                    targets: torch.Tensor, exit_weights: dict[int, float], step_tokens: int,
                    checkpoint_heads: bool = False) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Returns (weighted loss of this micro-batch, {exit: detached CE sum / step_tokens}).

    checkpoint_heads: keep only the hidden state per exit and recompute the vocab-sized logits
    in backward (memory of one exit's logits instead of all of them).
    """
    total = torch.zeros((), device=targets.device)
    per_exit: dict[int, torch.Tensor] = {}
    for layer, weight in sorted(exit_weights.items()):
        if checkpoint_heads:
            ce_sum = checkpoint(exit_cross_entropy_sum, head, hiddens[layer], targets, use_reentrant=False)
        else:
            ce_sum = exit_cross_entropy_sum(head, hiddens[layer], targets)
        loss = ce_sum / step_tokens
        per_exit[layer] = loss.detach()
        total = total + weight * loss
    return total, per_exit
