"""Several prepared datasets mixed by weight, with every stream position a pure function of
(seed, position).

Ids: the sources' samples share one id space, global id = offset[s] + local id (offsets are the
running sums of the sources' sizes), so `source_of(ids)` needs nothing but the ids.

Order: the stream is cut into blocks of BLOCK positions. Each block holds exactly c_s positions of
source s, c = the largest-remainder rounding of BLOCK·w (w the normalised weights), in an order
shuffled by numpy's Generator seeded with (seed, block). The n-th position of source s in the
stream (n = block·c_s + its rank inside the block) takes that source's n-th sample of its own
epoch stream (a fresh permutation of the source per epoch, seeded by (seed, s, epoch)), so a small
source is revisited epoch by epoch while a large one is still in its first. The realised share of
source s over any whole number of blocks is exactly c_s / BLOCK (within 1/BLOCK of w_s), and over
any prefix within c_s of that.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pretrain.data.dataset import DataError, PackedDataset

BLOCK = 1 << 14


def block_counts(weights: Sequence[float], block: int = BLOCK) -> np.ndarray:
    """Positions per block of each source: largest-remainder rounding of block·w/sum(w) (ties to
    the earlier source). Every source with a weight gets at least one position."""
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or not np.all(np.isfinite(w)) or (w <= 0).any():
        raise ValueError(f"source weights {list(weights)} must be finite and > 0")
    quota = block * w / w.sum()
    counts = np.floor(quota).astype(np.int64)
    order = sorted(range(len(w)), key=lambda s: (-(quota[s] - counts[s]), s))
    counts[order[:block - counts.sum()]] += 1
    if (counts == 0).any():
        s = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(f"source {s} has weight {weights[s]}, below 1/{block} of the total: raise it")
    return counts


class MixtureSampler:
    """Global sample ids of every step for sources of `sizes` samples mixed by `weights`."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], global_batch_size: int, seed: int):
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
        if any(n < 1 for n in sizes):
            raise ValueError(f"every source needs samples; sizes {list(sizes)}")
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.counts = block_counts(weights)
        self.global_batch_size, self.seed = int(global_batch_size), int(seed)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position of block b, its rank among that source's positions in the block)."""
        cached = self._blocks.get(b)
        if cached is None:
            labels = np.repeat(np.arange(len(self.counts)), self.counts)
            np.random.default_rng([self.seed, 0x6D6978, b]).shuffle(labels)
            order = np.argsort(labels, kind="stable")
            first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
            ranks = np.empty(BLOCK, dtype=np.int64)
            ranks[order] = np.arange(BLOCK) - first[labels[order]]
            cached = self._blocks[b] = (labels, ranks)
            if len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        return cached

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            perm = self._perms[key] = np.random.default_rng([self.seed, source, epoch]).permutation(
                int(self.sizes[source]))
            if len(self._perms) > 2 * len(self.sizes) + 2:
                self._perms.popitem(last=False)
        return perm

    def positions(self, start: int, count: int) -> np.ndarray:
        """Global sample ids of stream positions [start, start + count)."""
        positions = np.arange(start, start + count, dtype=np.int64)
        blocks, slots = np.divmod(positions, BLOCK)
        sources = np.empty(count, dtype=np.int64)
        local = np.empty(count, dtype=np.int64)
        for b in np.unique(blocks):
            mask = blocks == b
            labels, ranks = self.block(int(b))
            sources[mask] = labels[slots[mask]]
            local[mask] = b * self.counts[labels[slots[mask]]] + ranks[slots[mask]]
        ids = np.empty(count, dtype=np.int64)
        for s in np.unique(sources):
            mask = sources == s
            epochs, within = np.divmod(local[mask], self.sizes[s])
            picked = np.empty(int(mask.sum()), dtype=np.int64)
            for e in np.unique(epochs):
                m = epochs == e
                picked[m] = self.permutation(int(s), int(e))[within[m]]
            ids[mask] = self.offsets[s] + picked
        return ids

    def sample_ids(self, step: int) -> np.ndarray:
        if step < 0:
            raise ValueError(f"step {step} must be >= 0")
        return self.positions(int(step) * self.global_batch_size, self.global_batch_size)

    def source_counts(self, positions: int) -> np.ndarray:
        """How many of stream positions [0, positions) each source holds."""
        full, rest = divmod(int(positions), BLOCK)
        counts = full * self.counts
        if rest:
            counts = counts + np.bincount(self.block(full)[0][:rest], minlength=len(self.counts))
        return counts


def source_names(dirs: Sequence[str | Path], names: Sequence[str | None] | None = None) -> list[str]:
    """A name per source: the given one, else the directory name, made unique with #index."""
    names = list(names) if names else [None] * len(dirs)
    base = [n or Path(d).name or str(d) for d, n in zip(dirs, names)]
    return [b if base.count(b) == 1 else f"{b}#{i}" for i, b in enumerate(base)]


class MixedDataset:
    """The samples of several PackedDatasets (one split each) under one id space; `weights` say
    how a training stream mixes them. `ds.get_many(global ids)` reads from the right source."""

    def __init__(self, datasets: Sequence[PackedDataset], weights: Sequence[float] | None = None,
                 names: Sequence[str] | None = None):
        if not datasets:
            raise ValueError("no data sources")
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(datasets)
        self.source_names = list(names) if names else source_names([d.data_dir for d in datasets])
        check_compatible(self.datasets)
        first = self.datasets[0]
        self.seq_len, self.vocab_size, self.eos_id, self.dtype = first.seq_len, first.vocab_size, first.eos_id, first.dtype
        self.manifest, self.split, self.data_dir = first.manifest, first.split, first.data_dir
        self.sizes = np.asarray([len(d) for d in self.datasets], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokenizer_path(self) -> Path:
        return self.datasets[0].tokenizer_path

    def source_of(self, sample_ids) -> torch.Tensor:
        """Source index of each global sample id."""
        ids = torch.as_tensor(sample_ids)
        return torch.bucketize(ids, torch.as_tensor(self.offsets[1:]), right=True)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        s = int(np.searchsorted(self.offsets, index, side="right") - 1)
        if not 0 <= s < len(self.datasets):
            raise IndexError(f"sample {index} outside 0..{len(self) - 1} of the mixture")
        return self.datasets[s][index - int(self.offsets[s])]

    def get_many(self, indices) -> np.ndarray:
        ids = np.asarray(indices, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sample ids outside 0..{len(self) - 1} of the mixture")
        out = np.empty((len(ids), self.seq_len + 1), dtype=np.int64)
        sources = np.searchsorted(self.offsets, ids, side="right") - 1
        for s in np.unique(sources):
            mask = sources == s
            out[mask] = self.datasets[s].get_many(ids[mask] - self.offsets[s])
        return out

    def close(self) -> None:
        for d in self.datasets:
            d.close()

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} (weight {w:g}, {len(d)} samples)"
                          for n, w, d in zip(self.source_names, self.weights, self.datasets))
        return f"MixedDataset({self.split}: {parts})"


def check_compatible(datasets: Sequence[PackedDataset]) -> None:
    """Every source must share the tokenizer (same tokenizer.json, or at least vocabulary and EOS
    when a manifest has no checksum), the sequence length and the stored dtype."""
    first = datasets[0]
    for other in datasets[1:]:
        a, b = first.manifest, other.manifest
        for key, what in (("tokenizer_sha256", "tokenizer.json"), ("vocab_size", "vocabulary size"),
                          ("eos_id", "end-of-text id"), ("seq_len", "seq_len"), ("dtype", "dtype")):
            if key in a and key in b and a[key] != b[key]:
                shown = "" if key == "tokenizer_sha256" else f": {a[key]} vs {b[key]}"
                raise DataError(f"data sources {first.data_dir} and {other.data_dir} differ in {what}{shown}; "
                                "every source must be prepared with the same tokenizer and --seq-len "
                                "(pass --tokenizer <first source dir> to prepare)")
