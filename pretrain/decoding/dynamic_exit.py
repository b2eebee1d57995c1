"""Dynamic exit layer and draft length, chosen online from per-exit acceptance estimates.

Estimating. Every `probe_every` rounds the decoder also reads candidate exits E' near the current
E (|E' - E| <= window) through the shared head, at no extra block evaluation:
  - E' > E: the verify forward runs blocks [E, L) anyway; run_layers(exits=...) captures h_E';
  - E' < E: the draft forwards run blocks [0, E) on every drafted position; they capture h_E'.
Only positions whose input tokens were committed count (the verified prefix and the position after
it). The score of a position is the probability that a draft from E' would be accepted there:
top-1 agreement with the full model when greedy, sum_v min(p_E', p_L) when sampling (both under
the processed sampling distribution). The current exit is scored every round from its own drafts.
Per exit, an exponential moving average of score sums and position counts (so a round with many
positions weighs more) gives α(E') = S/N.

Choosing. After each round (E, γ) = argmax over measured exits and γ in 1..max_draft_len of the
expected tokens per layer evaluated, (1 - α^(γ+1)) / ((1 - α)(γE + L)), or, given measured
DecodeCosts, of the expected speedup under those costs (schedules/speedup.py): the time a block
takes on γ+1 positions and the head's time then count.

Switching E. All blocks share one KV cache and, between rounds, every block holds the KV of
every committed token but the last (which has not been run at all); each entry was computed from
committed inputs, so it is the same whichever pass wrote it. If E grows, blocks [E_old, E_new)
already hold the KV the verify passes wrote; if E shrinks, blocks [E_new, E_old) hold what the
draft passes wrote. Switching needs no recomputation, and only happens between rounds, when the
exit-query cache is empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from schedules.speedup import DecodeCosts, best_draft_config


@dataclass
class DynamicExit:
    num_layers: int
    exit_layer: int
    draft_len: int
    max_draft_len: int
    probe_every: int = 4
    window: int = 2
    decay: float = 0.8
    costs: DecodeCosts | None = None   # None: count layers
    score: dict[int, float] = field(default_factory=dict)   # decayed sum of per-position scores
    count: dict[int, float] = field(default_factory=dict)   # decayed number of positions

    def __post_init__(self):
        if self.costs is None:
            self.costs = DecodeCosts.layer_count(self.max_draft_len + 1)
        if self.costs.max_positions < self.max_draft_len + 1:
            raise ValueError(f"decode costs measured up to {self.costs.max_positions} positions; the dynamic exit "
                             f"needs max_draft_len + 1 = {self.max_draft_len + 1}")

    def probe_exits(self, round_index: int) -> list[int]:
        """Exits other than the current one to read this round (none on most rounds)."""
        if round_index % self.probe_every:
            return []
        lo = max(1, self.exit_layer - self.window)
        hi = min(self.num_layers - 1, self.exit_layer + self.window)
        return [e for e in range(lo, hi + 1) if e != self.exit_layer]

    def observe(self, exit_layer: int, score: float, positions: int) -> None:
        if positions == 0:
            return
        self.score[exit_layer] = self.decay * self.score.get(exit_layer, 0.0) + score
        self.count[exit_layer] = self.decay * self.count.get(exit_layer, 0.0) + positions

    def acceptance(self, exit_layer: int) -> float | None:
        n = self.count.get(exit_layer)
        return None if not n else min(1.0, max(0.0, self.score[exit_layer] / n))

    def choose(self) -> tuple[int, int]:
        """Set and return (E, γ) maximising the expected speedup over the measured exits (with the
        layer-count costs: the expected tokens per layer, times L)."""
        measured = {e: a for e in self.count if (a := self.acceptance(e)) is not None}
        if measured:
            self.exit_layer, self.draft_len, _ = best_draft_config(measured, self.num_layers, self.max_draft_len,
                                                                   self.costs)
        return self.exit_layer, self.draft_len
