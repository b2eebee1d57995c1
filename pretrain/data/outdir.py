"""The output directory of prepare: never lose what a user has there.

- A non-empty --out is used only when it holds a dataset prepare wrote (manifest.json with a
  format, shards, tokenizer files, parts/ and prepare's own temporary directories), unless the
  user passes --overwrite.
- An input at or under --out is refused: replacing the output must never delete the input.
- A new dataset is built in a staging directory inside --out; a failure removes only that, so
  the dataset already there stays as it was. On success the old dataset's files are replaced
  (manifest.json removed first and written last, so a reader never pairs old and new shards).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

STAGING_PREFIX = ".prepare-staging-"
PARTS_DIR = "parts"
DATASET_FILES = ("manifest.json", "tokenizer.json", "tokenizer_config.json", "train-*.tar", "val-*.tar",
                 "*.tmp", PARTS_DIR, STAGING_PREFIX + "*")


class OutputError(ValueError):
    """--out cannot be used as it is."""


def _is_dataset_entry(name: str) -> bool:
    return any(fnmatch(name, pattern) for pattern in DATASET_FILES)


def _is_ours(out: Path) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        manifest = None
    entries = [p.name for p in out.iterdir()]
    if not isinstance(manifest, dict) or "format" not in manifest:  # no dataset: parts, staging, a tokenizer
        return all(n in (PARTS_DIR, "tokenizer.json", "tokenizer_config.json") or n.startswith(STAGING_PREFIX)
                   for n in entries)
    return all(_is_dataset_entry(n) for n in entries)


def check_output(out: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    """Refuse an --out that is a file, contains an input, or holds something prepare did not write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a directory")
    resolved = out.resolve()
    for item in inputs:
        item = Path(item).resolve()
        if item == resolved or resolved in item.parents:
            raise OutputError(f"input {item} lies inside --out {out}: writing the dataset there could delete "
                              "it; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not _is_ours(out):
        found = sorted(p.name for p in out.iterdir() if not _is_dataset_entry(p.name))[:5]
        raise OutputError(f"--out {out} is not empty and is not a dataset written by prepare (it holds "
                          f"{', '.join(found) or 'other files'}); choose another --out or pass --overwrite")


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh directory inside `out` for the new dataset; removed (with whatever is in it) when
    the block raises, so a failed run leaves `out` as it found it."""
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}"
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    shutil.rmtree(stage, ignore_errors=True)  # empty after commit(); anything left was scratch


def commit(stage: Path, out: Path, keep_other: bool = True) -> None:
    """Replace the dataset in `out` by the one in `stage` (which must hold manifest.json).
    With keep_other=False (--overwrite) everything else in `out` goes too, except parts/ and
    staging directories."""
    (out / "manifest.json").unlink(missing_ok=True)
    for entry in out.iterdir():
        if entry.name == PARTS_DIR or entry.name.startswith(STAGING_PREFIX):
            continue
        if _is_dataset_entry(entry.name) or not keep_other:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    for entry in sorted(stage.iterdir(), key=lambda p: p.name == "manifest.json"):  # manifest last
        os.replace(entry, out / entry.name)
