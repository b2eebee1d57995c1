"""Early-exit loss weights w(t, l) = C(t,l)·e'(l) / sum_i C(t,i)·e'(i) over the exits on at step t.

Exits are 1-based (exit l = output of block l-1; exit L is the model output).
e(l): uniform 1; l; sum_l = 1+2+..+l = l(l+1)/2 (the paper's); sqrt_l; inv_l = 1/l; inv_sqrt_l.
e'(l) = e_scale·e(l) for non-final exits, e(L) for the final exit.
C(t, l) in {0, 1}: none (every exit every step); rotational with period R (l on iff
l mod R == t mod R); gradual (l on iff t >= T_C·(L-l)/L: switched on from the last layer toward
the first over the first T_C steps). The final exit is always on.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

IMPORTANCE_KINDS = ("uniform", "l", "sum_l", "sqrt_l", "inv_l", "inv_sqrt_l")
CURRICULA = ("none", "rotational", "gradual")


def exit_importance(layer: int, kind: str) -> float:
    """e(l) for the 1-based exit `layer`."""
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"unknown exit importance {kind!r}; choose one of {', '.join(IMPORTANCE_KINDS)}")
    if layer < 1:
        raise ValueError(f"exit {layer} must be >= 1 (exits are 1-based)")
    return {"uniform": 1.0, "l": float(layer), "sum_l": layer * (layer + 1) / 2,
            "sqrt_l": math.sqrt(layer), "inv_l": 1.0 / layer, "inv_sqrt_l": 1.0 / math.sqrt(layer)}[kind]


def candidate_exits(num_layers: int, exit_layers: Sequence[int] | None) -> list[int]:
    """The exits that may carry a loss: the chosen subset (default all) plus the final exit."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    chosen = range(1, num_layers + 1) if exit_layers is None else exit_layers
    for layer in chosen:
        if not 1 <= layer <= num_layers:
            raise ValueError(f"exit layer {layer} outside 1..{num_layers}")
    return sorted(set(chosen) | {num_layers})


def exits_on(step: int, *, num_layers: int, exit_layers: Sequence[int] | None = None,
             curriculum: str = "none", rotation_period: int = 1, gradual_steps: int = 0) -> list[int]:
    """Sorted exits whose loss is computed at step t (the final exit always)."""
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown exit curriculum {curriculum!r}; choose one of {', '.join(CURRICULA)}")
    if rotation_period < 1:
        raise ValueError(f"rotation_period={rotation_period} must be >= 1")
    if gradual_steps < 0:
        raise ValueError(f"gradual_steps={gradual_steps} must be >= 0")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    L = num_layers
    on = []
    for layer in candidate_exits(L, exit_layers):
        if layer == L or curriculum == "none":
            on.append(layer)
        elif curriculum == "rotational":
            if layer % rotation_period == step % rotation_period:
                on.append(layer)
        elif step * L >= gradual_steps * (L - layer):
            # t >= T_C·(L-l)/L multiplied out: integer arithmetic, no rounding at the boundaries.
            on.append(layer)
    return on


def exit_loss_weights(step: int, *, num_layers: int, exit_layers: Sequence[int] | None = None,
                      importance: str = "sum_l", e_scale: float = 1.0, curriculum: str = "none",
                      rotation_period: int = 1, gradual_steps: int = 0) -> dict[int, float]:
    """{exit: w(t, l)} for the exits on at step t; the weights sum to 1."""
    # e_scale = 0 would give zero-weight exits whose head is still computed: switch exits off instead.
    if not e_scale > 0:
        raise ValueError(f"e_scale={e_scale} must be positive")
    on = exits_on(step, num_layers=num_layers, exit_layers=exit_layers, curriculum=curriculum,
                  rotation_period=rotation_period, gradual_steps=gradual_steps)
    scaled = {l: exit_importance(l, importance) * (1.0 if l == num_layers else e_scale) for l in on}
    total = sum(scaled.values())
    return {l: e / total for l, e in scaled.items()}
