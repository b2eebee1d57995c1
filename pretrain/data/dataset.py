"""Random access to packed samples in tar shards without unpacking them.

On open, every shard listed in manifest.json is checked (it exists, has the recorded size, its
members are exactly the expected `<id>.tokens.npy` names, equally sized, with the manifest's
dtype and shape) and its member headers are scanned once for the byte offset of each sample's
array data. A sample is then one positioned read. Problems are reported when the dataset is
opened, naming the file. Every shard is checked against the sha256 in the manifest the first
time a sample is read from it (all of them at once with `verify=True` or `.verify()`), and every
batch read is checked for token ids beyond the manifest's vocab_size, so damaged bytes or a
manifest that understates the vocabulary give a DataError naming the file, not wrong training.
"""
from __future__ import annotations

import ast
import json
import os
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from pretrain.data.shards import FORMAT_VERSION, KEY_DIGITS, MEMBER_SUFFIX, file_sha256, sample_key

PREPARE_HINT = "run `python -m pretrain.data.prepare --out {dir}` first"
MAX_OPEN_SHARDS = 64
_BLOCK = 512  # tar block size
_MANIFEST_KEYS = ("format", "seq_len", "vocab_size", "eos_id", "dtype", "splits")


class DataError(ValueError):
    """Prepared data that is missing or damaged; the message names the file."""


def read_manifest(data_dir: str | Path) -> dict:
    data_dir = Path(data_dir)
    manifest = data_dir / "manifest.json"
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; " + PREPARE_HINT.format(dir=data_dir))
    if not manifest.is_file():
        raise DataError(f"{manifest} is missing (no prepared data in {data_dir}); "
                        + PREPARE_HINT.format(dir=data_dir))
    try:
        content = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{manifest} is not valid JSON ({err}); " + PREPARE_HINT.format(dir=data_dir)) from None
    missing = [k for k in _MANIFEST_KEYS if not isinstance(content, dict) or k not in content]
    if missing:
        raise DataError(f"{manifest} lacks {', '.join(missing)}; " + PREPARE_HINT.format(dir=data_dir))
    if content["format"] != FORMAT_VERSION:
        raise DataError(f"{manifest} has format {content['format']}, this code reads format "
                        f"{FORMAT_VERSION}; " + PREPARE_HINT.format(dir=data_dir))
    return content


def _parse_header(block: bytes) -> int | None:
    """The member size in a USTAR header block, or None if it is not a valid one."""
    try:
        checksum = int(block[148:156].split(b"\0")[0].strip() or b"-1", 8)
        size = int(block[124:136].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return None
    if block[257:262] != b"ustar" or checksum != sum(block[:148]) + 8 * 32 + sum(block[156:]) or size < 0:
        return None
    return size


def _npy_header(raw: bytes) -> tuple[int, np.dtype, tuple]:
    """(header length, dtype, shape) of the .npy bytes that start `raw`."""
    if raw[:6] != b"\x93NUMPY" or len(raw) < 10:
        raise ValueError("not a .npy array")
    major = raw[6]
    if major == 1:
        hlen, start = int.from_bytes(raw[8:10], "little"), 10
    elif major in (2, 3):
        hlen, start = int.from_bytes(raw[8:12], "little"), 12
    else:
        raise ValueError(f"unknown .npy version {major}")
    header = ast.literal_eval(raw[start:start + hlen].decode("latin1"))
    if header.get("fortran_order"):
        raise ValueError("fortran-ordered array")
    return start + hlen, np.dtype(header["descr"]), tuple(header["shape"])


class PackedDataset:
    """`ds[i]` is sample i of `split` (0 <= i < len(ds)) as an int64 array of seq_len + 1 token
    ids: inputs are `[:-1]`, targets `[1:]`."""

    def __init__(self, data_dir: str | Path, split: str = "train", verify: bool = False):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        self._manifest_path = self.data_dir / "manifest.json"
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(f"{self._manifest_path} has no split {split!r} (it has {', '.join(splits)})")
        self.split = split
        self.seq_len: int = int(self.manifest["seq_len"])
        self.vocab_size: int = int(self.manifest["vocab_size"])
        self.eos_id: int = int(self.manifest["eos_id"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self._sample_bytes = (self.seq_len + 1) * self.dtype.itemsize
        self._shards: list[dict] = splits[split].get("shards", [])
        self._files: list[Path] = []
        self._offsets: list[np.ndarray] = []   # per shard: where each sample's array data starts
        starts, total = [], 0
        for shard in self._shards:
            path = self.data_dir / shard["file"]
            offsets = self._index_shard(path, shard, total, verify)
            self._files.append(path)
            self._offsets.append(offsets)
            starts.append(total)
            total += len(offsets)
        if "samples" in splits[split] and splits[split]["samples"] != total:
            raise DataError(f"{self._manifest_path}: split {split!r} lists {splits[split]['samples']} samples "
                            f"but its shards hold {total}")
        self._starts = np.asarray(starts, dtype=np.int64)
        self._len = total
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._verified: set[int] = set(range(len(self._files))) if verify else set()
        self._lock = threading.Lock()
        self.source_names = [self.data_dir.name or str(self.data_dir)]

    # -- opening -------------------------------------------------------------------------------

    def _index_shard(self, path: Path, shard: dict, first_id: int, verify: bool) -> np.ndarray:
        if not path.is_file():
            raise DataError(f"shard {path} listed in {self._manifest_path} is missing; "
                            + PREPARE_HINT.format(dir=self.data_dir))
        size = path.stat().st_size
        if "bytes" in shard and size != shard["bytes"]:
            what = "truncated" if size < shard["bytes"] else "larger than written"
            raise DataError(f"shard {path} has {size} bytes, {self._manifest_path.name} says {shard['bytes']}: "
                            f"{what} or replaced; re-run prepare")
        if verify:
            self._verify_shard(path, shard)
        if shard.get("first_id", first_id) != first_id:
            raise DataError(f"{self._manifest_path}: shard {shard['file']} starts at sample "
                            f"{shard['first_id']}, expected {first_id}")
        offsets = self._fast_index(path, shard["samples"], first_id, size)
        if offsets is not None:
            return offsets
        offsets = []  # the general scan, which also says what exactly is wrong
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for i, member in enumerate(tar):
                    expected = sample_key(first_id + i) + MEMBER_SUFFIX
                    if member.name != expected or not member.isfile():
                        raise DataError(f"shard {path}: member {i} is {member.name!r}, expected a file "
                                        f"{expected!r}; not written by prepare, or damaged")
                    if i == 0:
                        data_start = self._check_first_member(path, f, member)
                        member_size = member.size
                    elif member.size != member_size:
                        raise DataError(f"shard {path}: member {member.name} has {member.size} bytes, "
                                        f"the others {member_size}; damaged")
                    if member.offset_data + member.size > size:
                        raise DataError(f"shard {path}: member {member.name} runs past the end of the "
                                        f"file; truncated")
                    offsets.append(member.offset_data + data_start)
        except tarfile.TarError as err:
            raise DataError(f"shard {path} is not a readable tar file ({err}); truncated or corrupt") from None
        if len(offsets) != shard["samples"]:
            raise DataError(f"shard {path} holds {len(offsets)} samples, {self._manifest_path.name} says "
                            f"{shard['samples']}; truncated or replaced")
        return np.asarray(offsets, dtype=np.int64)

    def _fast_index(self, path: Path, samples: int, first_id: int, size: int) -> np.ndarray | None:
        """Offsets of the sample data when the shard is exactly what prepare writes (`samples`
        equally sized USTAR members named by consecutive ids, then end-of-archive zeros), checked
        on all member headers at once; None when anything differs (the caller then scans with
        tarfile, which names the problem)."""
        if samples < 1 or size < 2 * _BLOCK:
            return None
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        try:
            first = _parse_header(bytes(mm[:_BLOCK]))
            if first is None:
                return None
            member_size = first
            stride = _BLOCK + -(-member_size // _BLOCK) * _BLOCK
            end = samples * stride
            if end + 2 * _BLOCK > size or mm[end:end + 2 * _BLOCK].any():
                return None
            headers = mm[:end].reshape(samples, stride)[:, :_BLOCK]
            digits = headers[:, :KEY_DIGITS].astype(np.int64) - ord("0")
            if ((digits < 0) | (digits > 9)).any():
                return None
            ids = digits @ (10 ** np.arange(KEY_DIGITS - 1, -1, -1, dtype=np.int64))
            suffix = np.frombuffer(MEMBER_SUFFIX.encode(), dtype=np.uint8)
            name_end = KEY_DIGITS + len(suffix)
            chk = headers[:, 148:154].astype(np.int64) - ord("0")
            ok = (np.array_equal(ids, np.arange(first_id, first_id + samples))
                  and (headers[:, KEY_DIGITS:name_end] == suffix).all()
                  and not headers[:, name_end:100].any()
                  and (headers[:, 124:136] == headers[0, 124:136]).all()      # size field
                  and np.isin(headers[:, 156], (0, ord("0"))).all()            # regular file
                  and (headers[:, 257:262] == np.frombuffer(b"ustar", np.uint8)).all()
                  and not headers[:, 345:500].any()                            # no name prefix
                  and ((chk >= 0) & (chk <= 7)).all()
                  and np.array_equal(chk @ (8 ** np.arange(5, -1, -1, dtype=np.int64)),
                                     headers.sum(axis=1, dtype=np.int64)
                                     - headers[:, 148:156].sum(axis=1, dtype=np.int64) + 8 * 32))
            if not ok:
                return None
            with open(path, "rb") as f:
                member = tarfile.TarInfo(sample_key(first_id) + MEMBER_SUFFIX)
                member.size, member.offset_data = member_size, _BLOCK
                data_start = self._check_first_member(path, f, member)
        finally:
            del mm
        return np.arange(samples, dtype=np.int64) * stride + _BLOCK + data_start

    def _check_first_member(self, path: Path, f, member: tarfile.TarInfo) -> int:
        """Offset of the array data inside a member (after the .npy header), checking the header."""
        f.seek(member.offset_data)
        raw = f.read(min(member.size, 4096))
        f.seek(0)  # the tar reader positions itself before each header read
        try:
            header_len, dtype, shape = _npy_header(raw)
        except (ValueError, SyntaxError, KeyError, TypeError) as err:
            raise DataError(f"shard {path}: member {member.name} is not a .npy array ({err})") from None
        if dtype != self.dtype or shape != (self.seq_len + 1,):
            raise DataError(f"shard {path}: member {member.name} holds {dtype}{list(shape)}, "
                            f"{self._manifest_path.name} says {self.dtype}[{self.seq_len + 1}]")
        if member.size != header_len + self._sample_bytes:
            raise DataError(f"shard {path}: member {member.name} has {member.size} bytes, expected "
                            f"{header_len + self._sample_bytes}")
        return header_len

    def _verify_shard(self, path: Path, shard: dict) -> None:
        if "sha256" in shard and file_sha256(path) != shard["sha256"]:
            raise DataError(f"shard {path} fails its sha256 check ({self._manifest_path.name}): its bytes "
                            "changed after prepare wrote it (disk or copy damage); re-run prepare")

    def verify(self) -> None:
        """Check every shard of this split against the sha256 recorded in the manifest."""
        for i, (path, shard) in enumerate(zip(self._files, self._shards)):
            self._verify_shard(path, shard)
            self._verified.add(i)

    # -- reading -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    @property
    def num_tokens(self) -> int:
        return self._len * (self.seq_len + 1)

    @property
    def tokenizer_path(self) -> Path:
        return self.data_dir / self.manifest.get("tokenizer", "tokenizer.json")

    def source_of(self, sample_ids) -> torch.Tensor:
        """Source index of each sample id: one source, all 0 (see MixedDataset)."""
        return torch.zeros(len(sample_ids), dtype=torch.int64)

    def _fd(self, shard: int) -> int:
        """An open descriptor for a shard (at most MAX_OPEN_SHARDS kept open), its checksum
        verified on first use; call under _lock."""
        if shard not in self._verified:
            self._verify_shard(self._files[shard], self._shards[shard])
            self._verified.add(shard)
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[shard] = os.open(self._files[shard], os.O_RDONLY)
        else:
            self._fds.move_to_end(shard)
        return fd

    def locate(self, index: int) -> tuple[Path, int]:
        """(shard file, byte offset of the sample's token data)."""
        index = self._check_index(index)
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return self._files[shard], int(self._offsets[shard][index - self._starts[shard]])

    def _check_index(self, index) -> int:
        i = int(index)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"sample {index} outside 0..{self._len - 1} of {self.data_dir} ({self.split})")
        return i

    def __getitem__(self, index: int) -> np.ndarray:
        index = self._check_index(index)
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        offset = int(self._offsets[shard][index - self._starts[shard]])
        with self._lock:
            raw = os.pread(self._fd(shard), self._sample_bytes, offset)
        if len(raw) != self._sample_bytes:
            raise DataError(f"shard {self._files[shard]}: sample {index} is cut short (file truncated "
                            "after it was opened)")
        sample = np.frombuffer(raw, dtype=self.dtype).astype(np.int64)
        self._check_vocab(sample, [index])
        return sample

    def get_many(self, indices) -> np.ndarray:
        """Samples `indices` stacked: int64 [len(indices), seq_len + 1]."""
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int64)
        for row, index in enumerate(indices):
            out[row] = self[index]
        return out

    def _check_vocab(self, rows: np.ndarray, indices) -> None:
        if rows.size and int(rows.max()) >= self.vocab_size:
            bad = int(np.flatnonzero((rows.reshape(len(indices), -1) >= self.vocab_size).any(axis=1))[0])
            path, _ = self.locate(indices[bad])
            raise DataError(f"shard {path}: sample {int(indices[bad])} holds token id {int(rows.max())} >= the "
                            f"vocab_size {self.vocab_size} of {self._manifest_path}: the manifest understates "
                            "the vocabulary or the shard is damaged; re-run prepare")

    def close(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
        if hasattr(self, "_fds"):
            self._fds.clear()

    def __enter__(self) -> PackedDataset:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __getstate__(self):  # descriptors and locks do not travel to worker processes
        state = self.__dict__.copy()
        state["_fds"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"PackedDataset({str(self.data_dir)!r}, split={self.split!r}: {self._len} samples of "
                f"{self.seq_len}+1 tokens, {len(self._files)} shards, vocab {self.vocab_size})")
