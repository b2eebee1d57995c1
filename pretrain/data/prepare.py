"""Tokenize text into webdataset shards of packed fixed-length sequences, with a held-out split.

    python -m pretrain.data.prepare                                   # stdlib sources -> data/stdlib
    python -m pretrain.data.prepare --out data/demo --max-bytes 8000000 --vocab-size 4096 --seq-len 128
    python -m pretrain.data.prepare --out data/mine --inputs docs/ corpus.jsonl --glob '*.md'
    python -m pretrain.data.prepare --out data/llama --inputs corpus.jsonl --tokenizer tokenizer.json

Inputs are text files, directories (searched recursively for files matching --glob) and JSONL
files (*.jsonl, one document per line, text in --jsonl-field). With no inputs the corpus is the
running interpreter's standard-library .py sources (sorted; test packages only with
--include-tests). Without --tokenizer a byte-level BPE with an <|endoftext|> token is trained on
the training documents. Each document is encoded and followed by the end-of-text token;
documents go to train or val by a hash of their name (path relative to the input), and each
split's token stream is cut into samples of seq_len + 1 tokens (no padding, remainder dropped).

Writes to --out: train-NNNNNN.tar and val-NNNNNN.tar (members <sample id>.tokens.npy),
tokenizer.json, and manifest.json (read by pretrain.data.dataset.PackedDataset).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.data.corpus import Document, expand_inputs, read_documents, stdlib_files, stdlib_root
from pretrain.data.shards import FORMAT_VERSION, KEY_DIGITS, MEMBER_SUFFIX, ShardWriter, file_sha256, token_dtype
from pretrain.data.tokenizer import TRAINED_EOS, eos_token_id, load_tokenizer, train_bpe, vocab_size_of

DEFAULT_OUT = "data/stdlib"  # the default data.dir of the training config


def split_hash(name: str) -> float:
    """A deterministic number in [0, 1) for a document name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2 ** 64


def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Documents whose name hashes below `val_fraction` go to val (order kept); at least one does
    when there are two or more documents and val_fraction > 0 (the one with the smallest hash)."""
    hashes = [split_hash(d.name) for d in docs]
    is_val = [h < val_fraction for h in hashes]
    if not any(is_val) and len(docs) >= 2 and val_fraction > 0:
        is_val[int(np.argmin(hashes))] = True
    return ([d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v])


def pack(docs: Sequence[Document], tokenizer, eos_id: int, seq_len: int, writer: ShardWriter,
         add_special_tokens: bool = True, batch_docs: int = 256) -> dict:
    """Encode documents (each followed by EOS) into one stream and write its consecutive
    seq_len+1 windows; the remainder shorter than a window is dropped."""
    window = seq_len + 1
    buffer = np.empty(0, dtype=np.int64)
    encoded_tokens = 0
    try:
        for i in range(0, len(docs), batch_docs):
            encodings = tokenizer.encode_batch([d.text for d in docs[i:i + batch_docs]],
                                               add_special_tokens=add_special_tokens)
            parts = [buffer]
            for enc in encodings:
                ids = enc.ids
                if not ids or ids[-1] != eos_id:  # a post-processor may have appended it already
                    ids = ids + [eos_id]
                parts.append(np.asarray(ids, dtype=np.int64))
            buffer = np.concatenate(parts)
            encoded_tokens += len(buffer) - len(parts[0])
            n = len(buffer) // window
            for j in range(n):
                writer.add(buffer[j * window:(j + 1) * window])
            buffer = buffer[n * window:]
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    return {"samples": writer.next_id, "tokens": writer.next_id * window,
            "encoded_tokens": encoded_tokens, "dropped_tokens": len(buffer)}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _remove_previous_output(out: Path) -> None:
    """Never mix the shards of two preparations: the manifest goes first, so an interrupted run
    leaves a directory that PackedDataset refuses."""
    (out / "manifest.json").unlink(missing_ok=True)
    for pattern in ("train-*.tar", "val-*.tar", "*.tar.tmp", "*.json.tmp"):
        for stale in out.glob(pattern):
            stale.unlink()


def describe_source(inputs: Sequence[str] | None, pattern: str, include_tests: bool,
                    max_files: int | None, max_bytes: int | None) -> str:
    if inputs:
        source = ", ".join(inputs)
        if pattern != "*" and any(Path(i).is_dir() for i in inputs):
            source += f" (files matching {pattern!r})"
    else:
        version = sysconfig.get_python_version()
        source = (f"python {version} standard library sources ({stdlib_root()}, "
                  f"{'with' if include_tests else 'without'} tests)")
    limits = [f"first {max_files} files"] if max_files else []
    limits += [f"first {max_bytes:,} bytes"] if max_bytes else []
    return source + (f" [{', '.join(limits)}]" if limits else "")


def prepare_dataset(out: str | Path = DEFAULT_OUT, *, inputs: Sequence[str] | None = None, pattern: str = "*",
                    jsonl_field: str = "text", tokenizer_path: str | Path | None = None,
                    vocab_size: int = 8192, seq_len: int = 256, val_fraction: float = 0.01,
                    samples_per_shard: int = 4096, max_files: int | None = None,
                    max_bytes: int | None = None, include_tests: bool = False,
                    eos_token: str | None = None, add_special_tokens: bool = True) -> dict:
    """Write shards, tokenizer.json and manifest.json into `out`; returns the manifest.

    inputs: text files, directories (files matching `pattern`, recursively) and .jsonl files;
    None or empty: the standard-library .py sources. `tokenizer_path`: a tokenizer.json to use
    (copied to `out`), else a byte-level BPE of `vocab_size` is trained on the training split.
    `eos_token` overrides the end-of-text token looked up in a given tokenizer;
    `add_special_tokens` lets a given tokenizer's post-processor add e.g. a BOS token.
    """
    out = Path(out)
    if seq_len < 1:
        raise ValueError(f"--seq-len={seq_len} must be >= 1")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction={val_fraction} must be in [0, 1)")
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard={samples_per_shard} must be >= 1")
    for flag, value in (("--max-files", max_files), ("--max-bytes", max_bytes)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value} must be >= 1")
    tokenizer = None
    if tokenizer_path is not None:  # fail on a bad tokenizer before reading the corpus
        tokenizer = load_tokenizer(tokenizer_path)
        eos_id = eos_token_id(tokenizer, tokenizer_path, eos_token)

    files = expand_inputs(list(inputs), pattern) if inputs else stdlib_files(include_tests)
    source = describe_source(inputs, pattern, include_tests, max_files, max_bytes)
    if max_files:
        files = files[:max_files]
    docs = [d for d in read_documents(files, jsonl_field, max_bytes) if d.text.strip()]
    if not docs:
        raise ValueError(f"no documents (non-empty text) found in {source}")
    train_docs, val_docs = split_documents(docs, val_fraction)

    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_output(out)
    if tokenizer is None:
        tokenizer = train_bpe((d.text for d in train_docs), vocab_size)
        eos_id = tokenizer.token_to_id(TRAINED_EOS)
        tokenizer_json = tokenizer.to_str(pretty=True).encode()
        tokenizer_source = f"byte-level BPE trained on the train split (vocab_size={vocab_size})"
    else:
        tokenizer_json = Path(tokenizer_path).read_bytes()
        tokenizer_source = str(tokenizer_path)
    _atomic_write(out / "tokenizer.json", tokenizer_json)
    vocab = vocab_size_of(tokenizer)
    dtype = token_dtype(vocab)

    splits = {}
    try:
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            writer = ShardWriter(out, split, samples_per_shard, dtype, seq_len + 1)
            stats = pack(split_docs, tokenizer, eos_id, seq_len, writer, add_special_tokens)
            splits[split] = {"shards": writer.shards, "samples": stats["samples"], "tokens": stats["tokens"],
                             "documents": len(split_docs), "encoded_tokens": stats["encoded_tokens"],
                             "dropped_tokens": stats["dropped_tokens"]}
        if splits["train"]["samples"] == 0:
            raise ValueError(f"the training split has {splits['train']['encoded_tokens']} tokens, fewer than "
                             f"seq_len+1={seq_len + 1}; add text or lower --seq-len")
    except BaseException:
        _remove_previous_output(out)  # no half-written dataset
        raise
    if val_fraction > 0 and splits["val"]["samples"] == 0:
        warnings.warn(f"the validation split of {out} has no samples ({len(val_docs)} documents, "
                      f"{splits['val']['encoded_tokens']} tokens < seq_len+1={seq_len + 1}); "
                      "raise --val-fraction or lower --seq-len", stacklevel=2)
    manifest = {
        "format": FORMAT_VERSION,
        "seq_len": seq_len,
        "sample_len": seq_len + 1,
        "vocab_size": vocab,
        "eos_id": eos_id,
        "eos_token": tokenizer.id_to_token(eos_id),
        "dtype": dtype.name,
        "member_suffix": MEMBER_SUFFIX,
        "key_digits": KEY_DIGITS,
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": file_sha256(out / "tokenizer.json"),
        "tokenizer_source": tokenizer_source,
        "source": source,
        "settings": {"inputs": list(inputs) if inputs else None, "pattern": pattern, "jsonl_field": jsonl_field,
                     "val_fraction": val_fraction, "samples_per_shard": samples_per_shard,
                     "max_files": max_files, "max_bytes": max_bytes, "include_tests": include_tests,
                     "add_special_tokens": add_special_tokens},
        "splits": splits,
    }
    _atomic_write(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def summary(out: str | Path, manifest: dict) -> str:
    lines = [f"prepared {out} from {manifest['source']}",
             f"  tokenizer: {manifest['tokenizer_source']}; vocab {manifest['vocab_size']}, "
             f"eos {manifest['eos_token']!r} = {manifest['eos_id']}, stored as {manifest['dtype']}"]
    for split in ("train", "val"):
        s = manifest["splits"][split]
        lines.append(f"  {split + ':':6} {s['documents']:,} documents -> {s['samples']:,} samples of "
                     f"{manifest['seq_len']}+1 tokens ({s['tokens']:,} tokens, {s['dropped_tokens']:,} "
                     f"dropped) in {len(s['shards'])} shard(s)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain.data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("positional_inputs", nargs="*", metavar="INPUT",
                    help="text files, directories or .jsonl files (same as --inputs)")
    ap.add_argument("--inputs", nargs="+", default=[], metavar="INPUT",
                    help="text files, directories or .jsonl files (default: the stdlib .py sources)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument("--glob", "--pattern", dest="pattern", default="*",
                    help="which files to take inside input directories, e.g. '*.md' (default: all files; "
                         "binary files are skipped)")
    ap.add_argument("--jsonl-field", default="text", help="the text field of JSONL records (default: text)")
    ap.add_argument("--tokenizer", metavar="TOKENIZER_JSON",
                    help="use this Hugging Face tokenizer.json (copied to OUT) instead of training a BPE")
    ap.add_argument("--eos-token", help="the end-of-text token of --tokenizer (default: its "
                    "tokenizer_config.json eos_token, else the first of </s>, <|end_of_text|>, "
                    "<|endoftext|>, <|eot_id|>)")
    ap.add_argument("--no-special-tokens", dest="add_special_tokens", action="store_false",
                    help="do not let --tokenizer's post-processor add special tokens (e.g. BOS)")
    ap.add_argument("--vocab-size", type=int, default=8192,
                    help="vocabulary of the trained BPE, <|endoftext|> included (default: 8192)")
    ap.add_argument("--seq-len", type=int, default=256,
                    help="tokens per training sequence; samples hold seq_len+1 (default: 256)")
    ap.add_argument("--val-fraction", type=float, default=0.01,
                    help="fraction of documents held out for validation (default: 0.01; at least one "
                         "document when there are two or more)")
    ap.add_argument("--samples-per-shard", type=int, default=4096, help="default: 4096")
    ap.add_argument("--max-files", type=int, help="use only the first N input files (sorted)")
    ap.add_argument("--max-bytes", type=int, help="stop reading after about N bytes of text")
    ap.add_argument("--include-tests", action="store_true",
                    help="default corpus: include the stdlib's test packages")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    inputs = list(args.positional_inputs) + list(args.inputs)
    try:
        manifest = prepare_dataset(
            args.out, inputs=inputs or None, pattern=args.pattern, jsonl_field=args.jsonl_field,
            tokenizer_path=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
            val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
            max_files=args.max_files, max_bytes=args.max_bytes, include_tests=args.include_tests,
            eos_token=args.eos_token, add_special_tokens=args.add_special_tokens)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary(args.out, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
