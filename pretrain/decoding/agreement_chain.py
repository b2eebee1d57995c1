"""The evidence strategy auto decides from: whether exit E agrees with the full model, position by
position, read from drafting rounds and from plain steps, kept as a two-state Markov chain.

A bit per row and position: 1 when a draft from exit E, given the committed prefix, is accepted
(greedy: the exit's argmax is the full model's; sampling: with probability sum_v min(p, q), read as
that probability). A round judges its drafts in order (n accepted, then a rejection, unless all γ
were accepted) and the bonus token's position after γ accepted drafts goes unjudged. A plain step
reads its position's bit for one head evaluation on the exit's hidden state (`read_step`), so
plain decoding gives the same evidence drafting would, at the cost of a head.

Agreement comes in runs, so the bits are not independent: the chain counts transitions from an
accepted and from a rejected position (decayed, about the last 50 bits weigh), and
schedules.speedup.expected_tokens_per_round_in_runs turns p = P(1 | 1), q = P(1 | 0) into tokens
per round. Each row keeps its last bit on the device (-1 when unknown: after a bonus token, an
unread step, or a round it could not draft in) and leaves with its row (`select_rows`).

The sums a round or step adds are read in its one host synchronisation (Sequences.settle, integer
values): they travel in fixed point, 2^-16 of a bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.decoding.sampling import SamplingConfig, acceptance_probability, probabilities

_FIXED_POINT = 2 ** 16
UNKNOWN = -1.0


@dataclass
class AgreementChain:
    decay: float = 0.98        # weight of older evidence, per bit
    prior_weight: float = 1.0  # pseudo-count pulling p and q to the pooled agreement
    # decayed sums: bits, their count, transitions from a 1 (count, to 1) and from a 0 (count, to 1)
    sums: list[float] = field(default_factory=lambda: [0.0] * 6)
    seen: int = 0              # bits judged, undecayed
    reads: int = 0             # plain steps that read agreement
    previous: torch.Tensor | None = None   # [B] each row's last bit, UNKNOWN if none

    def start(self, batch: int, device: torch.device | str) -> None:
        self.previous = torch.full((batch,), UNKNOWN, device=device)

    def select_rows(self, index: torch.Tensor) -> None:
        self.previous = self.previous[index]

    def forget(self) -> None:
        """A plain step did not read: no row's last bit is known."""
        self.previous.fill_(UNKNOWN)

    # --- device side: the sums of one step or round, as integer tensors for the synchronisation
    def read_step(self, exit_logits: torch.Tensor, full_logits: torch.Tensor,
                  sampling: SamplingConfig) -> list[torch.Tensor]:
        """Exit and full-model logits [B, V] at the position a plain step decoded: one bit per row."""
        if sampling.greedy:
            bits = (exit_logits.argmax(-1) == full_logits.argmax(-1)).float()
        else:
            bits = acceptance_probability(probabilities(exit_logits, sampling), probabilities(full_logits, sampling))
        self.reads += 1
        known = torch.ones_like(bits, dtype=torch.bool)
        sums = self._transitions(bits, known)
        self.previous = bits
        return self._fixed_point(bits, known, sums)

    def read_round(self, accepted: torch.Tensor, judged: torch.Tensor, rejected: torch.Tensor) -> list[torch.Tensor]:
        """A round's drafts per row [B]: `accepted` in a row, `judged` of them (accepted + the
        rejected one, if any)."""
        any_judged = judged > 0
        first = (accepted > 0).float()
        # the first bit continues the row's chain; then accepted - 1 steps 1 -> 1 and, after at least
        # one accepted draft, a rejection is a step 1 -> 0
        sums = self._transitions(first, any_judged)
        inner_from_one = (accepted - 1).clamp_min(0) + (rejected & (accepted > 0)).long()
        inner_one_one = (accepted - 1).clamp_min(0)
        sums = [sums[0] + inner_from_one, sums[1] + inner_one_one, sums[2], sums[3]]
        self.previous = torch.where(rejected, 0.0, UNKNOWN).to(self.previous.dtype)
        return self._fixed_point(accepted.float(), judged, sums)

    def _transitions(self, first: torch.Tensor, known: torch.Tensor) -> list[torch.Tensor]:
        """[from 1, 1 -> 1, from 0, 0 -> 1] per row, for the row's previous bit followed by `first`."""
        prev = self.previous
        has = (prev >= 0) & known
        p1 = torch.where(has, prev, 0.0)
        p0 = torch.where(has, 1.0 - prev, 0.0)
        return [p1, p1 * first, p0, p0 * first]

    @staticmethod
    def _fixed_point(bits: torch.Tensor, count: torch.Tensor, sums: list[torch.Tensor]) -> list[torch.Tensor]:
        values = [bits.sum(), count.float().sum()] + [s.float().sum() for s in sums[:4]]
        return [(v * _FIXED_POINT).round() for v in values]

    # --- host side
    def add(self, values: list[int]) -> None:
        """The sums read in the synchronisation, in the order read_step / read_round returned them."""
        new = [v / _FIXED_POINT for v in values]
        fade = self.decay ** new[1]
        self.sums = [fade * old + v for old, v in zip(self.sums, new)]
        self.seen += round(new[1])

    @property
    def acceptance(self) -> float | None:
        """The pooled share of accepted bits (decayed), None before any."""
        bits, count = self.sums[:2]
        return min(1.0, max(0.0, bits / count)) if count > 0 else None

    def continuation(self) -> tuple[float, float]:
        """(p, q): P(accepted | the position before accepted), P(accepted | it was rejected), each
        pulled to the pooled agreement by `prior_weight` pseudo-counts."""
        alpha = self.acceptance or 0.0
        _, _, from_one, one_one, from_zero, zero_one = self.sums
        k = self.prior_weight
        p = (one_one + k * alpha) / (from_one + k)
        q = (zero_one + k * alpha) / (from_zero + k)
        return min(1.0, max(0.0, p)), min(1.0, max(0.0, q))
