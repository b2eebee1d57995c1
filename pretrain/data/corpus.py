"""Where documents come from: text files, directories, JSONL, or by default the running
interpreter's own standard-library sources (real text on every machine, no download).

Every document has a `name` that is independent of where the corpus lies on disk (a path
relative to the directory it was found in, `file.jsonl:LINE` for JSONL records); the
train/validation split hashes it, so the split is the same on every machine.
"""
from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEST_DIRS = ("test", "tests", "idle_test")
_BINARY_SNIFF = 8192


@dataclass(frozen=True)
class Document:
    name: str    # stable identity (relative path, or path:line for JSONL) used for the train/val split
    text: str


@dataclass(frozen=True)
class SourceFile:
    path: Path   # where to read it
    name: str    # its stable name (relative to the input directory, or the file name)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_generated_codec_table(path: Path) -> bool:
    """The ~65 `encodings/` modules written by gencodec.py: 256-entry character tables that are
    near-copies of each other. A hash split puts a few in validation, where a model that saw the
    others in training predicts them almost perfectly: held-out loss and exit agreement would
    look far better than on real code."""
    if path.parent.name != "encodings":
        return False
    with open(path, "rb") as f:
        return b"generated from" in f.read(200)


def stdlib_files(include_tests: bool = False) -> list[SourceFile]:
    """The interpreter's standard-library `.py` files, sorted; never site-packages, nor the
    generated codec tables, and test packages only with `include_tests`."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist; pass --inputs")
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        if not include_tests and any(p in TEST_DIRS for p in rel[:-1]):
            continue
        if path.is_file() and not is_generated_codec_table(path):
            files.append(SourceFile(path, "stdlib/" + "/".join(rel)))
    return files


def expand_inputs(inputs: list[str], pattern: str = "*") -> list[SourceFile]:
    """Files named directly (in the given order), plus the files matching `pattern` anywhere
    under named directories (sorted by relative path)."""
    files: list[SourceFile] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob(pattern) if p.is_file())
            files.extend(SourceFile(p, f"{path.name or path.resolve().name}/{rel}") for rel, p in found)
        elif path.is_file():
            files.append(SourceFile(path, path.name))
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return files


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_SNIFF)


def read_documents(files: list[SourceFile], jsonl_field: str = "text",
                   max_bytes: int | None = None) -> Iterator[Document]:
    """Documents in file order; .jsonl files give one document per non-empty line (its
    `jsonl_field`). Binary files (a NUL byte near the start) are skipped. Stops once `max_bytes`
    of UTF-8 text has been produced (the document crossing the limit is included)."""
    total = 0
    for source in files:
        path = source.path
        if path.suffix in JSONL_SUFFIXES:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[jsonl_field]
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"{path}:{lineno}: not a JSON object with a field "
                                         f"{jsonl_field!r} ({type(err).__name__}: {err}); "
                                         f"see --jsonl-field") from None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: field {jsonl_field!r} is a "
                                         f"{type(text).__name__}, not a string")
                    total += len(text.encode())
                    yield Document(f"{source.name}:{lineno}", text)
                    if max_bytes and total >= max_bytes:
                        return
        else:
            if _looks_binary(path):
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            total += len(text.encode())
            yield Document(source.name, text)
            if max_bytes and total >= max_bytes:
                return
