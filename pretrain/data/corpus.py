"""Where documents come from: text files, directories, JSONL, or by default the running
interpreter's own standard-library sources (real text on every machine, no download)."""
from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Document:
    name: str    # stable identity (path, or path:line for JSONL) used for the train/val split
    text: str


def stdlib_files(include_tests: bool = False) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        if not include_tests and any(p in ("test", "tests", "idle_test") for p in rel[:-1]):
            continue
        files.append(path)
    return files


def expand_inputs(inputs: list[str], pattern: str) -> list[Path]:
    """Files named directly, plus files matching `pattern` under named directories (sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob(pattern) if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    return files


def read_documents(files: list[Path], jsonl_field: str, max_bytes: int | None = None) -> Iterator[Document]:
    """Documents in file order; .jsonl files give one document per line (its `jsonl_field`)."""
    total = 0
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[jsonl_field]
                    except (json.JSONDecodeError, KeyError, TypeError) as err:
                        raise ValueError(f"{path}:{lineno}: no string field {jsonl_field!r} ({err})") from None
                    total += len(text.encode())
                    yield Document(f"{path}:{lineno}", text)
                    if max_bytes and total >= max_bytes:
                        return
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            total += len(text.encode())
            yield Document(str(path), text)
            if max_bytes and total >= max_bytes:
                return
