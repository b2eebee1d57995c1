"""Expected self-speculative decoding gains (Leviathan et al. 2023) with a per-layer draft cost.

With acceptance α per drafted token, draft length γ, exit E of L layers and the KVQ cache
(draft cost c = E/L of a full forward):
    expected tokens per round   (1 - α^(γ+1)) / (1 - α)        (γ+1 when α = 1)
    speedup                     (1 - α^(γ+1)) / ((1 - α)(1 + γE/L))
    tokens per layer evaluated  (1 - α^(γ+1)) / ((1 - α)(γE + L))
"""
from __future__ import annotations


def expected_tokens_per_round(acceptance: float, draft_len: int) -> float:
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"acceptance={acceptance} must be in [0, 1]")
    if draft_len < 0:
        raise ValueError(f"draft_len={draft_len} must be >= 0")
    if acceptance == 1.0:
        return float(draft_len + 1)
    return (1.0 - acceptance ** (draft_len + 1)) / (1.0 - acceptance)


def expected_speedup(acceptance: float, draft_len: int, exit_layer: int, num_layers: int) -> float:
    return expected_tokens_per_round(acceptance, draft_len) / (1.0 + draft_len * exit_layer / num_layers)


def expected_tokens_per_layer(acceptance: float, draft_len: int, exit_layer: int, num_layers: int) -> float:
    return expected_tokens_per_round(acceptance, draft_len) / (draft_len * exit_layer + num_layers)


def best_draft_config(acceptance_by_exit: dict[int, float], num_layers: int, max_draft_len: int = 16
                      ) -> tuple[int, int, float]:
    """(E, γ, speedup) maximising the expected speedup over exits E < L and γ in 1..max_draft_len."""
    best = (0, 0, 0.0)
    for exit_layer, alpha in sorted(acceptance_by_exit.items()):
        if exit_layer >= num_layers:
            continue
        for gamma in range(1, max_draft_len + 1):
            s = expected_speedup(alpha, gamma, exit_layer, num_layers)
            if s > best[2]:
                best = (exit_layer, gamma, s)
    if best[0] == 0:
        raise ValueError(f"no candidate exit below num_layers={num_layers}")
    return best
