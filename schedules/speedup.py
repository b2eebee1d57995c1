"""Expected self-speculative decoding gains (Leviathan et al. 2023) with a per-layer draft cost.

With acceptance α per drafted token, draft length γ, exit E of L layers and the KVQ cache
(draft cost c = E/L of a full forward):
    expected tokens per round   (1 - α^(γ+1)) / (1 - α) = 1 + α + .. + α^γ   (γ+1 when α = 1)
    speedup                     (1 - α^(γ+1)) / ((1 - α)(1 + γE/L))
    tokens per layer evaluated  (1 - α^(γ+1)) / ((1 - α)(γE + L))
"""
from __future__ import annotations


def expected_tokens_per_round(acceptance: float, draft_len: int) -> float:
    """Expected tokens emitted by one draft-verify round: 1 + α + .. + α^γ."""
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance={acceptance} must be in [0, 1]")
    if draft_len < 0:
        raise ValueError(f"draft_len={draft_len} must be >= 0")
    # The geometric sum rather than the closed form: exact at α = 1 and no cancellation in
    # (1 - α^(γ+1)) / (1 - α) as α -> 1.
    return float(sum(acceptance ** k for k in range(draft_len + 1)))


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


def best_draft_config(acceptance_by_exit: dict[int, float], num_layers: int, max_draft_len: int = 16
                      ) -> tuple[int, int, float]:
    """(E, γ, speedup) maximising expected_speedup over exits E < L and γ in 1..max_draft_len.

    Exits >= L are ignored (drafting with the full model gains nothing); ties go to the smaller
    E, then the smaller γ (cheaper rounds, less wasted work on rejection)."""
    if max_draft_len < 1:
        raise ValueError(f"max_draft_len={max_draft_len} must be >= 1")
    best: tuple[int, int, float] | None = None
    for exit_layer, alpha in sorted(acceptance_by_exit.items()):
        if exit_layer >= num_layers:
            continue
        for gamma in range(1, max_draft_len + 1):
            s = expected_speedup(alpha, gamma, exit_layer, num_layers)
            if best is None or s > best[2]:
                best = (exit_layer, gamma, s)
    if best is None:
        raise ValueError(f"no candidate exit below num_layers={num_layers} in {sorted(acceptance_by_exit)}")
    return best
