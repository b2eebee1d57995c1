"""Counter-based randomness for layer-dropout decisions.

u(seed, step, layer, id) = top 53 bits of h / 2^53, where h absorbs the four keys in turn,
    h <- splitmix64(h + key·φ + φ),   φ = 0x9E3779B97F4A7C15, h starts at 0, all mod 2^64.
A decision is a pure function of the global sample index and the three scalar keys, so it does
not depend on micro-batching, device, rank or parallel layout, never touches a global RNG, and a
parallel run can be checked against one process bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 that torch stores (torch has no uint64 arithmetic)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _mix_int(x: int) -> int:
    """splitmix64 finaliser on a Python int (unsigned, reduced mod 2^64)."""
    x = ((x ^ (x >> 30)) * _MUL1) & _MASK64
    x = ((x ^ (x >> 27)) * _MUL2) & _MASK64
    return x ^ (x >> 31)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic; masking off the copied sign bits makes it logical.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 bit patterns: int64 add/mul wrap mod 2^64 on every backend,
    and the low 64 bits of a product do not depend on signedness, so this equals _mix_int."""
    x = (x ^ _shift_right(x, 30)) * _signed(_MUL1)
    x = (x ^ _shift_right(x, 27)) * _signed(_MUL2)
    return x ^ _shift_right(x, 31)


def _check_ids(sample_ids: torch.Tensor) -> None:
    if not isinstance(sample_ids, torch.Tensor):
        raise ValueError(f"sample_ids must be a torch.Tensor of integer ids, got {type(sample_ids).__name__}")
    if sample_ids.is_floating_point() or sample_ids.is_complex() or sample_ids.dtype == torch.bool:
        raise ValueError(f"sample_ids must have an integer dtype, got {sample_ids.dtype}")


def _check_rate(drop_rate: float) -> None:
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate={drop_rate} must be in [0, 1]")


def counter_uniform(seed: int, step: int, layer: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """Uniform float64 in [0, 1), same shape and device as sample_ids (int64 global sample ids)."""
    _check_ids(sample_ids)
    # The scalar keys are hashed once in exact Python integers; only the per-sample stage runs in
    # torch, so its cost is one mixer per element.
    prefix = 0
    for key in (seed, step, layer):
        prefix = _mix_int((prefix + int(key) * _GOLDEN + _GOLDEN) & _MASK64)
    ids = sample_ids.to(torch.int64)
    x = _mix(ids * _signed(_GOLDEN) + _signed(prefix + _GOLDEN))
    # 53 bits fill a float64 mantissa exactly: the result is k / 2^53, never 1.0.
    return _shift_right(x, 11).to(torch.float64) * (1.0 / (1 << 53))


def layer_keep_mask(seed: int, step: int, layer: int, sample_ids: torch.Tensor, drop_rate: float
                    ) -> torch.Tensor:
    """True where block `layer` runs for the sample: u >= drop_rate (rate 0 keeps every sample)."""
    _check_rate(drop_rate)
    return counter_uniform(seed, step, layer, sample_ids) >= drop_rate


def keep_masks(seed: int, step: int, sample_ids: torch.Tensor, drop_rates: Sequence[float]) -> torch.Tensor:
    """bool [num_layers, batch]: row l = layer_keep_mask(seed, step, l, sample_ids, drop_rates[l])."""
    _check_ids(sample_ids)
    rows = [layer_keep_mask(seed, step, layer, sample_ids, rate) for layer, rate in enumerate(drop_rates)]
    if not rows:
        return torch.ones((0, *sample_ids.shape), dtype=torch.bool, device=sample_ids.device)
    return torch.stack(rows)
