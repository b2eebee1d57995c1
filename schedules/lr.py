"""Learning rate: linear warmup to base_lr over warmup_steps, then decay to min_lr_ratio·base_lr at
total_steps (cosine: min + (base-min)·(1+cos(π·progress))/2; linear; constant), flat after."""
from __future__ import annotations

import math

DECAYS = ("cosine", "linear", "constant")


def learning_rate(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1, decay: str = "cosine") -> float:
    if decay not in DECAYS:
        raise ValueError(f"unknown LR decay {decay!r}; choose one of {', '.join(DECAYS)}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return base_lr
    min_lr = base_lr * min_lr_ratio
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        return base_lr - (base_lr - min_lr) * progress
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
