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

Per row. E is shared by the batch (a forward runs one range of blocks for every row), γ is chosen
per row: each row keeps its own decayed count of accepted and judged drafts at the current exit
(reset when E moves), and once it has judged `row_evidence` drafts its γ_b is the best γ in
0..max_draft_len for its own acceptance under the same costs (γ_b = 0: the row takes one plain
step per round, for a row that rarely agrees with the exit), looked up in a table over α in
steps of 0.01; until then, the batch's γ.

Switching E. All blocks share one KV cache and, between rounds, every block holds the KV of
every committed token but the last (which has not been run at all); each entry was computed from
committed inputs, so it is the same whichever pass wrote it. If E grows, blocks [E_old, E_new)
already hold the KV the verify passes wrote; if E shrinks, blocks [E_new, E_old) hold what the
draft passes wrote. Switching needs no recomputation, and only happens between rounds, when the
exit-query cache is empty.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from schedules.speedup import DecodeCosts, best_draft_config, expected_speedup_with_costs


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
    row_evidence: float = 4.0          # judged drafts a row needs before its own γ_b is used
    row_accepted: torch.Tensor | None = None   # [B] decayed accepted drafts at the current exit
    row_judged: torch.Tensor | None = None     # [B] decayed judged drafts at the current exit
    _tables: dict[int, torch.Tensor] = field(default_factory=dict)   # exit -> best γ per α in 0, 0.01, .., 1

    def __post_init__(self):
        if self.costs is None:
            self.costs = DecodeCosts.layer_count(self.max_draft_len + 1)
        if self.costs.max_positions < self.max_draft_len + 1:
            raise ValueError(f"decode costs measured up to {self.costs.max_positions} positions; the dynamic exit "
                             f"needs max_draft_len + 1 = {self.max_draft_len + 1}")

    def start(self, batch: int, device: torch.device | str) -> "DynamicExit":
        self.row_accepted = torch.zeros(batch, device=device)
        self.row_judged = torch.zeros(batch, device=device)
        return self

    def select_rows(self, index: torch.Tensor) -> None:
        self.row_accepted, self.row_judged = self.row_accepted[index], self.row_judged[index]

    def observe_rows(self, accepted: torch.Tensor, judged: torch.Tensor) -> None:
        """One round's drafts per row at the exit in use: accepted of judged, [B]."""
        self.row_accepted = self.decay * self.row_accepted + accepted
        self.row_judged = self.decay * self.row_judged + judged

    def row_draft_lens(self) -> torch.Tensor:
        """[B] γ_b: the best γ for each row's own acceptance once it has the evidence, else the batch's."""
        table = self._tables.get(self.exit_layer)
        if table is None:
            grid = [i / 100 for i in range(101)]
            best = [max(range(self.max_draft_len + 1),
                        key=lambda g, a=a: (round(expected_speedup_with_costs(a, g, self.exit_layer, self.num_layers,
                                                                              self.costs), 12), -g))
                    for a in grid]
            table = self._tables[self.exit_layer] = torch.tensor(best, device=self.row_judged.device)
        alpha = self.row_accepted / self.row_judged.clamp_min(1e-9)
        own = table[(alpha.clamp(0, 1) * 100).round().long()]
        return torch.where(self.row_judged >= self.row_evidence, own, self.draft_len)

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
            exit_layer, self.draft_len, _ = best_draft_config(measured, self.num_layers, self.max_draft_len,
                                                              self.costs)
            if exit_layer != self.exit_layer and self.row_judged is not None:   # the rows' evidence was for the old E
                self.row_accepted.zero_()
                self.row_judged.zero_()
            self.exit_layer = exit_layer
        return self.exit_layer, self.draft_len
