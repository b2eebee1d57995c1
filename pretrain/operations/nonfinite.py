"""The non-finite guard: a step whose loss or gradient norm is NaN/inf changes nothing.

The trainer calls the guard as its `apply_update(loss, grad_norm) -> bool` hook before the optimizer
step. Both values are already reduced over every rank (the grad norm must be, for clipping), so all
ranks take the same decision without another collective. Policies (train.nonfinite_policy):

    skip      no optimizer step (gradients dropped), counted and logged; after
              train.nonfinite_max_consecutive skips in a row the run stops
    rollback  as skip, but after that many in a row the weights and optimizer go back to the
              newest checkpoint and training continues after the offending data window
              (at most MAX_ROLLBACKS times, then it stops)
    stop      stop at the first non-finite step

Stopping raises NonFiniteStop naming the step; no checkpoint is written on that path, so no
checkpoint ever holds non-finite weights (saving also checks the weights: the Checkpointer).
"""
from __future__ import annotations

import math
from typing import Any

from pretrain.operations.exit_codes import NonFiniteStop

POLICIES = ("skip", "rollback", "stop")
MAX_ROLLBACKS = 3


class NonFiniteGuard:
    def __init__(self, policy: str = "skip", max_consecutive: int = 10):
        if policy not in POLICIES:
            raise ValueError(f"train.nonfinite_policy={policy!r}: choose one of {', '.join(POLICIES)}")
        self.policy = policy
        self.max_consecutive = 1 if policy == "stop" else max_consecutive
        self.step = 0                 # set by the loop before each step (for the messages)
        self.skipped = 0              # steps skipped in this invocation
        self.consecutive = 0
        self.first_bad_step: int | None = None
        self.rollbacks = 0
        self.last: tuple[float, float] | None = None
        self.clean = True             # the last step was finite (no streak or rollback since)

    def __call__(self, loss: float, grad_norm: float) -> bool:
        """The apply_update hook: True = take the optimizer step."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            self.first_bad_step = None
            self.clean = True
            return True
        self.clean = False
        self.skipped += 1
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = self.step
        self.last = (loss, grad_norm)
        return False

    def describe(self) -> str:
        loss, gnorm = self.last if self.last else (float("nan"), float("nan"))
        return f"non-finite step {self.step} (loss {loss}, grad norm {gnorm})"

    def action(self) -> str:
        """After a step: 'continue', 'rollback' or raises NonFiniteStop."""
        if self.consecutive < self.max_consecutive:
            return "continue"
        if self.policy == "rollback" and self.rollbacks < MAX_ROLLBACKS:
            self.rollbacks += 1
            self.consecutive = 0
            return "rollback"
        raise NonFiniteStop(
            f"stopped by the non-finite guard: {self.describe()} ({self.consecutive} step(s) in a row "
            f"from step {self.first_bad_step}, policy {self.policy}); no checkpoint was written with "
            f"these weights; lower optim.lr or raise optim.warmup_steps, then rerun to resume from the "
            f"newest checkpoint")


def finite_tree(value: Any) -> bool:
    """No float in a JSON-like value (dicts, lists, numbers) is NaN or inf."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite_tree(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite_tree(v) for v in value)
    return True
