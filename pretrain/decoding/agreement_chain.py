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
per round. Each row keeps (P(its last bit is 1), P(it is 0)) on the device, (0, 0) when unknown:
after a bonus token, an unread step, or a round it could not draft in; the state leaves with its
row (`select_rows`).

A round or step adds six sums, [judged, from a 1, from a 0, accepted, 1 -> 1, 0 -> 1], formed on
the device in a few operations and read in its one host synchronisation (Sequences.settle, integer
values): they travel in fixed point, 2^-16 of a bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pretrain.decoding.sampling import SamplingConfig, acceptance_per_position, probabilities

_FIXED_POINT = 2 ** 16


@dataclass
class AgreementChain:
    decay: float = 0.98        # weight of older evidence, per bit
    prior_weight: float = 1.0  # pseudo-count pulling p and q to the pooled agreement
    # decayed [judged, from a 1, from a 0, accepted, 1 -> 1, 0 -> 1]
    sums: list[float] = field(default_factory=lambda: [0.0] * 6)
    seen: int = 0              # bits judged, undecayed
    reads: int = 0             # plain steps that read agreement
    prompt_bits: int = 0       # bits read on the prompts
    previous: torch.Tensor | None = None   # [2, B]: P(each row's last bit is 1), P(it is 0); 0, 0 unknown

    def start(self, batch: int, device: torch.device | str) -> None:
        self.previous = torch.zeros(2, batch, device=device)

    def select_rows(self, index: torch.Tensor) -> None:
        self.previous = self.previous[:, index]

    def forget(self) -> None:
        """A plain step did not read: no row's last bit is known."""
        self.previous.zero_()

    # --- device side: the sums of one step or round, an integer tensor [6] for the synchronisation
    def read_step(self, exit_logits: torch.Tensor, full_token: torch.Tensor, full_probs: torch.Tensor | None,
                  sampling: SamplingConfig) -> torch.Tensor:
        """The exit's logits [B, V] at the position a plain step decoded, and what the full model
        chose there (its token [B]; sampling: its distribution [B, V]): one bit per row."""
        bits = acceptance_per_position(exit_logits, full_token, full_probs, sampling)
        self.reads += 1
        weights = torch.cat([torch.ones_like(bits)[None], self.previous])     # 1, from a 1, from a 0
        sums = torch.cat([weights, weights * bits]).sum(1)
        self.previous = torch.stack([bits, 1.0 - bits])
        return (sums * _FIXED_POINT).round()

    def read_prompt(self, exit_logits: torch.Tensor, full_logits: torch.Tensor, mask: torch.Tensor,
                    sampling: SamplingConfig) -> torch.Tensor:
        """Exit and full-model logits [B, K, V] at K consecutive prompt positions of each row, those
        of `mask` [B, K] real (the row's last position last): the bits there, each row's last one
        its state. Teacher-forced on the prompt, the first evidence before anything is decoded."""
        full_probs = None if sampling.greedy else probabilities(full_logits, sampling)
        bits = acceptance_per_position(exit_logits, full_logits.argmax(-1), full_probs, sampling) * mask
        pair = mask[:, 1:] & mask[:, :-1]
        into = torch.stack([bits[:, :-1], 1.0 - bits[:, :-1]]) * pair                # [2, B, K-1]
        sums = torch.cat([mask.float().sum()[None], into.sum((1, 2)), bits.sum()[None],
                          (into * bits[:, 1:]).sum((1, 2))])
        self.previous = torch.stack([bits[:, -1], 1.0 - bits[:, -1]]) * mask[:, -1]
        return (sums * _FIXED_POINT).round()

    def read_round(self, accepted: torch.Tensor, judged: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
        """A round's drafts per row [B]: `accepted` in a row, `judged` of them (accepted + the
        rejected one, if any)."""
        first = (accepted > 0).float()
        # the first bit continues the row's chain; then accepted - 1 steps 1 -> 1 and, after at least
        # one accepted draft, a rejection is a step 1 -> 0
        into = self.previous * (judged > 0)
        inner = (accepted - 1).clamp_min(0).float()
        sums = torch.stack([judged.float(), into[0] + inner + (rejected & (accepted > 0)), into[1],
                            accepted.float(), into[0] * first + inner, into[1] * first]).sum(1)
        self.previous = torch.stack([torch.zeros_like(first), rejected.float()])
        return (sums * _FIXED_POINT).round()

    # --- host side
    def add(self, values: list[int], prompt: bool = False) -> None:
        """The six sums read in the synchronisation (read_step's, read_round's or, `prompt`,
        read_prompt's)."""
        new = [v / _FIXED_POINT for v in values]
        judged = round(new[0])
        # the decayed sums hold about 1 / (1 - decay) bits: more at once (a batch of prompts) weigh as many
        memory = 1.0 / (1.0 - self.decay) if self.decay < 1 else float("inf")
        if new[0] > memory:
            new = [v * memory / new[0] for v in new]
        fade = self.decay ** new[0]
        self.sums = [fade * old + v for old, v in zip(self.sums, new)]
        self.seen += judged
        if prompt:
            self.prompt_bits += judged

    @property
    def acceptance(self) -> float | None:
        """The pooled share of accepted bits (decayed), None before any."""
        count, bits = self.sums[0], self.sums[3]
        return min(1.0, max(0.0, bits / count)) if count > 0 else None

    def continuation(self) -> tuple[float, float]:
        """(p, q): P(accepted | the position before accepted), P(accepted | it was rejected), each
        pulled to the pooled agreement by `prior_weight` pseudo-counts."""
        alpha = self.acceptance or 0.0
        _, from_one, from_zero, _, one_one, zero_one = self.sums
        k = self.prior_weight
        p = (one_one + k * alpha) / (from_one + k)
        q = (zero_one + k * alpha) / (from_zero + k)
        return min(1.0, max(0.0, p)), min(1.0, max(0.0, q))
