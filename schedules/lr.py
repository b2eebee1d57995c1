"""Learning rate: linear warmup, then decay to a floor.

    warmup (t < W):  base · (t+1)/W                      (reaches base at t = W-1)
    decay:           p = clamp((t-W)/(T-W), 0, 1),  min = min_lr_ratio · base
        cosine     min + (base - min) · (1 + cos(π p))/2
        linear     base - (base - min) · p
        constant   base
    flat at min (cosine, linear) from t = T on.
"""
from __future__ import annotations

import math

DECAYS = ("cosine", "linear", "constant")


def learning_rate(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float = 0.1, decay: str = "cosine") -> float:
    """LR at 0-based step `step` (see the module docstring)."""
    if decay not in DECAYS:
        raise ValueError(f"unknown LR decay {decay!r}; choose one of {', '.join(DECAYS)}")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if not base_lr >= 0:
        raise ValueError(f"base_lr={base_lr} must be >= 0")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0")
    if total_steps < 0:
        raise ValueError(f"total_steps={total_steps} must be >= 0")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio={min_lr_ratio} must be in [0, 1]")
    # (t+1)/W rather than t/W: the first step already trains (an LR of 0 would waste it).
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "constant":
        return base_lr
    min_lr = base_lr * min_lr_ratio
    # A run whose warmup covers all of it has no decay phase: from T on it sits at the floor.
    progress = 1.0 if total_steps <= warmup_steps else min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if decay == "linear":
        return base_lr - (base_lr - min_lr) * progress
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
