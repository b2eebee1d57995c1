"""Token streams: the step between documents and shards, and the unit of scale-out.

A part (one job's slice of the input files) writes, per split, the token ids of its documents in
order (each followed by EOS) as a flat little-endian array `<split>.tokens`, plus `part.json`
(written last: a part without it is incomplete). Packing then reads the parts in order and cuts
the concatenated stream of each split into samples of seq_len + 1 tokens. Since the stream of N
parts concatenated is the stream of one job over all files, the shards are the same whatever N.

The split is by document: a document goes to val when the hash of its name is below
val_fraction. When no document does (a small corpus) but there are two or more, the one with the
smallest hash goes to val; each part records where its smallest-hash training document lies in its
train stream, so packing can move it without re-reading anything.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.data.corpus import Document
from pretrain.data.shards import ShardWriter

PART_INFO = "part.json"
READ_CHUNK = 1 << 22  # tokens read at a time when packing


def split_hash(name: str) -> float:
    """A deterministic number in [0, 1) for a document name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2 ** 64


@dataclass
class StreamWriter:
    """Appends encoded documents of one part to its train and val streams."""
    directory: Path
    dtype: np.dtype
    val_fraction: float
    documents: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    tokens: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    smallest: dict | None = None  # the smallest-hash train document: hash, name, start, end

    def __post_init__(self):
        self._files = {s: open(self.directory / f"{s}.tokens", "wb") for s in ("train", "val")}

    def add(self, docs: list[Document], ids: np.ndarray, lengths: np.ndarray) -> None:
        if len(ids) and int(ids.max()) > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {int(ids.max())} does not fit the stream dtype {self.dtype}")
        ids = ids.astype(self.dtype, copy=False)
        ends = np.cumsum(lengths)
        starts = ends - lengths
        hashes = np.fromiter((split_hash(d.name) for d in docs), float, len(docs))
        is_val = hashes < self.val_fraction
        for split, mask in (("train", ~is_val), ("val", is_val)):
            if not mask.any():
                continue
            if split == "train":
                self._track_smallest(docs, hashes, np.flatnonzero(mask), lengths[mask])
            pieces = ids if mask.all() else np.concatenate([ids[s:e] for s, e in zip(starts[mask], ends[mask])])
            self._files[split].write(pieces.tobytes())
            self.documents[split] += int(mask.sum())
            self.tokens[split] += len(pieces)

    def _track_smallest(self, docs, hashes, indices, lengths) -> None:
        """Remember the smallest-hash train document and where it lies in the train stream."""
        j = int(np.argmin(hashes[indices]))
        h = float(hashes[indices[j]])
        if self.smallest is None or h < self.smallest["hash"]:
            start = self.tokens["train"] + int(lengths[:j].sum())
            self.smallest = {"hash": h, "name": docs[indices[j]].name, "start": start,
                             "end": start + int(lengths[j])}

    def close(self) -> None:
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def info(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "smallest_train_document": self.smallest}


def read_part(directory: Path) -> dict:
    path = directory / PART_INFO
    if not path.is_file():
        raise ValueError(f"part {directory} is incomplete (no {PART_INFO}): its job did not finish; run it again")
    return json.loads(path.read_text())


def _read_range(path: Path, dtype: np.dtype, start: int, end: int) -> Iterator[np.ndarray]:
    """Tokens [start, end) of a stream file, READ_CHUNK at a time."""
    for lo in range(start, end, READ_CHUNK):
        yield np.fromfile(path, dtype=dtype, count=min(READ_CHUNK, end - lo), offset=lo * dtype.itemsize)


def split_streams(parts: list[tuple[Path, dict]], val_fraction: float, dtype: np.dtype
                  ) -> tuple[dict[str, list[tuple[Path, int, int]]], dict]:
    """The pieces (file, start, end) whose concatenation is each split's stream, and the document
    counts, after moving the smallest-hash document to val when no document went there."""
    pieces = {"train": [], "val": []}
    docs = {s: sum(info["documents"][s] for _, info in parts) for s in ("train", "val")}
    moved = None
    if docs["val"] == 0 and docs["train"] >= 2 and val_fraction > 0:
        candidates = [(info["smallest_train_document"]["hash"], i) for i, (_, info) in enumerate(parts)
                      if info["smallest_train_document"]]
        moved = min(candidates)[1]
    for i, (directory, info) in enumerate(parts):
        train = directory / "train.tokens"
        n = info["tokens"]["train"]
        if i == moved:
            doc = info["smallest_train_document"]
            pieces["train"] += [(train, 0, doc["start"]), (train, doc["end"], n)]
            pieces["val"].append((train, doc["start"], doc["end"]))
        else:
            pieces["train"].append((train, 0, n))
        if i != moved:
            pieces["val"].append((directory / "val.tokens", 0, info["tokens"]["val"]))
    if moved is not None:
        docs = {"train": docs["train"] - 1, "val": 1}
    return pieces, docs


def pack_stream(chunks: Iterable[np.ndarray], writer: ShardWriter) -> dict:
    """Write the consecutive windows of writer.sample_len tokens of the concatenated chunks; the
    remainder shorter than a window is dropped."""
    window = writer.sample_len
    buffer = np.empty(0, dtype=writer.dtype)
    encoded = 0
    try:
        for chunk in chunks:
            encoded += len(chunk)
            buffer = np.concatenate([buffer, chunk.astype(writer.dtype, copy=False)])
            n = len(buffer) // window
            for row in buffer[:n * window].reshape(n, window):
                writer.add(row)
            buffer = buffer[n * window:]
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {"samples": writer.next_id, "tokens": writer.next_id * window, "encoded_tokens": encoded,
            "dropped_tokens": len(buffer)}


def pack_parts(parts: list[tuple[Path, dict]], out: Path, seq_len: int, samples_per_shard: int,
               val_fraction: float, dtype: np.dtype) -> dict:
    """Shards of every split in `out` from the parts' streams; returns the manifest's splits."""
    pieces, docs = split_streams(parts, val_fraction, dtype)
    splits = {}
    for split in ("train", "val"):
        writer = ShardWriter(out, split, samples_per_shard, dtype, seq_len + 1)
        chunks = (c for path, lo, hi in pieces[split] for c in _read_range(path, dtype, lo, hi))
        stats = pack_stream(chunks, writer)
        splits[split] = {"shards": writer.shards, "samples": stats["samples"], "tokens": stats["tokens"],
                         "documents": docs[split], "encoded_tokens": stats["encoded_tokens"],
                         "dropped_tokens": stats["dropped_tokens"]}
    return splits
