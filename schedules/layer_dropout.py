"""Layer-dropout rate p(l, t) = S(t) · D(l) · p_max.

D(l), l = 0..L-1 with x = l/(L-1): uniform 1; linear x; exp 2^x - 1 (the paper's: 0 at the first
block, 1 at the last); log log_L(l+1); sin sin(πx/2); sigmoid 1/(1+e^(-10(x-0.5))).
S(t), t = 0..T-1 with x = t/(T-1), clamped to [0, 1]: constant 1 (continual pretraining,
finetuning); exp 2^x - 1 (from scratch: dropout ramps up over training); linear x.
"""
from __future__ import annotations

import math

DEPTH_SCALES = ("uniform", "linear", "exp", "log", "sin", "sigmoid")
TIME_SCALES = ("constant", "exp", "linear")


def _check_kind(kind: str, choices: tuple[str, ...], what: str) -> None:
    if kind not in choices:
        raise ValueError(f"unknown {what} {kind!r}; choose one of {', '.join(choices)}")


def depth_scale(layer: int, num_layers: int, kind: str) -> float:
    """D(l) for block `layer` (0-based) of `num_layers`."""
    _check_kind(kind, DEPTH_SCALES, "depth scale")
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} outside 0..{num_layers - 1} (blocks are 0-based)")
    # One block is both the first and the last: treat it as the deepest (x = 1).
    x = layer / (num_layers - 1) if num_layers > 1 else 1.0
    if kind == "uniform":
        return 1.0
    if kind == "linear":
        return x
    if kind == "exp":
        return 2.0 ** x - 1.0
    if kind == "log":
        return math.log(layer + 1, num_layers) if num_layers > 1 else 1.0
    if kind == "sin":
        return math.sin(math.pi * x / 2)
    return 1.0 / (1.0 + math.exp(-10.0 * (x - 0.5)))


def time_scale(step: int, total_steps: int, kind: str) -> float:
    """S(t) at step `step` (0-based) of `total_steps`."""
    _check_kind(kind, TIME_SCALES, "time scale")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    # Clamped so that steps past the planned end (a resumed or extended run) keep the final rate.
    x = min(1.0, step / (total_steps - 1)) if total_steps > 1 else 1.0
    if kind == "constant":
        return 1.0
    if kind == "exp":
        return 2.0 ** x - 1.0
    return x


def layer_dropout_rate(step: int, layer: int, *, num_layers: int, total_steps: int, p_max: float,
                       depth: str = "exp", time: str = "constant") -> float:
    """p(l, t) = S(t) · D(l) · p_max."""
    # p_max = 1 would skip the last block for every sample, leaving it untrained.
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"p_max={p_max} must be in [0, 1)")
    return time_scale(step, total_steps, time) * depth_scale(layer, num_layers, depth) * p_max


def layer_dropout_rates(step: int, *, num_layers: int, total_steps: int, p_max: float,
                        depth: str = "exp", time: str = "constant") -> list[float]:
    """[p(0, t), ..., p(L-1, t)], one rate per block."""
    if num_layers < 1:
        raise ValueError(f"num_layers={num_layers} must be >= 1")
    return [layer_dropout_rate(step, l, num_layers=num_layers, total_steps=total_steps, p_max=p_max,
                               depth=depth, time=time) for l in range(num_layers)]
