"""The KVQ cache of self-speculative decoding: one preallocated KV cache shared by every block and
every pass (draft, verify, plain decoding), and the exit-query cache of drafted tokens.

Layout. Row b's token at position p lives in slot p of every layer: no padding in the cache, so
ragged prompts need no left padding and the RoPE position of a token is its slot. Each layer
keeps a per-row length (valid slots [0, length)). `update` writes the T new keys/values of a row
at slots [length, length + T) and lets query t attend slots <= length + t (causal); slots past
a row's length may hold stale values (right padding of a shorter prompt, rejected drafts) and are
never attended: they are overwritten before any query reaches them. The prompt is prefilled once,
right-padded to the longest prompt, then `crop(prompt_lengths)` drops the padding.

`crop(lengths, layers)` sets per-row lengths (never longer than what is stored): after a
verification the decoder crops every layer, early and late, to the committed tokens. Blocks are
addressed by global index, so a model whose `layers` ModuleDict holds a subset works unchanged.
`select_rows(index)` keeps the rows of a batch whose finished rows left it: the tensors are views
of the first rows of storage allocated once, so their addresses never change (CUDA graphs).

Masks. Every layer run in one forward starts from the same lengths, so the write slots and the
mask are built once per forward and reused: a layer's lengths are (lengths given at its last crop) + (tokens written
since), identified on the host by (crop generation, tokens written). The same host bookkeeping
gives the attended span without reading device memory: the decoder hands `crop` the longest row it
already read in its one synchronisation per round, so a crop reads nothing from the device either.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class StaticKVCache:
    """Implements pretrain.model.layers.KVCache for batch `batch` and `capacity` slots per row."""

    def __init__(self, layers: Iterable[int], batch: int, capacity: int, n_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device | str):
        layers = sorted(layers)
        shape = (batch, n_kv_heads, capacity, head_dim)
        self._storage = {l: (torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(shape, dtype=dtype, device=device),
                             torch.zeros(batch, dtype=torch.long, device=device)) for l in layers}
        self.capacity = capacity
        self._view_rows(batch)
        self._slots = torch.arange(capacity, device=device)
        self._generation = 0
        self._max_at_crop = {0: 0}                  # generation -> host max of the lengths it set
        self._state = {l: (0, 0) for l in layers}   # layer -> (generation, tokens written since)
        self._mask_key: tuple | None = None
        self._mask: torch.Tensor | None = None
        self._index: torch.Tensor | None = None     # scatter index of the slots written, with the mask

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, capacity: int) -> "StaticKVCache":
        cfg, weight = model.cfg, model.tok_embeddings.weight
        # KV heads held by this process: all of them, or n_kv_heads / tp under tensor parallelism
        wk = next(iter(model.layers.values())).attention.wk.weight
        local_kv_heads = (wk.to_local() if hasattr(wk, "to_local") else wk).shape[0] // cfg.head_dim
        return cls([int(name) for name in model.layers], batch, capacity, local_kv_heads, cfg.head_dim,
                   dtype=weight.dtype, device=weight.device)

    def _view_rows(self, rows: int) -> None:
        """k, v and lengths: the first `rows` rows of the storage."""
        self.k = {l: k[:rows] for l, (k, _, _) in self._storage.items()}
        self.v = {l: v[:rows] for l, (_, v, _) in self._storage.items()}
        self.lengths = {l: n[:rows] for l, (_, _, n) in self._storage.items()}
        self.batch = rows
        self._mask_key = None

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` [B'] (in that order) of every layer; the others leave the batch."""
        for l, stored in self._storage.items():
            for full, now in zip(stored, (self.k[l], self.v[l], self.lengths[l])):
                full[:len(index)] = now.index_select(0, index)
        self._view_rows(len(index))

    @property
    def layers(self) -> list[int]:
        return list(self.k)

    def positions(self, layer: int, new_tokens: int) -> torch.Tensor:
        """[B, T] positions (= slots) the next `new_tokens` tokens of each row take at `layer`."""
        return self.lengths[layer][:, None] + self._slots[:new_tokens]

    def span(self, layer: int, new_tokens: int) -> int:
        """Host bound of the slots the longest row of `layer` spans after `new_tokens` more."""
        generation, written = self._state[layer]
        return self._max_at_crop[generation] + written + new_tokens

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append k, v [B, Hkv, T, Dh]; return slots [0, width) of the layer and the bool mask
        [B, 1, T, width] (True = attend), width = attended_width(span)."""
        t = k.shape[2]
        generation, written = self._state[layer]
        span = self.span(layer, t)
        if span > self.capacity:
            raise ValueError(f"decoding needs {span} cache slots, the cache holds {self.capacity}")
        width = self.attended_width(span)
        key = (generation, written, t)
        if key != self._mask_key:  # the first layer of this forward: the others reuse slots and mask
            slots = self.positions(layer, t)                               # [B, T]
            self._index = slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self._mask = self._slots[None, None, None, :width] <= slots[:, None, :, None]
            self._mask_key = key
        self.k[layer].scatter_(2, self._index, k.to(self.k[layer].dtype))
        self.v[layer].scatter_(2, self._index, v.to(self.v[layer].dtype))
        self.lengths[layer] += t
        self._state[layer] = (generation, written + t)
        return self.k[layer][:, :, :width], self.v[layer][:, :, :width], self._mask

    def attended_width(self, span: int) -> int:
        """Slots handed to attention when `span` of them may be attended: just those."""
        return span

    def crop(self, lengths: torch.Tensor | list[int], layers: Iterable[int] | None = None,
             max_length: int | None = None) -> None:
        """Keep the first lengths[b] slots of row b in `layers` (default: all); the rest is dropped.
        `max_length`: an upper bound of the lengths the caller knows on the host (the decoder's
        rounds: no device read, and the lengths are trusted); without it they are read and checked."""
        layers = self.layers if layers is None else list(layers)
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self._slots.device)
        if lengths.shape != (self.batch,):
            raise ValueError(f"crop needs one length per row ({self.batch}), got shape {tuple(lengths.shape)}")
        if max_length is None:
            stored = torch.stack([self.lengths[l] for l in layers])
            if bool((lengths < 0).any() | (lengths[None, :] > stored).any()):
                raise ValueError(f"cannot crop to {lengths.tolist()}: longer than stored or negative")
            max_length = int(lengths.max())
        self._generation += 1
        self._max_at_crop[self._generation] = max_length
        for l in layers:
            self.lengths[l].copy_(lengths)
            self._state[l] = (self._generation, 0)
        live = {g for g, _ in self._state.values()}
        self._max_at_crop = {g: m for g, m in self._max_at_crop.items() if g in live}


class ExitQueryCache:
    """Exit hidden states h_E of tokens that went through blocks [0, E) but not yet [E, L).

    Rows draft in step, so every row holds the same number of entries (a row whose own draft length
    is shorter has its extra entries ignored); entry j of row b belongs to position start[b] + j. The
    decoder appends one entry per draft step, hands all of them to the late blocks in one forward,
    then crops to what is still unverified (nothing, after a round).
    """

    def __init__(self, batch: int, capacity: int, dim: int, *, dtype: torch.dtype, device: torch.device | str):
        self._storage = torch.zeros(batch, capacity, dim, dtype=dtype, device=device)
        self.h = self._storage
        self.count = 0

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows `index` (in that order); the entries of the kept rows move with them."""
        self._storage[:len(index), :self.count] = self.h[:, :self.count].index_select(0, index)
        self.h = self._storage[:len(index)]

    def append(self, h: torch.Tensor) -> None:
        t = h.shape[1]
        if self.count + t > self.h.shape[1]:
            raise ValueError(f"exit-query cache holds {self.h.shape[1]} entries per row")
        self.h[:, self.count:self.count + t] = h
        self.count += t

    def states(self) -> torch.Tensor:
        """[B, count, D] the cached exit hidden states, oldest first."""
        return self.h[:, :self.count]

    def crop(self, count: int) -> None:
        if not 0 <= count <= self.count:
            raise ValueError(f"cannot crop {self.count} entries to {count}")
        self.count = count
