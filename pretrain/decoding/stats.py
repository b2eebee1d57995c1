"""Decoding statistics, with a hardware-independent cost beside wall time."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pretrain.device import synchronize

_SUMMED = ("generated", "prefill_tokens", "drafted", "accepted", "rejections", "rounds", "layer_evals",
           "position_layer_evals", "prefill_layer_evals", "head_evals", "wall_s")


@dataclass
class DecodeStats:
    generated: int = 0            # tokens committed after the prompts, all rows
    prefill_tokens: int = 0       # of which the first token of each row, produced by the prefill
    drafted: int = 0              # draft tokens the verifier judged or could have (self-speculative)
    accepted: int = 0             # of which accepted
    rejections: int = 0           # row-rounds that ended on a rejected draft
    rounds: int = 0               # decoding rounds (draft+verify, or one step) summed over the batch's rows
    # Cost after the prefill, counted per row: a block run once for one row counts 1 however many
    # positions it processes (decoding is bound by weight loading and per-call overhead); the
    # denominator γE + L of the expected tokens per layer counts the same thing. Every row computed
    # counts: finished rows have left the batch, and a row that drafts fewer tokens than the others
    # of its round is computed (and counted) for the whole round's forwards.
    layer_evals: int = 0
    position_layer_evals: int = 0  # compute-bound cost: one block on one position of one row
    prefill_layer_evals: int = 0   # per row, like layer_evals
    head_evals: int = 0            # exit-head evaluations per position (drafts, verify, probes)
    wall_s: float = 0.0
    exit_layers: list[int] = field(default_factory=list)   # exit used in each round
    draft_lens: list[int] = field(default_factory=list)    # draft tokens in each round
    auto: list[dict] = field(default_factory=list)          # strategy auto: its report, per generate() call

    @property
    def decoded(self) -> int:
        """Tokens produced by decoding rounds (all but the prefill's first token per row)."""
        return self.generated - self.prefill_tokens

    def merge(self, other: "DecodeStats") -> "DecodeStats":
        """Add another run's statistics (e.g. the next batch of prompts) into this one."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.exit_layers += other.exit_layers
        self.draft_lens += other.draft_lens
        self.auto += other.auto
        return self

    def summary(self) -> dict:
        decoded = max(self.decoded, 1)
        judged = self.accepted + self.rejections
        return {
            "generated_tokens": self.generated, "drafted": self.drafted, "accepted": self.accepted,
            # α: of the drafts the verifier reached (every one before the first rejection), the share
            # accepted: the quantity in the expected-speedup formula. accepted/drafted is lower.
            "acceptance": self.accepted / judged if judged else None,
            "accepted_per_drafted": self.accepted / self.drafted if self.drafted else None,
            "rounds": self.rounds, "tokens_per_round": self.decoded / self.rounds if self.rounds else None,
            "layer_evals_per_token": self.layer_evals / decoded,
            "position_layer_evals_per_token": self.position_layer_evals / decoded,
            "head_evals_per_token": self.head_evals / decoded,
            "wall_s": self.wall_s, "tokens_per_s": self.generated / self.wall_s if self.wall_s else None,
            "mean_exit_layer": sum(self.exit_layers) / len(self.exit_layers) if self.exit_layers else None,
            "mean_draft_len": sum(self.draft_lens) / len(self.draft_lens) if self.draft_lens else None,
            **({"auto": self.auto} if self.auto else {}),
        }


class Timer:
    """Adds the wall time of the block (after the device finished its queued work) to stats.wall_s."""

    def __init__(self, stats: DecodeStats, device: torch.device):
        self.stats, self.device = stats, device

    def __enter__(self) -> "Timer":
        synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.stats.wall_s += time.perf_counter() - self.start
