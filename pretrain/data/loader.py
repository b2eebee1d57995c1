"""Deterministic, resumable batches.

The sample stream is a per-epoch permutation of all samples (seeded by (seed, epoch)),
concatenated across epochs; optimizer step k takes positions [k·B, (k+1)·B). The ids of a step
are a pure function of (seed, step), so a run resumed at step k sees exactly the samples an
uninterrupted run would, for any data-parallel degree.
"""
from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch

from pretrain.data.dataset import PackedDataset


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if num_samples < 1:
            raise ValueError("the dataset has no samples")
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed

    @lru_cache(maxsize=4)
    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def sample_ids(self, step: int) -> np.ndarray:
        start = step * self.global_batch_size
        positions = np.arange(start, start + self.global_batch_size)
        epochs, within = np.divmod(positions, self.num_samples)
        return np.array([self._epoch(int(e))[i] for e, i in zip(epochs, within)], dtype=np.int64)


def rank_slice(ids: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    if len(ids) % dp_size:
        raise ValueError(f"global batch {len(ids)} not divisible by data-parallel size {dp_size}")
    per = len(ids) // dp_size
    return ids[dp_rank * per:(dp_rank + 1) * per]


def make_batch(dataset: PackedDataset, ids: np.ndarray) -> dict[str, torch.Tensor]:
    rows = torch.from_numpy(np.stack([dataset[int(i)] for i in ids]))
    return {"tokens": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous(),
            "sample_ids": torch.from_numpy(np.asarray(ids, dtype=np.int64))}


class TrainBatches:
    """Yields (step, this rank's batch) from `start_step` on; state = the next step."""

    def __init__(self, dataset: PackedDataset, global_batch_size: int, seed: int, *, dp_rank: int = 0,
                 dp_size: int = 1, start_step: int = 0):
        self.dataset, self.seed, self.global_batch_size = dataset, seed, global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sampler = GlobalBatchSampler(len(dataset), global_batch_size, seed)
        self.next_step = start_step

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return make_batch(self.dataset, rank_slice(self.sampler.sample_ids(step), self.dp_rank, self.dp_size))

    def __iter__(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        while True:
            step = self.next_step
            batch = self.batch(step)
            self.next_step = step + 1
            yield step, batch

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "seed": self.seed, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data state was saved with {key}={state[key]}, this run has "
                                 f"{getattr(self, key)}: the sample order would differ")
        self.next_step = state["next_step"]


def validation_batches(dataset: PackedDataset, batch_size: int, max_batches: int | None = None
                       ) -> Iterator[dict[str, torch.Tensor]]:
    """In order, the same every time."""
    n = len(dataset) // batch_size if len(dataset) >= batch_size else 1
    if max_batches is not None:
        n = min(n, max_batches)
    for b in range(n):
        ids = np.arange(b * batch_size, min((b + 1) * batch_size, len(dataset)))
        yield make_batch(dataset, ids)
