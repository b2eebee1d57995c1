"""Per-file checksums of a checkpoint directory (checksums.json: {file: {"size", "sha256"}}),
written last before the directory is renamed into place and checked before loading, so flipped
bytes, truncated or replaced files are caught and resume falls back to an older checkpoint."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CHECKSUMS = "checksums.json"
_CHUNK = 8 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):  # hashlib releases the GIL on large buffers
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: Path) -> None:
    """Checksum every regular file in `directory` (recursively) except checksums.json itself."""
    directory = Path(directory)
    entries = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        entries[f.relative_to(directory).as_posix()] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    tmp = directory / (CHECKSUMS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        json.dump(entries, out, indent=1)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, directory / CHECKSUMS)


def checksum_problem(directory: Path) -> str | None:
    """Why the directory does not match its checksums.json (None: it matches, or there is no
    checksums.json, as in checkpoints written before checksums existed)."""
    directory = Path(directory)
    listing = directory / CHECKSUMS
    if not listing.is_file():
        return None
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
