"""The one atomic file write of the project: a reader (or a crash) sees either the old file or the
new one, never a half-written file.

    write_atomic(path, "text" | b"bytes" | writer)   # writer(tmp_path) fills a temporary file

The content goes to a temporary sibling (`.<name>.<pid>.<random>.tmp`, same directory, so the
rename stays on one file system; unique, so concurrent writers never share one), is flushed to disk
(`durable`), and replaces `path` in one os.replace. On any failure the temporary file is removed
and the old file stays.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable, Union

Content = Union[str, bytes, Callable[[Path], object]]


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, content: Content, *, durable: bool = True) -> Path:
    """Replace `path` with `content` (str as UTF-8, bytes, or a callable writing the temporary path
    it is given, e.g. lambda p: fig.savefig(p)); creates the parent directory. `durable`: fsync
    the file before the rename (False for frequently rewritten, disposable files)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
