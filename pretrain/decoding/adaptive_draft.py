"""Adaptive draft length, per row: stop drafting when the draft is unsure, with a self-tuning
threshold for each row.

After the first draft token of a round, row b stops drafting as soon as the exit head's top-1
probability (of the processed sampling distribution; of the softmax when greedy) falls below τ_b;
the unsure token is dropped. The batch keeps drafting while any row goes on; rows that stopped
ride along and their later drafts are ignored. After every round each τ_b moves multiplicatively
toward the value that gives the target acceptance α* (share of the row's drafts the verifier
reached that it accepted):

    τ_b <- clip(τ_b · exp(rate · (α* - α_b,round)), τ_min, τ_max)     (rows with no judged draft keep τ_b)

acceptance below target -> τ_b grows -> shorter, surer drafts; above target -> longer drafts. A row
that agrees with its exit drafts long while a row that does not drafts short, in the same batch.
Every draft step computes every row, so the batch stops drafting once fewer than `min_drafting`
of its rows (a share) still draft: the last sure rows do not make the whole batch draft on.
The draft length stays capped by the configured γ. The stopping rule looks only at the drafted
prefix, so greedy output stays exact and speculative sampling keeps the full model's distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AdaptiveDraftLength:
    threshold: float = 0.5            # initial τ of every row
    target_acceptance: float = 0.8
    rate: float = 1.0
    min_threshold: float = 0.01
    max_threshold: float = 0.99
    min_drafting: float = 0.5         # share of the batch's rows that must still draft to go on
    thresholds: torch.Tensor | None = None   # [B] τ_b; set by start()

    def __post_init__(self):
        if not 0 < self.target_acceptance < 1:
            raise ValueError(f"target_acceptance={self.target_acceptance} must be in (0, 1)")
        if not 0 <= self.min_drafting <= 1:
            raise ValueError(f"min_drafting={self.min_drafting} must be in [0, 1]")
        if not self.min_threshold <= self.threshold <= self.max_threshold:
            raise ValueError(f"draft threshold {self.threshold} must be in "
                             f"[{self.min_threshold}, {self.max_threshold}]")

    def start(self, batch: int, device: torch.device | str) -> "AdaptiveDraftLength":
        self.thresholds = torch.full((batch,), self.threshold, dtype=torch.float32, device=device)
        return self

    def unsure(self, draft_probs: torch.Tensor) -> torch.Tensor:
        """[B, V] distribution of each row's next draft -> [B] True where the row should stop."""
        return draft_probs.max(-1).values < self.thresholds

    def go_on(self, drafting: torch.Tensor) -> torch.Tensor:
        """[B] bool, rows still drafting -> 0-d bool: whether the batch drafts another token."""
        return drafting.float().mean() >= max(self.min_drafting, 1e-6)

    def update(self, accepted: torch.Tensor, judged: torch.Tensor) -> None:
        """One round's feedback per row: `accepted` of the `judged` drafts (accepted + rejected), [B]."""
        acceptance = accepted / judged.clamp_min(1)
        moved = self.thresholds * torch.exp(self.rate * (self.target_acceptance - acceptance))
        self.thresholds = torch.where(judged > 0, moved.clamp(self.min_threshold, self.max_threshold),
                                      self.thresholds)

    def select_rows(self, index: torch.Tensor) -> None:
        self.thresholds = self.thresholds[index]
