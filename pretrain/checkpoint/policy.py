"""When a checkpoint is written: the one place that decides (the Checkpointer asks it after every
step, with values every rank agreed on).

    save after step `done` when
        the run stops here (a signal or the time limit: `stop`)  -> blocking, before leaving
        or done == end (the last step of this invocation)        -> blocking
        or (done % checkpoint.every == 0 or checkpoint.every_minutes passed since the last save)
           and the last step was clean (no run of non-finite steps in progress, so the newest
           checkpoint stays the last good one)                   -> in the background
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SaveDecision:
    save: bool = False
    blocking: bool = False    # wait until it is on disk (before leaving, or at the end)


@dataclass(frozen=True)
class SavePolicy:
    every: int = 0                # checkpoint.every (steps; 0 = off)
    every_minutes: float = 0.0    # checkpoint.every_minutes (0 = off)
    end: int = 0                  # the step this invocation ends after (train.stop_at_step or train.steps)

    def minutes_due(self, now: float, last_save: float) -> bool:
        """The wall-clock part (each rank asks it; the answers are agreed on before `decide`)."""
        return self.every_minutes > 0 and now - last_save >= 60.0 * self.every_minutes

    def decide(self, done: int, *, stop: bool, minutes_due: bool, clean: bool) -> SaveDecision:
        if stop or done == self.end:
            return SaveDecision(save=True, blocking=True)
        scheduled = bool(self.every and done % self.every == 0)
        return SaveDecision(save=(scheduled or minutes_due) and clean)
