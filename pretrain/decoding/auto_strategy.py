"""strategy="auto": draft when self-speculative decoding pays at this batch size and exit, decode
autoregressively when it does not, and change its mind as acceptance evidence arrives.

Prediction. With the costs of this batch's forwards measured on this machine (cost_model.py: a
block and the head on 1..γ+1 positions of every row, and the rest of a pass) and the observed
acceptance α at exit E, schedules.speedup gives the predicted speedup of drafting over
autoregressive decoding, (1 + α + .. + α^γ) · (L b(1) + h(1) + s) / round_cost(γ), at the best γ
in 1..max_draft_len. Autoregressive decoding is 1 by definition. Drafting is chosen when its
prediction exceeds `min_speedup`.

Evidence. α at E is an average of per-position acceptance scores (top-1 agreement of the exit with
the full model when greedy, sum_v min(p_E, p_L) when sampling), decayed per position judged (about
the last 50 positions weigh):
  - while drafting, every round judges its drafts: accepted of (accepted + rejected);
  - while decoding autoregressively, every `recheck_every`-th step (and each of the first steps
    until `min_evidence` positions are read) the shared head also reads h_E, which the step
    computes on its way to the last block: one head evaluation, no extra block.
Both read the same quantity: whether the exit's prediction agrees with the full model's on the
committed text.

Decisions. First, the ceiling: if drafting cannot beat `min_speedup` even with every draft accepted
(α = 1), the decoder never drafts and never reads the exit. Otherwise it starts autoregressively,
reading the exit, and decides once `min_evidence` positions are read; it re-decides after every
speculative round and after every exit read. Switching needs nothing: between rounds and steps every
block's KV cache holds every committed token but the last, whichever strategy wrote it, so greedy
output is the full model's either way.
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
from schedules.speedup import DecodeCosts, best_draft_config, expected_speedup_with_costs

AUTOREGRESSIVE, SELF_SPECULATIVE = "autoregressive", "self_speculative"


@dataclass
class AutoStrategy:
    num_layers: int
    exit_layer: int
    costs: DecodeCosts                # measured at the batch size being decoded
    max_draft_len: int = 8            # γ searched in 1..max_draft_len
    min_speedup: float = 1.0          # draft only when predicted faster than this
    min_evidence: int = 8             # positions read before the first decision
    recheck_every: int = 8            # autoregressive steps between reads of the exit
    decay: float = 0.98               # weight of older evidence, per position judged (memory ~50 positions)
    score: float = 0.0                # decayed sum of per-position acceptance scores
    positions: float = 0.0            # decayed number of positions
    seen: int = 0                     # positions read, undecayed
    strategy: str = AUTOREGRESSIVE
    draft_len: int = 1
    predicted: float | None = None    # predicted speedup of drafting at the last decision
    ceiling: float = field(init=False)
    reason: str = field(init=False)
    decisions: list[dict] = field(default_factory=list)   # every change of strategy
    steps_since_read: int = 0
    drafting_rounds: int = 0
    autoregressive_steps: int = 0

    def __post_init__(self):
        if self.costs.max_positions < self.max_draft_len + 1:
            raise ValueError(f"decode costs measured up to {self.costs.max_positions} positions; strategy auto "
                             f"needs max_draft_len + 1 = {self.max_draft_len + 1}")
        _, _, self.ceiling = self._best(1.0)
        if self.ceiling <= self.min_speedup:
            self.reason = (f"drafting cannot pay at this batch size: even with every draft accepted the measured "
                           f"costs predict {self.ceiling:.3f}x <= {self.min_speedup}")
        else:
            self.reason = f"reading the exit until {self.min_evidence} positions are judged"

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

    def read_exit_now(self) -> bool:
        """Whether the next autoregressive step should read the exit (and count the step)."""
        if self.never_drafts:
            return False
        due = self.seen < self.min_evidence or self.steps_since_read + 1 >= self.recheck_every
        self.steps_since_read = 0 if due else self.steps_since_read + 1
        return due

    def observe(self, score: float, positions: int, generated: int) -> None:
        """Acceptance evidence (sum of scores over `positions` positions), then a decision.
        `generated`: tokens committed so far (recorded with each change of strategy)."""
        if positions:
            fade = self.decay ** positions
            self.score = fade * self.score + score
            self.positions = fade * self.positions + positions
            self.seen += positions
        if self.seen < self.min_evidence:
            return
        _, gamma, speedup = self._best(self.acceptance)
        self.predicted, self.draft_len = speedup, gamma
        choice = SELF_SPECULATIVE if speedup > self.min_speedup else AUTOREGRESSIVE
        verdict = "pays" if choice == SELF_SPECULATIVE else "does not pay"
        self.reason = (f"at acceptance {self.acceptance:.3f} drafting (E={self.exit_layer}, best γ={gamma}) is "
                       f"predicted {speedup:.3f}x autoregressive from the costs measured at batch "
                       f"{self.costs.batch}: it {verdict}")
        if choice != self.strategy or not self.decisions:
            self.decisions.append({"after_tokens": generated, "strategy": choice, "acceptance": self.acceptance,
                                   "draft_len": gamma, "predicted_speedup": speedup})
        self.strategy = choice

    def report(self) -> dict:
        """What it chose and why, for the JSON line."""
        c = self.costs
        if not self.never_drafts and self.seen < self.min_evidence:
            self.reason = (f"decoded autoregressively: the text ended after {self.seen} of the {self.min_evidence} "
                           "positions read at the exit that a decision needs")
        return {"chosen": self.strategy, "reason": self.reason, "exit_layer": self.exit_layer,
                "draft_len": self.draft_len if self.strategy == SELF_SPECULATIVE else None,
                "acceptance": self.acceptance, "positions_judged": self.seen,
                "predicted_speedup": {AUTOREGRESSIVE: 1.0, SELF_SPECULATIVE: self.predicted,
                                      "self_speculative_if_all_accepted": self.ceiling},
                "decisions": self.decisions, "drafting_rounds": self.drafting_rounds,
                "autoregressive_steps": self.autoregressive_steps,
                "costs": {"batch": c.batch, "block_s": list(c.block), "head_s": list(c.head), "step_s": c.step}}


def decode_auto(runner: BlockRunner, seqs: Sequences, auto: AutoStrategy, sampling: SamplingConfig,
                generator: torch.Generator | None) -> None:
    """Rounds or steps until every row is finished, each chosen by `auto` (see the module docstring)."""
    model, stats, L = runner.model, runner.stats, runner.num_layers
    queries = ExitQueryCache(seqs.batch, auto.max_draft_len + 1, model.cfg.dim,
                             dtype=model.tok_embeddings.weight.dtype, device=seqs.tokens.device)
    first_layer = runner.cache.layers[0]
    while seqs.batch:
        if runner.cache.span(first_layer, 0) > seqs.max_length - 1:
            # the cache's host bound on the attended span still counts a longer row that has left
            # (plain steps only grow it): re-base it on the rows decoding (same KV, nothing moves)
            runner.crop_to_committed(seqs.length, seqs.max_length)
        if auto.strategy == SELF_SPECULATIVE:
            accepted, rejections = stats.accepted, stats.rejections
            speculative_round(runner, seqs, queries, auto.exit_layer, auto.draft_len, sampling, generator)
            auto.drafting_rounds += 1
            judged_accepted = stats.accepted - accepted
            auto.observe(judged_accepted, judged_accepted + stats.rejections - rejections, stats.generated)
        else:
            read = auto.exit_layer if auto.read_exit_now() else None
            evidence = decode_step(runner, seqs, L, sampling, generator, read_exit=read, track_lengths=True,
                                   states=(queries,))
            auto.autoregressive_steps += 1
            if evidence is not None:
                auto.observe(*evidence, stats.generated)


@functools.lru_cache(maxsize=64)
def _best_draft_lens(costs: DecodeCosts, exit_layer: int, num_layers: int, max_draft_len: int) -> tuple[int, ...]:
    """The best γ in 1..max_draft_len at acceptance α = i/100, i = 0..100."""
    return tuple(best_draft_config({exit_layer: i / 100}, num_layers, max_draft_len, costs)[1] for i in range(101))
