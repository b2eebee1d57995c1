"""Webdataset-compatible tar shards of packed token sequences.

A shard `<split>-NNNNNN.tar` holds one member per sample, `<sample id>.tokens.npy`, an array of
seq_len + 1 token ids (inputs and shifted targets). Shards are plain (uncompressed) tars, so
`webdataset.WebDataset` streams them and PackedDataset reads any sample at its byte offset.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np

MEMBER_SUFFIX = ".tokens.npy"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(sample_id: int) -> str:
    return f"{sample_id:012d}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ShardWriter:
    """Writes samples of one split into shards of `samples_per_shard`, each written to a
    temporary file and renamed when complete. `shards` lists what was written."""

    def __init__(self, out_dir: Path, split: str, samples_per_shard: int, dtype: np.dtype):
        self.out_dir, self.split, self.per_shard, self.dtype = Path(out_dir), split, samples_per_shard, dtype
        self.shards: list[dict] = []
        self.next_id = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def add(self, tokens: np.ndarray) -> None:
        if self._tar is None:
            self._open()
        buf = io.BytesIO()
        np.save(buf, tokens.astype(self.dtype), allow_pickle=False)
        info = tarfile.TarInfo(sample_key(self.next_id) + MEMBER_SUFFIX)
        info.size = buf.tell()
        buf.seek(0)
        self._tar.addfile(info, buf)
        self.next_id += 1
        self._in_shard += 1
        if self._in_shard == self.per_shard:
            self._close()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._first = self.next_id
        self._in_shard = 0

    def _close(self) -> None:
        self._tar.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)
        self.shards.append({"file": final.name, "samples": self._in_shard, "first_id": self._first,
                            "bytes": final.stat().st_size, "sha256": file_sha256(final)})
        self._tar = None

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards
