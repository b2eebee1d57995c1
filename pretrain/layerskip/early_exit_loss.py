"""Early-exit loss: J = sum_l w(t,l) · CE(g(h_l), y), computed only at exits that are on.

Each exit's cross-entropy is a token SUM divided by the token count of the whole optimizer step
(all micro-batches, all data-parallel ranks), so micro-batch losses add up to the same loss, and
the same gradients, whatever the accumulation split.

Three ways to evaluate the shared head g = output ∘ norm at an exit, same loss and gradients:
plain (each exit's [tokens, vocab] logits live until backward), checkpoint_heads (recomputed in
backward, one exit's logits at a time) and chunk_tokens > 0 (pretrain/layerskip/chunked_exit_loss:
logits of chunk_tokens tokens at a time, gradients formed chunk by chunk in forward).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pretrain.layerskip.chunked_exit_loss import IGNORE_INDEX, chunked_exits_cross_entropy

__all__ = ["IGNORE_INDEX", "early_exit_loss", "exit_cross_entropy_sum"]


def exit_cross_entropy_sum(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                           targets: torch.Tensor) -> torch.Tensor:
    """sum over tokens of CE(head(hidden), targets), in float32. With vocabulary-sharded logits
    (tensor parallel's loss_parallel) the sum is a DTensor replicated over the ranks: its local
    value, differentiable, is returned."""
    logits = head(hidden)
    ce_sum = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(),
                             reduction="sum", ignore_index=IGNORE_INDEX)
    return ce_sum.to_local() if hasattr(ce_sum, "to_local") else ce_sum


def _head_modules(head: Callable) -> tuple[torch.nn.Module, torch.nn.Linear]:
    """(norm, output) of a model's bound `exit_logits`, the head the chunked loss takes apart."""
    owner = getattr(head, "__self__", None)
    if not (isinstance(getattr(owner, "norm", None), torch.nn.Module)
            and isinstance(getattr(owner, "output", None), torch.nn.Linear)):
        raise TypeError("early_exit_loss(chunk_tokens > 0) needs head=model.exit_logits of a model with "
                        f"`norm` and `output` modules, got {head!r}")
    return owner.norm, owner.output


def early_exit_loss(head: Callable[[torch.Tensor], torch.Tensor], hiddens: dict[int, torch.Tensor],
                    targets: torch.Tensor, exit_weights: dict[int, float], step_tokens: int,
                    checkpoint_heads: bool = False, chunk_tokens: int = 0
                    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Returns (weighted loss of this micro-batch, {exit: detached CE sum / step_tokens}).

    checkpoint_heads: keep only the hidden state per exit and recompute the vocab-sized logits
    in backward (memory of one exit's logits instead of all of them).
    chunk_tokens > 0: the chunked linear + cross-entropy over all exits at once (logits of
    chunk_tokens tokens at a time; checkpoint_heads does not apply); head must be a model's bound
    `exit_logits` (g = output ∘ norm).
    """
    if chunk_tokens < 0:
        raise ValueError(f"early_exit_loss: chunk_tokens={chunk_tokens} must be >= 0 (0 = plain path)")
    if chunk_tokens > 0:
        return _chunked_early_exit_loss(head, hiddens, targets, exit_weights, step_tokens, chunk_tokens)
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


def _chunked_early_exit_loss(head, hiddens, targets, exit_weights, step_tokens, chunk_tokens):
    """early_exit_loss through one chunked linear + cross-entropy over all the exits on."""
    layers = sorted(exit_weights)
    if not layers:
        return torch.zeros((), device=targets.device), {}
    total, ce_sums = chunked_exits_cross_entropy(*_head_modules(head), [hiddens[l] for l in layers], targets,
                                                 [exit_weights[l] / step_tokens for l in layers], chunk_tokens)
    return total, {l: ce_sums[i] / step_tokens for i, l in enumerate(layers)}
