"""A preallocated KV cache addressed by absolute position, shared by every decoding strategy.

Row b's token at position p always lives in slot p, so ragged prompts need no left padding and
RoPE positions equal slot indices. Before a forward, the caller sets the positions of the new
tokens ([B, T]); each layer writes its new k, v into those slots and attends to slots <= the
query's position. Slots past a row's valid prefix may hold stale values (padding, rejected
drafts) but are never attended, because the next write for that row starts right after its
valid prefix and queries see only earlier slots: cropping after a rejection is therefore just
moving the row's next position back, for the early and the late layers alike.
"""
from __future__ import annotations

import torch


class PositionalKVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.positions: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._span = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_len: int) -> "PositionalKVCache":
        cfg = model.cfg
        weight = model.tok_embeddings.weight
        return cls(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim, dtype=weight.dtype,
                   device=weight.device)

    def set_positions(self, positions: torch.Tensor) -> None:
        """positions [B, T] of the tokens about to run; builds the attention mask once for all layers."""
        span = int(positions.max()) + 1
        if span > self.max_len:
            raise ValueError(f"decoding needs {span} cache slots, cache holds {self.max_len}")
        self.positions = positions
        self._span = span
        slots = torch.arange(span, device=positions.device)
        self._mask = (slots[None, None, None, :] <= positions[:, None, :, None])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k, v [B, Hkv, T, Dh] at the set positions; return slots [0, span) and the mask."""
        index = self.positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[layer].scatter_(2, index, k.to(self.k[layer].dtype))
        self.v[layer].scatter_(2, index, v.to(self.v[layer].dtype))
        return self.k[layer][:, :, :self._span], self.v[layer][:, :, :self._span], self._mask
