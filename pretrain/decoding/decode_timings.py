"""How a decode's own timings correct the measured costs, kept across `generate` calls.

The costs (cost_model.py) are measured before decoding, on random tokens; a real decode differs
(rows drift apart and leave one by one while drafting, all together while stepping). strategy auto
times each round and plain step and corrects its prediction of drafting's speedup by

    correction = (observed / predicted seconds of plain steps) / (observed / predicted of rounds),

each a sum decayed by `decay` per timing (about the last 10 of each kind). What drifts both kinds
alike (the machine, its caches) cancels; what differs stays. The correction is 1 until both kinds
were timed. Plain steps that read the exit's agreement are also timed apart from those that do not:
`read_share`, what a read adds to a step, sizes how seldom auto may read (its read budget).

Kept across calls (`decode_timings_for`): a server decodes many short requests with one model, and
each call that started from 1 would pay a few rounds to re-learn what the last one knew. They are
kept per model, batch size and exit, and only for the costs they correct: other costs start afresh.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from schedules.speedup import DecodeCosts


@dataclass
class DecodeTimings:
    costs: DecodeCosts                # what the predicted seconds were priced by
    decay: float = 0.9                # weight of older timings, per timing of the same kind
    # decayed sums of [observed, predicted] seconds, of rounds and of plain steps
    rounds: list[float] = field(default_factory=lambda: [0.0, 0.0])
    steps: list[float] = field(default_factory=lambda: [0.0, 0.0])
    # decayed [seconds, count] of plain steps that read the exit's agreement, and of those that did not
    reading: list[float] = field(default_factory=lambda: [0.0, 0.0])
    unread: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def add(self, is_round: bool, observed: float, predicted: float, read: bool = False) -> None:
        self._decayed(self.rounds if is_round else self.steps, observed, predicted)
        if not is_round:
            self._decayed(self.reading if read else self.unread, observed, 1.0)

    def _decayed(self, pair: list[float], first: float, second: float) -> None:
        pair[0] = self.decay * pair[0] + first
        pair[1] = self.decay * pair[1] + second

    @property
    def read_share(self) -> float | None:
        """What reading adds to a plain step, as a share of one that does not read (>= 0); None
        until both were timed."""
        if not (self.reading[1] and self.unread[1]):
            return None
        return max(0.0, (self.reading[0] / self.reading[1]) / (self.unread[0] / self.unread[1]) - 1)

    @property
    def correction(self) -> float:
        if not (self.steps[1] and self.rounds[1]):
            return 1.0
        return (self.steps[0] / self.steps[1]) / (self.rounds[0] / self.rounds[1])


# model -> {(batch, exit, cache type): DecodeTimings}
_KEPT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_timings_for(model: torch.nn.Module, costs: DecodeCosts, batch: int, exit_layer: int,
                       cache_type: type) -> DecodeTimings:
    """The timings earlier decodes of this model kept at this batch size, exit and cache type, if
    they were priced by equal `costs`; else new ones (kept from now on)."""
    key = (batch, exit_layer, cache_type.__name__)
    kept = _KEPT.setdefault(model, {})
    if key not in kept or kept[key].costs != costs:
        kept[key] = DecodeTimings(costs)
    return kept[key]
