"""Beyond a static exit E and draft length γ.

AdaptiveDraftLength: after the first draft token, stop drafting when the draft's top-1
probability falls below a threshold τ;
after each round τ moves toward the value that gives the target acceptance:
    τ <- clip(τ + rate · (target - observed acceptance), 0, 0.99)
(acceptance too low -> stop earlier; too high -> draft longer).

DynamicExit: every `probe_every` rounds, candidate exits near the current E are read through the
shared head during the same forward passes, and their top-1 agreement with the verified tokens
is tracked as an exponential moving average α(E'). Between rounds E and γ are set to maximise the
expected tokens per layer evaluated, (1-α^(γ+1)) / ((1-α)(γE+L)). Switching E is free between
rounds because every block's KV cache is complete for all committed positions but the last.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from schedules.speedup import expected_tokens_per_layer


@dataclass
class AdaptiveDraftLength:
    threshold: float = 0.5
    target_acceptance: float = 0.8
    rate: float = 0.1

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.threshold += self.rate * (self.target_acceptance - accepted / drafted)
            self.threshold = min(0.99, max(0.0, self.threshold))


@dataclass
class DynamicExit:
    num_layers: int
    exit_layer: int
    draft_len: int
    max_draft_len: int
    probe_every: int = 4
    window: int = 2
    smoothing: float = 0.8
    alpha: dict[int, float] = field(default_factory=dict)

    def probe_exits(self, round_index: int) -> list[int]:
        """Exits other than the current one to read this round (none on most rounds)."""
        if round_index % self.probe_every:
            return []
        lo, hi = max(1, self.exit_layer - self.window), min(self.num_layers - 1, self.exit_layer + self.window)
        return [e for e in range(lo, hi + 1) if e != self.exit_layer]

    def observe(self, exit_layer: int, agreed: int, total: int) -> None:
        if total == 0:
            return
        rate = agreed / total
        old = self.alpha.get(exit_layer)
        self.alpha[exit_layer] = rate if old is None else self.smoothing * old + (1 - self.smoothing) * rate

    def choose(self) -> tuple[int, int]:
        """Set and return (E, γ) maximising expected tokens per layer over the exits measured."""
        best = None
        for exit_layer, alpha in self.alpha.items():
            for gamma in range(1, self.max_draft_len + 1):
                value = expected_tokens_per_layer(min(alpha, 1.0), gamma, exit_layer, self.num_layers)
                if best is None or value > best[0]:
                    best = (value, exit_layer, gamma)
        if best is not None:
            self.exit_layer, self.draft_len = best[1], best[2]
        return self.exit_layer, self.draft_len
