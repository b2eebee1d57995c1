"""strategy="auto": draft when self-speculative decoding pays at this batch size and exit, decode
autoregressively when it does not, and change its mind as acceptance evidence arrives.

Prediction. With the costs of this batch's forwards measured on this machine (cost_model.py: a
block and the head on 1..γ+1 positions of every row, the rest of a pass, and what a real round at
exit E costs besides its passes) and the observed acceptance α at exit E, schedules.speedup gives
the predicted speedup of drafting over autoregressive decoding,
(1 + α + .. + α^γ) · (L b(1) + h(1) + s) / round_cost(γ), at the best γ in 1..max_draft_len.
Autoregressive decoding is 1 by definition. Drafting is chosen when its prediction exceeds
`min_speedup`.

Evidence. α at E is the share of judged drafts that were accepted (the α of the formula: a draft
is judged when every draft before it in its round was accepted), decayed per draft judged (about
the last 50 weigh). Only drafting rounds give it: the exit's agreement with the full model at every
position, which a plain step could read for one head evaluation, is a different quantity (lower
here, agreement comes in runs) and would bias the choice against drafting.

Decisions. First, the ceiling: if drafting cannot beat `min_speedup` even with every draft accepted
(α = 1), the decoder never drafts. Otherwise it probes: rounds of one draft (the cheapest round to
lose) until `min_evidence` drafts are judged; then it re-decides after every round, at one standard
error above the estimated α (thin evidence leans to drafting, whose own rounds then correct it).
While decoding autoregressively, every `recheck_every` steps it probes again with `probe_rounds`
rounds of one draft, so that a text that gets easier is noticed.

Timing. The costs are measured before decoding, on random tokens; the decode itself differs (rows
drift apart and leave the batch one by one while drafting, all together while stepping). Each
round and step is timed as it runs (cost_model.decode_clock), and the prediction is corrected by
(observed / predicted time of plain steps) / (observed / predicted time of rounds), decayed over
about the last 10 of each, once both kinds were timed: drafting starts with a plain step and
takes one every `recheck_every` rounds. Under tensor parallelism the ranks' clocks differ and
their choices must not: the correction is off there. Switching needs nothing: between
rounds and steps every block's KV cache holds every committed token but the last, whichever
strategy wrote it, so greedy output is the full model's either way.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from pretrain.decoding.kv_cache import ExitQueryCache
from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.sampling import SamplingConfig
from pretrain.decoding.self_speculative import speculative_round
from pretrain.decoding.sequences import Sequences
from pretrain.decoding.stepwise import decode_step
from pretrain.decoding.cost_model import decode_clock
from schedules.speedup import (DecodeCosts, autoregressive_cost, best_draft_config, expected_speedup_with_costs,
                               round_cost)

AUTOREGRESSIVE, SELF_SPECULATIVE = "autoregressive", "self_speculative"


@dataclass
class AutoStrategy:
    num_layers: int
    exit_layer: int
    costs: DecodeCosts                # measured at the batch size being decoded
    max_draft_len: int = 8            # γ searched in 1..max_draft_len
    min_speedup: float = 1.05         # draft only when predicted faster than this (a margin: the
                                      # predictions err by 5-10% on a noisy machine)
    min_evidence: int = 8             # judged drafts before the first decision
    recheck_every: int = 32           # while autoregressive: probe rounds after this many steps
    probe_rounds: int = 2             # consecutive rounds of one draft per probe
    decay: float = 0.98               # weight of older evidence, per draft judged (memory ~50 drafts)
    score: float = 0.0                # decayed accepted drafts
    positions: float = 0.0            # decayed judged drafts
    seen: int = 0                     # drafts judged, undecayed
    strategy: str = SELF_SPECULATIVE  # probing until the evidence is in
    draft_len: int = 1
    predicted: float | None = None    # predicted speedup of drafting at the last decision
    ceiling: float = field(init=False)
    reason: str = field(init=False)
    decisions: list[dict] = field(default_factory=list)   # every change of strategy
    steps_since_probe: int = 0
    probes_left: int = 0
    rounds_since_step: int = 0        # rounds drafted in drafting mode (a timed plain step before every
    step_timed_since_round: bool = False   # recheck_every-th of them, the first included)
    drafting_rounds: int = 0
    autoregressive_steps: int = 0
    timed: bool = True                # correct the prediction by the decode's own timings
    time_decay: float = 0.9           # weight of older timings, per round or step timed
    # decayed sums of [observed, predicted] seconds, of rounds and of plain steps
    round_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])
    step_seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def __post_init__(self):
        if self.costs.max_positions < self.max_draft_len + 1:
            raise ValueError(f"decode costs measured up to {self.costs.max_positions} positions; strategy auto "
                             f"needs max_draft_len + 1 = {self.max_draft_len + 1}")
        _, _, self.ceiling = self._best(1.0)
        if self.ceiling <= self.min_speedup:
            self.strategy = AUTOREGRESSIVE
            self.reason = (f"drafting cannot pay at this batch size: even with every draft accepted the measured "
                           f"costs predict {self.ceiling:.3f}x <= {self.min_speedup}")
        else:
            self.reason = f"probing: rounds of one draft until {self.min_evidence} drafts are judged"

    def _best(self, acceptance: float) -> tuple[int, int, float]:
        """(E, γ, predicted speedup): γ from a table over α in steps of 0.01 (kept across calls: a
        decision each round must cost next to nothing), the speedup at α itself."""
        table = _best_draft_lens(self.costs, self.exit_layer, self.num_layers, self.max_draft_len)
        gamma = table[round(acceptance * 100)]
        return self.exit_layer, gamma, expected_speedup_with_costs(acceptance, gamma, self.exit_layer,
                                                                   self.num_layers, self.costs)

    @property
    def never_drafts(self) -> bool:
        return self.ceiling <= self.min_speedup

    @property
    def acceptance(self) -> float | None:
        return min(1.0, max(0.0, self.score / self.positions)) if self.positions else None

    def next_draft_len(self) -> int:
        """γ of the next round, or 0 for a plain autoregressive step (a probe round every
        `recheck_every`-th step while autoregressive; timed, a plain step every `recheck_every`-th
        round while drafting, the first one before the first round)."""
        if self.strategy == SELF_SPECULATIVE:
            if self.timed and not self.never_drafts and self.rounds_since_step % self.recheck_every == 0 \
                    and not self.step_timed_since_round:
                self.step_timed_since_round = True
                return 0
            self.rounds_since_step += 1
            self.step_timed_since_round = False
            return self.draft_len
        if self.never_drafts:
            return 0
        if self.probes_left:
            self.probes_left -= 1
            return 1
        self.steps_since_probe += 1
        if self.steps_since_probe < self.recheck_every:
            return 0
        self.steps_since_probe, self.probes_left = 0, self.probe_rounds - 1
        return 1

    def observe_time(self, draft_len: int, seconds: float) -> None:
        """A round of `draft_len` drafts (0: a plain step) took `seconds`."""
        if not self.timed:
            return
        if draft_len:
            sums, predicted = self.round_seconds, round_cost(draft_len, self.exit_layer, self.num_layers, self.costs)
        else:
            sums, predicted = self.step_seconds, autoregressive_cost(self.num_layers, self.costs)
        sums[0] = self.time_decay * sums[0] + seconds
        sums[1] = self.time_decay * sums[1] + predicted

    @property
    def time_correction(self) -> float:
        """(observed/predicted of plain steps) / (observed/predicted of rounds), 1 until both kinds
        were timed: what drifts both alike (the machine, its caches) cancels, what differs stays."""
        if not (self.step_seconds[1] and self.round_seconds[1]):
            return 1.0
        return (self.step_seconds[0] / self.step_seconds[1]) / (self.round_seconds[0] / self.round_seconds[1])

    def observe(self, score: float, positions: int, generated: int) -> None:
        """A round's evidence (`score` accepted of `positions` judged drafts), then a decision.
        `generated`: tokens committed so far (recorded with each change of strategy)."""
        if positions:
            fade = self.decay ** positions
            self.score = fade * self.score + score
            self.positions = fade * self.positions + positions
            self.seen += positions
        if self.seen < self.min_evidence:
            return
        alpha = self.acceptance
        # decide at one standard error above the estimate: a few drafts judged in isolated probes
        # understate the acceptance of continuous drafting, and a wrong "draft" is corrected by
        # the next rounds' evidence, a wrong "autoregressive" only by the next probe
        upper = min(1.0, alpha + (alpha * (1 - alpha) / self.positions) ** 0.5)
        _, gamma, predicted = self._best(alpha)           # γ for the estimate; the bound only decides
        correction = self.time_correction
        self.predicted, self.draft_len = predicted * correction, gamma
        speedup = correction * expected_speedup_with_costs(upper, gamma, self.exit_layer, self.num_layers, self.costs)
        choice = SELF_SPECULATIVE if speedup > self.min_speedup else AUTOREGRESSIVE
        verdict = "pays" if choice == SELF_SPECULATIVE else "does not pay"
        self.reason = (f"at acceptance {alpha:.3f} (upper bound {upper:.3f}) drafting (E={self.exit_layer}, best "
                       f"γ={gamma}) is predicted {self.predicted:.3f}x ({speedup:.3f}x at the bound) autoregressive "
                       f"from the costs measured at batch {self.costs.batch}, corrected by x{correction:.3f} for "
                       f"this decode's timings: it {verdict}")
        if choice == SELF_SPECULATIVE:
            self.probes_left = 0
        if choice != self.strategy or not self.decisions:
            self.decisions.append({"after_tokens": generated, "strategy": choice, "acceptance": alpha,
                                   "draft_len": gamma, "predicted_speedup": self.predicted,
                                   "predicted_speedup_at_upper_bound": speedup, "time_correction": correction})
        self.strategy = choice

    def report(self) -> dict:
        """What it chose and why, for the JSON line."""
        c = self.costs
        if not self.never_drafts and self.seen < self.min_evidence:
            self.reason = (f"still probing (one draft a round): the text ended after {self.seen} of the "
                           f"{self.min_evidence} judged drafts a decision needs")
        return {"chosen": self.strategy, "reason": self.reason, "exit_layer": self.exit_layer,
                "draft_len": self.draft_len if self.strategy == SELF_SPECULATIVE else None,
                "acceptance": self.acceptance, "positions_judged": self.seen,
                "predicted_speedup": {AUTOREGRESSIVE: 1.0, SELF_SPECULATIVE: self.predicted,
                                      "self_speculative_if_all_accepted": self.ceiling},
                "decisions": self.decisions, "drafting_rounds": self.drafting_rounds, "timed": self.timed,
                "time_correction": self.time_correction,
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
    while seqs.batch:
        if runner.cache.span(first_layer, 0) > seqs.max_length - 1:
            # the cache's host bound on the attended span still counts a longer row that has left
            # (plain steps only grow it): re-base it on the rows decoding (same KV, nothing moves)
            runner.crop_to_committed(seqs.length, seqs.max_length)
        gamma = auto.next_draft_len()
        started = clock()
        if gamma:
            accepted, rejections = stats.accepted, stats.rejections
            speculative_round(runner, seqs, queries, auto.exit_layer, gamma, sampling, generator)
            auto.observe_time(stats.draft_lens[-1], clock() - started)   # drafts a round really made
            auto.drafting_rounds += 1
            judged_accepted = stats.accepted - accepted
            auto.observe(judged_accepted, judged_accepted + stats.rejections - rejections, stats.generated)
        else:
            decode_step(runner, seqs, L, sampling, generator, track_lengths=True, states=(queries,))
            auto.observe_time(0, clock() - started)
            auto.autoregressive_steps += 1


@functools.lru_cache(maxsize=64)
def _best_draft_lens(costs: DecodeCosts, exit_layer: int, num_layers: int, max_draft_len: int) -> tuple[int, ...]:
    """The best γ in 1..max_draft_len at acceptance α = i/100, i = 0..100."""
    return tuple(best_draft_config({exit_layer: i / 100}, num_layers, max_draft_len, costs)[1] for i in range(101))
