"""Wall-clock budget of one invocation: leave (checkpoint, requeue) before a time limit.

The deadline is the earliest of start + train.time_limit_s (0 = none) and env LAYERSKIP_DEADLINE
(unix epoch seconds; the Slurm script sets it from the allocation's end time). The run stops at a
step boundary when

    now + next_step_s + checkpoint_s + margin_s > deadline

with next_step_s the slowest of the recent steps and checkpoint_s the last measured save time
(an estimate until one was measured), so the checkpoint is complete before the limit.
"""
from __future__ import annotations

import math
import os

DEADLINE_ENV = "LAYERSKIP_DEADLINE"


class DeadlineError(ValueError):
    """LAYERSKIP_DEADLINE is not a number of seconds."""


def deadline_from(start: float, time_limit_s: float, env: dict[str, str] | None = None) -> float:
    """Unix time at which this invocation must be gone (inf = no limit)."""
    env = os.environ if env is None else env
    deadline = start + time_limit_s if time_limit_s > 0 else math.inf
    raw = env.get(DEADLINE_ENV, "").strip()
    if raw:
        try:
            value = float(raw)
        except ValueError:
            raise DeadlineError(f"env {DEADLINE_ENV}={raw!r}: not a unix time in seconds") from None
        if not math.isfinite(value):
            raise DeadlineError(f"env {DEADLINE_ENV}={raw!r}: not a finite unix time")
        deadline = min(deadline, value)
    return deadline


def should_leave(now: float, deadline: float, next_step_s: float, checkpoint_s: float,
                 margin_s: float = 0.0) -> bool:
    """True when one more step plus a checkpoint would not finish before the deadline."""
    return now + next_step_s + checkpoint_s + margin_s > deadline


class StepTimes:
    """The recent step durations (a window of `size`): median for the watchdog, max for the budget."""

    def __init__(self, size: int = 20):
        self.size = size
        self.values: list[float] = []

    def add(self, seconds: float) -> None:
        self.values.append(seconds)
        del self.values[:-self.size]

    def median(self) -> float | None:
        if not self.values:
            return None
        ordered = sorted(self.values)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    def slowest(self) -> float:
        return max(self.values, default=0.0)
