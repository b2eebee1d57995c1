"""Counter-based randomness for layer-dropout decisions.

u(seed, step, layer, sample) is a pure hash of its four keys (splitmix64 finaliser applied in
turn), so a decision depends on nothing but the global sample index — not on micro-batching,
device, rank or any RNG state — and a parallel run can be checked against one process.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _signed(value: int) -> int:
    """A 64-bit pattern as the int64 torch stores."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical (unsigned) right shift of int64 bit patterns."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 bit patterns (multiplication wraps mod 2^64)."""
    x = (x ^ _shift_right(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shift_right(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shift_right(x, 31)


def counter_uniform(seed: int, step: int, layer: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """Uniform float64 in [0, 1), one per sample id, a pure function of the four keys."""
    x = torch.full_like(sample_ids, 0, dtype=torch.int64)
    for key in (seed, step, layer):
        x = _mix(x + _signed((key * _GOLDEN) & _MASK64) + _signed(_GOLDEN))
    x = _mix(x + sample_ids.to(torch.int64) * _signed(_GOLDEN) + _signed(_GOLDEN))
    return _shift_right(x, 11).to(torch.float64) * (1.0 / (1 << 53))


def layer_keep_mask(seed: int, step: int, layer: int, sample_ids: torch.Tensor, drop_rate: float
                    ) -> torch.Tensor:
    """True where block `layer` runs for the sample (u >= drop_rate; rate 0 keeps all)."""
    return counter_uniform(seed, step, layer, sample_ids) >= drop_rate


def keep_masks(seed: int, step: int, sample_ids: torch.Tensor, drop_rates: Sequence[float]) -> torch.Tensor:
    """bool [num_layers, batch]."""
    return torch.stack([layer_keep_mask(seed, step, l, sample_ids, p) for l, p in enumerate(drop_rates)])
