"""Deterministic, resumable batches.

The sample stream is a per-epoch permutation of all samples (numpy Generator seeded by
(seed, epoch)), concatenated across epochs; optimizer step k takes positions [k·B, (k+1)·B) of
it (a batch may straddle two epochs). The ids of a step are a pure function of (seed, step), so
a run resumed at step k sees exactly the samples an uninterrupted run would, and data-parallel
rank r of D takes the r-th contiguous slice of the global batch, for any D. With several sources
(a MixedDataset) the stream is pretrain.data.mixture.MixtureSampler's, a pure function of
(seed, position) as well.
"""
from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import torch

from pretrain.config import ConfigError
from pretrain.data.dataset import PackedDataset
from pretrain.data.mixture import MixtureSampler

Batch = dict[str, torch.Tensor]


class GlobalBatchSampler:
    def __init__(self, num_samples: int, global_batch_size: int, seed: int):
        if num_samples < 1:
            raise ValueError("the dataset has no samples")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
        self.num_samples, self.global_batch_size, self.seed = int(num_samples), int(global_batch_size), int(seed)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of all samples in `epoch` (the last few are cached)."""
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
            self._perms[epoch] = perm
            if len(self._perms) > 3:
                self._perms.popitem(last=False)
        return perm

    @property
    def steps_per_epoch(self) -> float:
        return self.num_samples / self.global_batch_size

    def epoch(self, step: int) -> int:
        """The epoch the first sample of `step` belongs to."""
        return step * self.global_batch_size // self.num_samples

    def sample_ids(self, step: int) -> np.ndarray:
        """The global batch of optimizer step `step` (0-based): int64 [global_batch_size]."""
        if step < 0:
            raise ValueError(f"step {step} must be >= 0")
        start = int(step) * self.global_batch_size
        positions = np.arange(start, start + self.global_batch_size, dtype=np.int64)
        epochs, within = np.divmod(positions, self.num_samples)
        ids = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            ids[mask] = self.permutation(int(epoch))[within[mask]]
        return ids

    def source_counts(self, positions: int) -> np.ndarray:
        """One source: all of stream positions [0, positions)."""
        return np.asarray([int(positions)], dtype=np.int64)


def make_sampler(dataset, global_batch_size: int, seed: int):
    """The global-batch sampler of a dataset: a mixture when it has several weighted sources."""
    if len(getattr(dataset, "source_names", ())) > 1:
        return MixtureSampler(dataset.sizes, dataset.weights, global_batch_size, seed)
    return GlobalBatchSampler(len(dataset), global_batch_size, seed)


def rank_slice(ids: np.ndarray, dp_rank: int, dp_size: int) -> np.ndarray:
    """The `dp_rank`-th of `dp_size` contiguous equal parts of a global batch."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"data-parallel rank {dp_rank} is not in 0..{dp_size - 1}")
    if len(ids) % dp_size:
        raise ValueError(f"global batch {len(ids)} is not divisible by the data-parallel size {dp_size}")
    per = len(ids) // dp_size
    return ids[dp_rank * per:(dp_rank + 1) * per]


def make_batch(dataset: PackedDataset, ids) -> Batch:
    """tokens = samples[:, :-1], targets = samples[:, 1:] (LongTensor [B, seq_len]); sample_ids [B]."""
    ids = np.asarray(ids, dtype=np.int64)
    rows = torch.from_numpy(dataset.get_many(ids))
    return {"tokens": rows[:, :-1].contiguous(), "targets": rows[:, 1:].contiguous(),
            "sample_ids": torch.from_numpy(ids.copy())}


# the setting behind each field of the data state (a resume must keep them)
_SETTING_OF = {"seed": "train.seed", "global_batch_size": "train.global_batch_size",
               "num_samples": "data.dir / data.sources (the training data)", "sources": "data.sources (the mix)"}


class TrainBatches:
    """Yields (step, this rank's batch) forever, from `start_step` (or the loaded state) on; the
    caller stops. The state is the next step to yield (plus seed and global batch size, checked on
    load). With `prefetch` > 0 a background thread builds that many batches ahead; the batches and
    the state are the same as without it."""

    def __init__(self, dataset: PackedDataset, global_batch_size: int, seed: int, dp_rank: int = 0,
                 dp_size: int = 1, start_step: int = 0, *, prefetch: int = 0, pin_memory: bool = False):
        if global_batch_size % dp_size:
            raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                             f"data-parallel size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is not in 0..{dp_size - 1}")
        if start_step < 0:
            raise ValueError(f"start_step={start_step} must be >= 0")
        self.dataset, self.seed, self.global_batch_size = dataset, int(seed), int(global_batch_size)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.sampler = make_sampler(dataset, global_batch_size, seed)
        self.next_step = int(start_step)
        self.prefetch = int(prefetch)
        self.pin_memory = pin_memory and torch.cuda.is_available()

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.dp_size

    def sample_ids(self, step: int) -> np.ndarray:
        """This rank's sample ids at `step`."""
        return rank_slice(self.sampler.sample_ids(step), self.dp_rank, self.dp_size)

    def batch(self, step: int) -> Batch:
        batch = make_batch(self.dataset, self.sample_ids(step))
        if self.pin_memory:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        if self.prefetch > 0:
            yield from self._prefetched()
            return
        while True:
            step = self.next_step
            batch = self.batch(step)
            self.next_step = step + 1
            yield step, batch

    def _prefetched(self) -> Iterator[tuple[int, Batch]]:
        worker = _Prefetcher(self, self.next_step)
        try:
            while True:
                if worker.next_step != self.next_step:  # load_state_dict() moved us: start over there
                    worker.stop()
                    worker = _Prefetcher(self, self.next_step)
                step, batch = worker.get()
                self.next_step = step + 1
                yield step, batch
        finally:
            worker.stop()

    def tokens_seen(self, steps: int) -> dict[str, int]:
        """Training tokens each source has given over optimizer steps [0, steps) (all ranks
        together): a function of the stream, so it stays exact across resumes and layouts."""
        counts = self.sampler.source_counts(int(steps) * self.global_batch_size)
        return {name: int(n) * self.dataset.seq_len for name, n in zip(self.dataset.source_names, counts)}

    def _sources(self) -> list:
        """[samples, weight] per source (names may change with a directory; order and sizes may not)."""
        weights = getattr(self.dataset, "weights", [1.0])
        return [[int(k), float(w)] for k, w in zip(getattr(self.dataset, "sizes", [len(self.dataset)]), weights)]

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "num_samples": len(self.dataset), "sources": self._sources()}

    def load_state_dict(self, state: dict) -> None:
        def norm(key, value):  # a checkpoint may hand back tuples for lists
            return [list(map(float, x)) for x in value] if key == "sources" else value

        for key, have in (("seed", self.seed), ("global_batch_size", self.global_batch_size),
                          ("num_samples", len(self.dataset)), ("sources", self._sources())):
            if key in state and norm(key, state[key]) != norm(key, have):
                setting = _SETTING_OF[key]
                raise ConfigError(f"{setting}: the checkpoint was saved with {key}={state[key]} but this run has "
                                  f"{key}={have}; resuming would feed a different sample order: resume with the "
                                  f"settings the run was started with, or start a new run in another run_dir")
        if "next_step" not in state:
            raise ValueError(f"not a TrainBatches state (no next_step): {sorted(state)}")
        self.next_step = int(state["next_step"])


class _Prefetcher:
    """One thread building the batches of steps next_step, next_step+1, ... into a bounded queue."""

    def __init__(self, batches: TrainBatches, first_step: int):
        self.next_step = first_step  # the step get() returns next
        self._queue: queue.Queue = queue.Queue(maxsize=batches.prefetch)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(batches, first_step),
                                        name="TrainBatches-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, batches: TrainBatches, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (step, batches.batch(step), None)
            except BaseException as err:  # handed to the consumer, raised there
                self._put((step, None, err))
                return
            if not self._put(item):
                return
            step += 1

    def get(self) -> tuple[int, Batch]:
        step, batch, err = self._queue.get()
        if err is not None:
            raise err
        self.next_step = step + 1
        return step, batch

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def validation_batches(dataset: PackedDataset, batch_size: int, max_batches: int | None = None,
                       drop_last: bool = False) -> Iterator[Batch]:
    """Samples 0, 1, 2, ... in order, `batch_size` at a time (the last batch may be smaller unless
    `drop_last`), at most `max_batches` batches; the same every time."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    n = len(dataset) // batch_size if drop_last else -(-len(dataset) // batch_size)
    if max_batches is not None:
        n = min(n, max_batches)
    for b in range(n):
        yield make_batch(dataset, np.arange(b * batch_size, min((b + 1) * batch_size, len(dataset))))
