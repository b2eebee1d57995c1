"""Random access to packed samples in tar shards without unpacking them.

On open, each shard's member headers are scanned once for the byte offset of every sample; a
sample is then one positioned read. Problems are reported early, naming the file.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from pretrain.data.shards import MEMBER_SUFFIX, file_sha256, sample_key

PREPARE_HINT = "run `python -m pretrain.data.prepare --out {dir}` first"


class DataError(ValueError):
    """Prepared data that is missing or damaged; the message names the file."""


def read_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.json"
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; " + PREPARE_HINT.format(dir=data_dir))
    if not manifest.is_file():
        raise DataError(f"{manifest} is missing; " + PREPARE_HINT.format(dir=data_dir))
    try:
        return json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{manifest} is not valid JSON: {err}") from None


class PackedDataset:
    def __init__(self, data_dir: str | Path, split: str = "train", verify: bool = False):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.data_dir}/manifest.json has no split {split!r}")
        self.split = split
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_id: int = self.manifest["eos_id"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self._files: list[Path] = []
        self._offsets: list[np.ndarray] = []   # per shard: data offset of each sample
        self._sizes: list[int] = []
        self._starts: list[int] = []
        total = 0
        for shard in self.manifest["splits"][split]["shards"]:
            path = self.data_dir / shard["file"]
            offsets, size = self._index_shard(path, shard, verify)
            self._files.append(path)
            self._offsets.append(offsets)
            self._sizes.append(size)
            self._starts.append(total)
            total += len(offsets)
        self._starts_arr = np.asarray(self._starts, dtype=np.int64)
        self._len = total
        self._fds: dict[int, int] = {}

    def _index_shard(self, path: Path, shard: dict, verify: bool) -> tuple[np.ndarray, int]:
        if not path.is_file():
            raise DataError(f"shard {path} listed in manifest.json is missing")
        if path.stat().st_size != shard["bytes"]:
            raise DataError(f"shard {path} has {path.stat().st_size} bytes, manifest.json says "
                            f"{shard['bytes']}: truncated or replaced; re-run prepare")
        if verify and file_sha256(path) != shard["sha256"]:
            raise DataError(f"shard {path} fails its sha256 check: corrupt; re-run prepare")
        offsets, size = [], None
        try:
            with tarfile.open(path, "r:") as tar:
                for i, member in enumerate(tar):
                    expected = sample_key(shard["first_id"] + i) + MEMBER_SUFFIX
                    if member.name != expected:
                        raise DataError(f"shard {path}: member {i} is {member.name!r}, expected {expected!r}")
                    offsets.append(member.offset_data)
                    size = member.size
        except tarfile.TarError as err:
            raise DataError(f"shard {path} is not a readable tar file: {err}") from None
        if len(offsets) != shard["samples"]:
            raise DataError(f"shard {path} holds {len(offsets)} samples, manifest.json says {shard['samples']}")
        return np.asarray(offsets, dtype=np.int64), size or 0

    def __len__(self) -> int:
        return self._len

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self._files[shard], os.O_RDONLY)
        return fd

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < self._len:
            raise IndexError(f"sample {index} outside 0..{self._len - 1} of {self.data_dir} ({self.split})")
        shard = int(np.searchsorted(self._starts_arr, index, side="right") - 1)
        offset = int(self._offsets[shard][index - self._starts[shard]])
        raw = os.pread(self._fd(shard), self._sizes[shard], offset)
        try:
            tokens = np.load(io.BytesIO(raw), allow_pickle=False)
        except ValueError as err:
            raise DataError(f"shard {self._files[shard]}: sample {index} is corrupt ({err})") from None
        if tokens.shape != (self.seq_len + 1,):
            raise DataError(f"shard {self._files[shard]}: sample {index} has shape {tokens.shape}, "
                            f"expected ({self.seq_len + 1},)")
        return tokens.astype(np.int64)

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self):  # file descriptors do not travel to worker processes
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state
