"""Rotary position embedding in the rotate-half layout used by Hugging Face Llama checkpoints."""
from __future__ import annotations

import math

import torch


def llama3_scaled_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                              high_freq_factor: float, original_max_positions: int) -> torch.Tensor:
    """Llama 3 context extension: wavelengths above original/low_freq_factor are stretched by
    `factor`, those below original/high_freq_factor kept, and the band between interpolated."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_positions / low_freq_factor
    high_wavelen = original_max_positions / high_freq_factor
    smooth = (original_max_positions / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    in_band = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(in_band, interpolated, scaled)


def rope_tables(head_dim: int, max_positions: int, theta: float, device: torch.device | None = None,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [max_positions, head_dim]; angle(p, i) = p · theta^(-2i/head_dim),
    frequencies optionally rescaled (`scaling`: kwargs of llama3_scaled_frequencies)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    if scaling:
        inv_freq = llama3_scaled_frequencies(inv_freq, **scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def rotate_half_signed(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated: rotate_half(x) · sin = roll(x, Dh/2) · rotate_half_signed(sin),
    as rotate_half(x) = [-x2, x1] and roll(x, Dh/2) = [x2, x1]. The sign is exact, so is the identity."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin for x [B, T, H, Dh]; cos and signed_sin = rotate_half_signed(sin)
    broadcast to x ([1 or B, T, 1, Dh], as LayerSkipTransformer.rope gives them). One roll instead of
    two slices, a negation and a concatenation per call: decoding runs this twice per block per token."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin).to(x.dtype)
