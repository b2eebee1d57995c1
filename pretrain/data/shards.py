"""Webdataset-compatible tar shards of packed token sequences.

A shard `<split>-NNNNNN.tar` holds one member per sample, `<sample id>.tokens.npy` (the id
zero-padded to 12 digits, counted from 0 across the split's shards): an array of seq_len + 1
token ids (inputs and shifted targets). Shards are plain (uncompressed) USTAR tars, so
`webdataset.WebDataset` streams them and PackedDataset reads any sample at its byte offset.
Every byte of a shard is a function of the samples (fixed member metadata), so preparing the
same corpus twice gives identical files.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
MEMBER_SUFFIX = ".tokens.npy"
KEY_DIGITS = 12
SPLITS = ("train", "val")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def sample_key(sample_id: int) -> str:
    return f"{sample_id:0{KEY_DIGITS}d}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes the samples of one split into shards of `samples_per_shard`; each shard is written
    to `<name>.tmp` and renamed into place when complete. `shards` lists what was written.

    The bytes are those `tarfile` (USTAR, mtime 0, mode 0644) writes for the same members, built
    from one header template per writer: only the 12 name digits and the checksum change between
    members, so a sample costs a few small copies instead of a TarInfo round trip."""

    def __init__(self, out_dir: str | Path, split: str, samples_per_shard: int, dtype: np.dtype,
                 sample_len: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
        self.out_dir, self.split, self.per_shard = Path(out_dir), split, samples_per_shard
        self.dtype, self.sample_len = np.dtype(dtype), sample_len
        self.shards: list[dict] = []
        self.next_id = 0
        self._file = None
        self._tmp: Path | None = None
        self._first = 0
        self._in_shard = 0
        self._written = 0
        self._stored = self.dtype.newbyteorder("<")  # .npy data as written on any machine
        self._npy_header = npy_bytes(np.zeros(sample_len, self._stored))[:-sample_len * self.dtype.itemsize]
        member = len(self._npy_header) + sample_len * self.dtype.itemsize
        self._padding = b"\0" * (-member % tarfile.BLOCKSIZE)
        info = tarfile.TarInfo(sample_key(0) + MEMBER_SUFFIX)
        info.size, info.mode, info.mtime = member, 0o644, 0
        self._template = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
        self._template[148:156] = b" " * 8  # the checksum counts its own field as spaces
        self._base_sum = sum(self._template) - sum(self._template[:KEY_DIGITS])

    def _header(self, sample_id: int) -> bytes:
        digits = sample_key(sample_id).encode()
        header = self._template.copy()
        header[:KEY_DIGITS] = digits
        header[148:155] = b"%06o\0" % (self._base_sum + sum(digits))
        return bytes(header)

    def add(self, tokens: np.ndarray) -> None:
        if tokens.shape != (self.sample_len,):
            raise ValueError(f"a sample has shape {tokens.shape}, expected ({self.sample_len},)")
        if self._file is None:
            self._open()
        data = tokens.astype(self._stored, copy=False).tobytes()
        self._file.write(b"".join((self._header(self.next_id), self._npy_header, data, self._padding)))
        self.next_id += 1
        self._in_shard += 1
        if self._in_shard == self.per_shard:
            self._close()

    def _open(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._tmp = self.out_dir / (name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._first = self.next_id
        self._in_shard = 0

    def _close(self) -> None:
        # what tarfile.close() writes: two zero blocks, then zeros up to a whole record
        end = self._file.tell() + 2 * tarfile.BLOCKSIZE
        self._file.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)
        self.shards.append({"file": final.name, "samples": self._in_shard, "first_id": self._first,
                            "bytes": final.stat().st_size, "sha256": file_sha256(final)})

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Drop a partly written shard (after an error)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)
