"""Adaptive draft length: stop drafting when the draft is unsure, with a self-tuning threshold.

After the first draft token of a round, a row stops drafting as soon as the exit head's top-1
probability (of the processed sampling distribution; of the softmax when greedy) falls below τ; the
unsure token is dropped. The batch keeps drafting while any row goes on; rows that stopped have
their later drafts ignored. After every round τ moves multiplicatively toward the value that gives
the target acceptance α* (share of the drafts the verifier reached that it accepted):

    τ <- clip(τ · exp(rate · (α* - α_round)), τ_min, τ_max)

acceptance below target -> τ grows -> shorter, surer drafts; above target -> longer drafts. The
draft length stays capped by the configured γ. The stopping rule looks only at the drafted prefix,
so greedy output stays exact and speculative sampling keeps the full model's distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class AdaptiveDraftLength:
    threshold: float = 0.5
    target_acceptance: float = 0.8
    rate: float = 1.0
    min_threshold: float = 0.01
    max_threshold: float = 0.99

    def __post_init__(self):
        if not 0 < self.target_acceptance < 1:
            raise ValueError(f"target_acceptance={self.target_acceptance} must be in (0, 1)")
        if not self.min_threshold <= self.threshold <= self.max_threshold:
            raise ValueError(f"draft threshold {self.threshold} must be in "
                             f"[{self.min_threshold}, {self.max_threshold}]")

    def unsure(self, draft_probs: torch.Tensor) -> torch.Tensor:
        """[B, V] distribution of the next draft -> [B] True where drafting should stop."""
        return draft_probs.max(-1).values < self.threshold

    def update(self, accepted: int, judged: int) -> None:
        """One round's feedback: `accepted` of the `judged` drafts (accepted + rejected)."""
        if judged == 0:
            return
        self.threshold *= math.exp(self.rate * (self.target_acceptance - accepted / judged))
        self.threshold = min(self.max_threshold, max(self.min_threshold, self.threshold))
