"""Per-file checksums of a checkpoint directory (checksums.json: {file: {"size", "sha256"}}),
written last before the directory is renamed into place and checked before loading, so flipped
bytes, truncated or replaced files are caught and resume falls back to an older checkpoint.
A checkpoint without checksums.json cannot be verified and is not trusted (integrity.py) until
a user vouches for it (`python -m pretrain.checkpoint trust PATH` writes the file)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pretrain.checkpoint.layout import DAMAGED
from pretrain.files import write_atomic

CHECKSUMS = "checksums.json"
_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):  # hashlib releases the GIL on large buffers
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: Path) -> None:
    """Checksum every regular file in `directory` (recursively) except checksums.json itself and
    a damage mark."""
    directory = Path(directory)
    entries = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (CHECKSUMS, DAMAGED)):
        entries[f.relative_to(directory).as_posix()] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    write_atomic(directory / CHECKSUMS, json.dumps(entries, indent=1))


def checksum_problem(directory: Path) -> str | None:
    """Why the directory does not match its checksums.json (None: it matches). Without a
    checksums.json nothing can be verified: that is a problem too."""
    directory = Path(directory)
    listing = directory / CHECKSUMS
    if not listing.is_file():
        return (f"{CHECKSUMS} is missing, so its files cannot be verified (if you know this checkpoint "
                f"is sound: python -m pretrain.checkpoint trust {directory})")
    try:
        entries = json.loads(listing.read_text())
        if not isinstance(entries, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as err:
        return f"{CHECKSUMS} unreadable ({err})"
    for name, want in entries.items():
        f = directory / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want.get("size"):
            return f"{name} has {size} bytes, expected {want.get('size')} (truncated or replaced)"
        if file_sha256(f) != want.get("sha256"):
            return f"{name} does not match its sha256 checksum (corrupted)"
    return None
