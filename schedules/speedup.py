"""Expected self-speculative decoding gains (Leviathan et al. 2023) with a per-layer draft cost.

With acceptance α per drafted token, draft length γ, exit E of L layers and the KVQ cache
(draft cost c = E/L of a full forward):
    expected tokens per round   (1 - α^(γ+1)) / (1 - α) = 1 + α + .. + α^γ   (γ+1 when α = 1)
    speedup                     (1 - α^(γ+1)) / ((1 - α)(1 + γE/L))
    tokens per layer evaluated  (1 - α^(γ+1)) / ((1 - α)(γE + L))

The layer count assumes a block costs the same on 1 and on γ+1 positions and the shared head costs
nothing. With measured costs b(M), h(M) of one block and of the head on M positions of a row,
and s of the rest of one forward pass (embedding, token choice, cache bookkeeping), and r(γ) of
what a round does besides its passes (accepting, committing, cropping every layer's cache):
    round          γ(E b(1) + h(1) + s) + E b(1) + (L - E) b(γ+1) + h(γ+1) + s + r(γ)
                   (γ draft passes; in the verify pass, the early blocks on the one uncached draft
                   and the late blocks and the head on all γ+1 positions)
    autoregressive L b(1) + h(1) + s per token
    speedup        tokens per round · autoregressive / round
which is the layer-count speedup when b ≡ 1 and h ≡ r ≡ 0.
"""
from __future__ import annotations

from dataclasses import dataclass


def expected_tokens_per_round(acceptance: float, draft_len: int) -> float:
    """Expected tokens emitted by one draft-verify round: 1 + α + .. + α^γ."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance={acceptance} must be in [0, 1]")
    if draft_len < 0:
        raise ValueError(f"draft_len={draft_len} must be >= 0")
    # The geometric sum rather than the closed form: exact at α = 1 and no cancellation in
    # (1 - α^(γ+1)) / (1 - α) as α -> 1.
    return float(sum(acceptance ** k for k in range(draft_len + 1)))


def expected_tokens_per_round_in_runs(after_accepted: float, after_rejected: float, draft_len: int) -> float:
    """Tokens per round when agreement comes in runs: a draft is accepted with probability p after an
    accepted position and q after a rejected one (a two-state Markov chain; p = q = α is the
    independent case). A round after a rejection starts with q; after γ accepted drafts and the
    bonus token (whose own agreement nobody judged) with p² + (1 - p) q. In the steady state the
    first draft is accepted with a₀ = q / (1 - p^γ (p - q)), and a round gives
        1 + a₀ (1 + p + .. + p^(γ-1))
    tokens (1 + α + .. + α^γ when p = q = α). At p = 1, q = 0 the chain never leaves its state:
    the rounds are taken to start after a rejection (a₀ = 0)."""
    for name, value in (("after_accepted", after_accepted), ("after_rejected", after_rejected)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value} must be in [0, 1]")
    if draft_len < 1:
        raise ValueError(f"draft_len={draft_len} must be >= 1")
    p, q = after_accepted, after_rejected
    stay = 1.0 - p ** draft_len * (p - q)
    first = q / stay if stay > 0 else 0.0
    return 1.0 + first * expected_tokens_per_round(p, draft_len - 1)


def _check_exit(exit_layer: int, num_layers: int) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    if not 1 <= exit_layer <= num_layers:
        raise ValueError(f"exit_layer={exit_layer} outside 1..{num_layers}")


def expected_speedup(acceptance: float, draft_len: int, exit_layer: int, num_layers: int) -> float:
    """(1 - α^(γ+1)) / ((1 - α)(1 + γE/L)): tokens per round over the round's cost in full forwards."""
    _check_exit(exit_layer, num_layers)
    return expected_tokens_per_round(acceptance, draft_len) / (1.0 + draft_len * exit_layer / num_layers)


def expected_tokens_per_layer(acceptance: float, draft_len: int, exit_layer: int, num_layers: int) -> float:
    """(1 - α^(γ+1)) / ((1 - α)(γE + L)): tokens per block evaluation (autoregressive: 1/L)."""
    _check_exit(exit_layer, num_layers)
    return expected_tokens_per_round(acceptance, draft_len) / (draft_len * exit_layer + num_layers)


def best_draft_config(acceptance_by_exit: dict[int, float], num_layers: int, max_draft_len: int = 16,
                      costs: DecodeCosts | None = None) -> tuple[int, int, float]:
    """(E, γ, speedup) maximising expected_speedup (or, given costs, expected_speedup_with_costs)
    over exits E < L and γ in 1..max_draft_len.

    Exits >= L are ignored (drafting with the full model gains nothing); ties go to the smaller
    E, then the smaller γ (cheaper rounds, less wasted work on rejection)."""
    if max_draft_len < 1:
        raise ValueError(f"max_draft_len={max_draft_len} must be >= 1")
    best: tuple[int, int, float] | None = None
    for exit_layer, alpha in sorted(acceptance_by_exit.items()):
        if exit_layer >= num_layers:
            continue
        for gamma in range(1, max_draft_len + 1):
            s = (expected_speedup(alpha, gamma, exit_layer, num_layers) if costs is None
                 else expected_speedup_with_costs(alpha, gamma, exit_layer, num_layers, costs))
            if best is None or s > best[2]:
                best = (exit_layer, gamma, s)
    if best is None:
        raise ValueError(f"no candidate exit below num_layers={num_layers} in {sorted(acceptance_by_exit)}")
    return best


@dataclass(frozen=True)
class DecodeCosts:
    """Cost of one block (`block[M-1]`) and of the shared exit head (`head[M-1]`) on M positions of
    each of `batch` rows, M = 1..max_positions, and of the rest of one forward pass (`step`), in
    any one unit (seconds when measured). Every row of a batch runs every forward, so the formulas
    below hold for a batch with the costs of its forwards. `round_extra[γ-1]`, γ = 1..max_positions-1:
    what a draft-verify round with γ drafts costs beyond its passes (empty: nothing). Measured as a
    real round less its passes' costs at one exit (`exit_layer`), it may be negative where the parts
    over-predict the whole; exact at that exit, an estimate at others. Costs calibrated so (see
    pretrain/decoding/cost_model.py) may also have a negative `step`: L b(1) + h(1) + s is then the
    plain step as measured, and every round is priced as measured too."""
    block: tuple[float, ...]
    head: tuple[float, ...]
    step: float = 0.0
    batch: int = 1
    round_extra: tuple[float, ...] = ()
    exit_layer: int | None = None

    def __post_init__(self):
        if not self.block or len(self.block) != len(self.head):
            raise ValueError(f"DecodeCosts needs block and head costs for the same positions 1..M, "
                             f"got {len(self.block)} and {len(self.head)}")
        if min(self.block) <= 0 or min(self.head) < 0 or (self.step < 0 and not self.round_extra):
            raise ValueError(f"DecodeCosts must be positive: block={self.block}, head={self.head}, step={self.step}")
        if self.batch < 1:
            raise ValueError(f"DecodeCosts batch={self.batch} must be >= 1")
        if self.round_extra and len(self.round_extra) != len(self.block) - 1:
            raise ValueError(f"DecodeCosts round_extra needs one cost per draft length 1..{len(self.block) - 1}, "
                             f"got {len(self.round_extra)}")

    @classmethod
    def layer_count(cls, max_positions: int) -> "DecodeCosts":
        """The paper's model: a block costs 1 on any number of positions, the head and the rest 0."""
        return cls(block=(1.0,) * max_positions, head=(0.0,) * max_positions)

    @property
    def max_positions(self) -> int:
        return len(self.block)

    def block_cost(self, positions: int) -> float:
        return self.block[self._index(positions)]

    def head_cost(self, positions: int) -> float:
        return self.head[self._index(positions)]

    def round_extra_cost(self, draft_len: int) -> float:
        return self.round_extra[draft_len - 1] if self.round_extra else 0.0

    def _index(self, positions: int) -> int:
        if not 1 <= positions <= len(self.block):
            raise ValueError(f"no cost measured for {positions} positions (1..{len(self.block)})")
        return positions - 1


def round_cost(draft_len: int, exit_layer: int, num_layers: int, costs: DecodeCosts) -> float:
    """γ(E b(1) + h(1) + s) + E b(1) + (L - E) b(γ+1) + h(γ+1) + s + r(γ): one draft-verify round."""
    _check_exit(exit_layer, num_layers)
    b1, h1 = costs.block_cost(1), costs.head_cost(1)
    g = draft_len
    return g * (exit_layer * b1 + h1 + costs.step) + exit_layer * b1 \
        + (num_layers - exit_layer) * costs.block_cost(g + 1) + costs.head_cost(g + 1) + costs.step \
        + costs.round_extra_cost(g)


def autoregressive_cost(num_layers: int, costs: DecodeCosts) -> float:
    """L b(1) + h(1) + s: one plain decoding step."""
    return num_layers * costs.block_cost(1) + costs.head_cost(1) + costs.step


def expected_speedup_with_costs(acceptance: float, draft_len: int, exit_layer: int, num_layers: int,
                                costs: DecodeCosts) -> float:
    """Tokens per round · (L b(1) + h(1) + s) / round_cost: the speedup over autoregressive decoding."""
    return speedup_of_rounds(expected_tokens_per_round(acceptance, draft_len), draft_len, exit_layer, num_layers,
                             costs)


def speedup_of_rounds(tokens_per_round: float, draft_len: int, exit_layer: int, num_layers: int,
                      costs: DecodeCosts) -> float:
    """tokens_per_round · (L b(1) + h(1) + s) / round_cost(γ): rounds of γ drafts that give
    `tokens_per_round` tokens each, against plain steps."""
    return tokens_per_round * autoregressive_cost(num_layers, costs) / round_cost(draft_len, exit_layer, num_layers,
                                                                                  costs)
