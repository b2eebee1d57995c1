"""strategy="auto": draft when self-speculative decoding pays at this batch size and exit, decode
autoregressively when it does not, and change its mind as evidence arrives.

Prediction. With the costs of this batch's forwards measured on this machine (cost_model.py: a
block and the head on 1..γ+1 positions of every row, the rest of a pass, and what a real round at
exit E costs besides its passes) and the exit's agreement with the full model (agreement_chain.py:
p after an accepted position, q after a rejected one), schedules.speedup gives the predicted
speedup of drafting over autoregressive decoding, T(p, q, γ) · (L b(1) + h(1) + s) / round_cost(γ),
at the best γ in 1..max_draft_len, T the expected tokens per round. Autoregressive decoding is 1 by
definition. Drafting is chosen when its prediction exceeds `min_speedup`.

Evidence, and what it costs. Drafting rounds judge their drafts for free. A plain step reads the
same bit for one head evaluation on the hidden state at E (a draft from E, given the committed
prefix, is accepted exactly when the exit agrees there): no probe round, which costs more than a
step whenever drafting does not pay, is ever needed. The prefill reads it first, teacher-forced,
at each prompt's last ceil(`prompt_bits` / batch) positions (two head evaluations on each, in one
batch), so the first decision usually comes before the first step. Plain
steps read in windows: from the first step until `min_evidence` bits are judged (prompts shorter
than that), then `read_window` consecutive steps (runs need
consecutive bits) after an unread gap, so that a text that gets easier is noticed. The gap starts
at `recheck_every` steps, doubles after every window that keeps decoding plainly (up to
`max_unread`) and is reset by drafting; and it is never shorter than the read budget allows:
windows take at most `read_budget` of the plain steps' time, a read costing what the timings say it
adds to a step (decode_timings.py), the head's share of a step by the measured costs until then or
when untimed. Decisions follow every round and every step that read.

Decisions. First, the ceiling: if drafting cannot beat `min_speedup` even with every draft accepted,
the decoder never drafts and never reads. Otherwise it decodes autoregressively, reading, until
`min_evidence` bits are judged, and re-decides after each round or reading step, with p and q one
standard error of the agreement below their estimates: 8 bits say little, and a user should not
pay for drafting on thin evidence (once drafting, its rounds bring evidence fast).

Timing. Each round and step is timed as it runs (cost_model.decode_clock), and the prediction is
corrected by the decode's own timings (decode_timings.py: observed over predicted time of plain
steps, over that of rounds), kept across calls for this model, batch size and exit: drafting takes a
plain step (reading) every `recheck_every` rounds, the first before the first round, so that both
kinds are timed. Under tensor parallelism the ranks' clocks differ and their choices must not: the
correction is off there. Switching needs nothing:
between rounds and steps every block's KV cache holds every committed token but the last,
whichever strategy wrote it, so greedy output is the full model's either way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pretrain.decoding.agreement_chain import AgreementChain
from pretrain.decoding.cost_model import decode_clock
from pretrain.decoding.decode_timings import DecodeTimings
from pretrain.decoding.kv_cache import ExitQueryCache
from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.sampling import SamplingConfig
from pretrain.decoding.self_speculative import speculative_round
from pretrain.decoding.sequences import Sequences
from pretrain.decoding.stepwise import decode_step
from schedules.speedup import (DecodeCosts, autoregressive_cost, expected_tokens_per_round_in_runs, round_cost,
                               speedup_of_rounds)

AUTOREGRESSIVE, SELF_SPECULATIVE = "autoregressive", "self_speculative"


@dataclass
class AutoStrategy:
    num_layers: int
    exit_layer: int
    costs: DecodeCosts                # measured at the batch size being decoded
    max_draft_len: int = 8            # γ searched in 1..max_draft_len
    min_speedup: float = 1.05         # draft only when predicted faster than this (a margin: the
                                      # predictions err by 5-10% on a noisy machine)
    min_evidence: int = 8             # bits judged before the first decision
    recheck_every: int = 32           # unread plain steps before a reading window; rounds between timed steps
    read_window: int = 8              # consecutive plain steps that read, per window
    prompt_bits: int = 64             # the prefill reads agreement at each prompt's last ceil(this / batch)
                                      # positions (more would outweigh the ~50 bits the evidence keeps)
    max_unread: int = 256             # the gap doubles after every window that keeps decoding plainly
    read_budget: float = 0.01         # reading windows take at most this share of the plain steps' time
    chain: AgreementChain = field(default_factory=AgreementChain)
    strategy: str = AUTOREGRESSIVE    # reading until the evidence is in
    draft_len: int = 1
    predicted: float | None = None    # predicted speedup of drafting at the last decision
    ceiling: float = field(init=False)
    verdict: dict | None = None       # the numbers of the last decision, for `reason`
    decisions: list[dict] = field(default_factory=list)   # every change of strategy
    steps_unread: int = 0             # plain steps since the last reading window
    unread_gap: int = field(init=False)   # unread steps before the next window
    reads_left: int = 0               # steps still to read in this window
    rounds_since_step: int = 0        # rounds drafted in drafting mode (a timed plain step before every
    step_timed_since_round: bool = False   # recheck_every-th of them, the first included)
    drafting_rounds: int = 0
    autoregressive_steps: int = 0
    timed: bool = True                # correct the prediction by the decode's own timings
    timings: DecodeTimings | None = None   # those earlier decodes kept (decode_timings_for); None: new

    def __post_init__(self):
        if self.costs.max_positions < self.max_draft_len + 1:
            raise ValueError(f"decode costs measured up to {self.costs.max_positions} positions; strategy auto "
                             f"needs max_draft_len + 1 = {self.max_draft_len + 1}")
        if not 0 < self.read_budget <= 1:
            raise ValueError(f"read_budget={self.read_budget} must be in (0, 1]")
        self.unread_gap = self.recheck_every
        if self.timings is None:
            self.timings = DecodeTimings(self.costs)
        elif self.timings.costs != self.costs:
            raise ValueError("auto's timings were priced by other costs than the ones it decides by")
        L, E = self.num_layers, self.exit_layer
        self._step_cost = autoregressive_cost(L, self.costs)
        self._round_costs = [round_cost(g, E, L, self.costs) for g in range(1, self.max_draft_len + 1)]
        self.ceiling = max(speedup_of_rounds(g + 1, g, E, L, self.costs) for g in range(1, self.max_draft_len + 1))

    def _best(self, after_accepted: float, after_rejected: float) -> tuple[int, float]:
        """(γ, predicted speedup) of the best γ for the chain's p and q, by the measured costs."""
        return max(((g, expected_tokens_per_round_in_runs(after_accepted, after_rejected, g) * self._step_cost
                     / self._round_costs[g - 1]) for g in range(1, self.max_draft_len + 1)), key=lambda x: x[1])

    @property
    def reason(self) -> str:
        """Why the strategy is what it is (formatted when asked: decisions come every round)."""
        if self.never_drafts:
            return (f"drafting cannot pay at this batch size: even with every draft accepted the measured costs "
                    f"predict {self.ceiling:.3f}x <= {self.min_speedup}")
        if self.verdict is None:
            return (f"reading the exit's agreement on plain steps: {self.chain.seen} of the {self.min_evidence} "
                    f"judged bits a decision needs")
        v = self.verdict
        return (f"at acceptance {v['acceptance']:.3f} ({v['after_accepted']:.3f} after an accepted position, "
                f"{v['after_rejected']:.3f} after a rejected one) drafting (E={self.exit_layer}, best γ="
                f"{v['draft_len']}) is predicted {v['predicted_speedup']:.3f}x autoregressive "
                f"({v['predicted_speedup_cautious']:.3f}x one standard error lower) from the costs measured at "
                f"batch {self.costs.batch}, corrected by x{v['time_correction']:.3f} for this decode's timings: "
                f"it {'pays' if v['strategy'] == SELF_SPECULATIVE else 'does not pay'}")

    @property
    def never_drafts(self) -> bool:
        return self.ceiling <= self.min_speedup

    @property
    def acceptance(self) -> float | None:
        return self.chain.acceptance

    def next_move(self) -> tuple[int, bool]:
        """(γ of the next round, or 0 for a plain step; whether that plain step reads the exit's
        agreement)."""
        if self.never_drafts:
            return 0, False
        if self.strategy == SELF_SPECULATIVE:
            if self.timed and self.rounds_since_step % self.recheck_every == 0 and not self.step_timed_since_round:
                self.step_timed_since_round = True   # a plain step among the rounds: timed (and it reads)
                return 0, True
            self.rounds_since_step += 1
            self.step_timed_since_round = False
            return self.draft_len, False
        if self.chain.seen < self.min_evidence:
            return 0, True
        if self.reads_left:
            self.reads_left -= 1
            return 0, True
        self.steps_unread += 1
        if self.steps_unread <= self.unread_gap or self.steps_unread <= self.budget_gap:
            return 0, False
        self.steps_unread, self.reads_left = 0, self.read_window - 1
        self.unread_gap = min(2 * self.unread_gap, self.max_unread)
        return 0, True

    @property
    def read_share(self) -> float:
        """What a read adds to a plain step, as a share of one: timed when the decode is (and a
        reading and an unread step were), else the exit head's share of a step by the costs."""
        timed = self.timings.read_share if self.timed else None
        return self.costs.head_cost(1) / self._step_cost if timed is None else timed

    @property
    def budget_gap(self) -> int:
        """The fewest unread steps before a window of `read_window` reads that keeps reading within
        `read_budget`: W r <= budget (gap + W), r the read share."""
        return max(0, math.ceil(self.read_window * (self.read_share / self.read_budget - 1) - 1e-9))

    def observe_time(self, draft_len: int, seconds: float, read: bool = False) -> None:
        """A round of `draft_len` drafts (0: a plain step, reading the exit's agreement or not) took
        `seconds`."""
        if not self.timed:
            return
        predicted = (self._round_costs[draft_len - 1] if draft_len
                     else self._step_cost + (self.costs.head_cost(1) if read else 0.0))
        self.timings.add(bool(draft_len), seconds, predicted, read)

    @property
    def time_correction(self) -> float:
        """decode_timings.DecodeTimings.correction; 1 when untimed."""
        return self.timings.correction if self.timed else 1.0

    def observe(self, generated: int) -> None:
        """Decide from the chain's evidence so far; `generated`: tokens committed so far (recorded
        with each change of strategy). The choice is made one standard error of the agreement below
        the estimate, sqrt(α(1 - α)/n) off p and q (n: the decayed bits): a user should not pay for
        drafting on thin evidence, and drafting, once chosen, soon brings more."""
        if self.never_drafts or self.chain.seen < self.min_evidence or not self.chain.seen:
            return
        alpha = self.chain.acceptance
        p, q = self.chain.continuation()
        error = (alpha * (1 - alpha) / self.chain.sums[0]) ** 0.5
        gamma, predicted = self._best(p, q)
        _, cautious = self._best(max(0.0, p - error), max(0.0, q - error))
        correction = self.time_correction
        self.predicted, self.draft_len = predicted * correction, gamma
        choice = SELF_SPECULATIVE if cautious * correction > self.min_speedup else AUTOREGRESSIVE
        self.verdict = {"after_tokens": generated, "strategy": choice, "acceptance": alpha, "after_accepted": p,
                        "after_rejected": q, "draft_len": gamma, "predicted_speedup": self.predicted,
                        "predicted_speedup_cautious": cautious * correction, "time_correction": correction}
        if choice != self.strategy or not self.decisions:
            self.decisions.append(self.verdict)
        if choice == AUTOREGRESSIVE and self.strategy == SELF_SPECULATIVE:
            self.steps_unread = self.reads_left = 0
        if choice == SELF_SPECULATIVE:
            self.unread_gap = self.recheck_every
        self.strategy = choice

    def report(self) -> dict:
        """What it chose and why, for the JSON line."""
        c = self.costs
        p, q = self.chain.continuation() if self.chain.seen else (None, None)
        return {"chosen": self.strategy, "reason": self.reason, "exit_layer": self.exit_layer,
                "draft_len": self.draft_len if self.strategy == SELF_SPECULATIVE else None,
                "acceptance": self.acceptance, "acceptance_after_accepted": p, "acceptance_after_rejected": q,
                "positions_judged": self.chain.seen, "prompt_positions_judged": self.chain.prompt_bits,
                "agreement_reads": self.chain.reads,
                "predicted_speedup": {AUTOREGRESSIVE: 1.0, SELF_SPECULATIVE: self.predicted,
                                      "self_speculative_if_all_accepted": self.ceiling},
                "decisions": self.decisions, "drafting_rounds": self.drafting_rounds, "timed": self.timed,
                "time_correction": self.time_correction, "read_share": self.read_share,
                "autoregressive_steps": self.autoregressive_steps,
                "costs": {"batch": c.batch, "block_s": list(c.block), "head_s": list(c.head), "step_s": c.step,
                          "round_extra_s": list(c.round_extra), "round_extra_exit": c.exit_layer}}


def decode_auto(runner: BlockRunner, seqs: Sequences, auto: AutoStrategy, sampling: SamplingConfig,
                generator: torch.Generator | None) -> None:
    """Rounds or steps until every row is finished, each chosen by `auto` (see the module docstring)."""
    model, stats, L = runner.model, runner.stats, runner.num_layers
    queries = ExitQueryCache(seqs.batch, auto.max_draft_len + 1, model.cfg.dim,
                             dtype=model.tok_embeddings.weight.dtype, device=seqs.tokens.device)
    first_layer = runner.cache.layers[0]
    clock = decode_clock(seqs.tokens.device)   # each round and step ends with a host synchronisation
    chain = auto.chain
    if chain.previous is None:    # the prefill did not read
        chain.start(seqs.batch, seqs.tokens.device)
    chained = True    # the chain's last bits are of the position just decoded: an unread step breaks them
    auto.observe(stats.generated)   # the prompt's evidence may already decide
    while seqs.batch:
        if runner.cache.span(first_layer, 0) > seqs.max_length - 1:
            # the cache's host bound on the attended span still counts a longer row that has left
            # (plain steps only grow it): re-base it on the rows decoding (same KV, nothing moves)
            runner.crop_to_committed(seqs.length, seqs.max_length)
        gamma, read = auto.next_move()
        started = clock()
        if gamma:
            speculative_round(runner, seqs, queries, auto.exit_layer, gamma, sampling, generator, agreement=chain)
            auto.observe_time(stats.draft_lens[-1], clock() - started)   # drafts a round really made
            auto.drafting_rounds += 1
        else:
            if chained and not read:
                chain.forget()
            decode_step(runner, seqs, L, sampling, generator, track_lengths=True, states=(queries, chain),
                        agreement=chain if read else None, exit_layer=auto.exit_layer)
            auto.observe_time(0, clock() - started, read)
            auto.autoregressive_steps += 1
        chained = bool(gamma) or read
        if chained:
            auto.observe(stats.generated)
