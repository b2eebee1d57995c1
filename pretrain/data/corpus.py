"""Where documents come from: text files, directories, JSON lines (.jsonl, .jsonl.gz, .jsonl.zst),
Parquet, or by default the running interpreter's own standard-library sources (real text on every
machine, no download).

Every document has a `name` that is independent of where the corpus lies on disk (a path
relative to the directory it was found in, `file.jsonl:LINE` for a JSON line, `file.parquet:ROW`
for a Parquet row, both counted from 1); the train/validation split hashes it, so the split is the
same on every machine. Documents are read one at a time (Parquet in row batches): memory does not
grow with the corpus.

Bad input (a file that cannot be read, a line that is not JSON or lacks the text field, text that
is not UTF-8) raises BadInputError naming the file and line, or, with the `skip` policy, is left
out and counted in BadRecords; never silently replaced.
"""
from __future__ import annotations

import gzip
import io
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz", ".jsonl.zst", ".ndjson.zst")
PARQUET_SUFFIXES = (".parquet",)
TEST_DIRS = ("test", "tests", "idle_test")
BAD_RECORD_POLICIES = ("error", "skip")
_BINARY_SNIFF = 8192
_PARQUET_BATCH_ROWS = 1024


class BadInputError(ValueError):
    """An input that cannot be used as it is; the message starts with `file[:line]:`."""


@dataclass(frozen=True)
class Document:
    name: str    # stable identity (relative path, or path:line for records) used for the train/val split
    text: str


@dataclass(frozen=True)
class SourceFile:
    path: Path   # where to read it
    name: str    # its stable name (relative to the input directory, or the file name)


@dataclass
class BadRecords:
    """What to do with bad input: `error` raises at the first one, `skip` counts it (per reason,
    with the first few places) and goes on."""
    policy: str = "error"
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.policy not in BAD_RECORD_POLICIES:
            raise ValueError(f"--on-bad-record={self.policy!r}: choose one of {', '.join(BAD_RECORD_POLICIES)}")

    def report(self, where: str, reason: str, detail: str, hint: str | None = None) -> None:
        """`hint` replaces the advice to skip (e.g. when the whole input would be skipped)."""
        if self.policy == "error":
            advice = hint or "--on-bad-record skip leaves such records out, counted"
            raise BadInputError(f"{where}: {detail} ({advice})")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        return {"policy": self.policy, "skipped": dict(sorted(self.counts.items())), "examples": self.examples}


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


def _is_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def stdlib_files(include_tests: bool = False) -> list[SourceFile]:
    """The interpreter's standard-library `.py` files, sorted; never site-packages, nor the
    generated codec tables, and test packages only with `include_tests` (without their few
    deliberately non-UTF-8 fixtures)."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist; pass --inputs")
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        in_tests = any(p in TEST_DIRS for p in rel[:-1])
        if in_tests and (not include_tests or not _is_utf8(path)):  # a few test fixtures are latin-1 / koi8-r on purpose
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


def file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _open_lines(path: Path) -> io.BufferedIOBase:
    """A binary stream of the decompressed file (.gz, .zst, or plain)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise BadInputError(f"{path}: reading .zst needs the zstandard package "
                                "(pip install zstandard)") from None
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def text_field_hint(field_name: str, record) -> str:
    """The advice for a missing text field when no record so far had it: --text-field (with the
    closest name, or the only string field), not --on-bad-record skip, which would drop every record."""
    import difflib

    keys = [k for k in record if isinstance(k, str)] if isinstance(record, dict) else []
    strings = [k for k in keys if isinstance(record.get(k), str)]
    close = difflib.get_close_matches(field_name, keys, n=1, cutoff=0.5) or (strings if len(strings) == 1 else [])
    return (f"--text-field names the field holding the text; did you mean --text-field {close[0]}?" if close
            else "--text-field names the field holding the text")


def _json_records(source: SourceFile, field_name: str, bad: BadRecords) -> Iterator[Document]:
    path = source.path
    lineno, seen_field = 0, False  # no record had the field yet: skipping would likely drop them all
    try:
        with _open_lines(path) as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    bad.report(where, "not_utf8", f"not UTF-8 text ({err.reason} at byte {err.start} of the line)")
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    bad.report(where, "invalid_json", f"not a JSON object ({err.msg}, column {err.colno})")
                    continue
                if not isinstance(record, dict) or field_name not in record:
                    what = f"keys {sorted(record)[:8]}" if isinstance(record, dict) else type(record).__name__
                    bad.report(where, "missing_field", f"no field {field_name!r} (a record with {what})",
                               None if seen_field else text_field_hint(field_name, record))
                    continue
                seen_field = True
                text = record[field_name]
                if not isinstance(text, str):
                    bad.report(where, "not_a_string", f"field {field_name!r} is a {type(text).__name__}, "
                                                      "not a string")
                    continue
                yield Document(f"{source.name}:{lineno}", text)
    except (OSError, EOFError) as err:  # truncated or corrupt compressed stream, unreadable file
        bad.report(f"{path}:{lineno + 1}", "unreadable_file", f"cannot be read past here ({err})")
    except Exception as err:
        if type(err).__module__.startswith("zstandard"):
            bad.report(f"{path}:{lineno + 1}", "unreadable_file", f"cannot be read past here ({err})")
        else:
            raise


def _parquet_records(source: SourceFile, field_name: str, bad: BadRecords) -> Iterator[Document]:
    path = source.path
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise BadInputError(f"{path}: reading Parquet needs pyarrow (pip install "
                            "'layerskip-pretrain[parquet]' or pyarrow)") from None
    try:
        reader = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError
        bad.report(str(path), "unreadable_file", f"not a readable Parquet file ({err})")
        return
    columns = reader.schema_arrow.names
    if field_name not in columns:
        bad.report(str(path), "missing_field", f"no column {field_name!r} (it has {columns[:8]})",
                   text_field_hint(field_name, dict.fromkeys(columns)))
        return
    row = 0
    try:
        for batch in reader.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field_name]):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    bad.report(f"{path}:{row}", "not_a_string",
                               f"column {field_name!r} is {type(text).__name__}, not a string")
                    continue
                yield Document(f"{source.name}:{row}", text)
    except Exception as err:
        if isinstance(err, BadInputError):
            raise
        bad.report(f"{path}:{row + 1}", "unreadable_file", f"cannot be read past row {row} ({err})")


def _text_file(source: SourceFile, bad: BadRecords) -> Iterator[Document]:
    path = source.path
    try:
        raw = path.read_bytes()
    except OSError as err:
        bad.report(str(path), "unreadable_file", f"cannot be read ({err.strerror})")
        return
    if b"\0" in raw[:_BINARY_SNIFF]:
        bad.counts["binary_file"] = bad.counts.get("binary_file", 0) + 1  # directories hold such files
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        bad.report(f"{path}:{line}", "not_utf8", f"not UTF-8 text ({err.reason} at byte {err.start})")
        return
    yield Document(source.name, text)


def read_documents(files: list[SourceFile], text_field: str = "text", max_bytes: int | None = None,
                   bad: BadRecords | None = None) -> Iterator[Document]:
    """Documents in file order, one at a time; JSON-lines and Parquet files give one document per
    record (its `text_field`). Binary text files (a NUL byte near the start) are skipped and
    counted. Stops once `max_bytes` of UTF-8 text has been produced (the document crossing the
    limit is included)."""
    bad = bad if bad is not None else BadRecords()
    total = 0
    for source in files:
        kind = file_kind(source.path)
        if kind == "jsonl":
            docs = _json_records(source, text_field, bad)
        elif kind == "parquet":
            docs = _parquet_records(source, text_field, bad)
        else:
            docs = _text_file(source, bad)
        for doc in docs:
            yield doc
            if max_bytes:
                total += len(doc.text.encode())
                if total >= max_bytes:
                    return
