"""Tokenize text into webdataset shards of packed fixed-length sequences, with a held-out split.

    python -m pretrain.data.prepare --out data/stdlib                       # the stdlib sources
    python -m pretrain.data.prepare --out data/mine --inputs docs/ a.jsonl --tokenizer tokenizer.json

Without --tokenizer a byte-level BPE is trained on the training documents and saved as
<out>/tokenizer.json. Each document ends with the end-of-text token; documents are split into
train/val by a hash of their name, then packed into samples of seq_len + 1 tokens (remainder
dropped). Writes <out>/manifest.json describing the shards.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from pretrain.data.corpus import Document, expand_inputs, read_documents, stdlib_files
from pretrain.data.shards import ShardWriter
from pretrain.data.tokenizer import eos_token_id, load_tokenizer, train_bpe

FORMAT_VERSION = 1


def is_validation(doc: Document, val_fraction: float) -> bool:
    digest = hashlib.sha256(doc.name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    val = [d for d in docs if is_validation(d, val_fraction)]
    if not val and len(docs) >= 2 and val_fraction > 0:  # at least one held-out document
        val = [min(docs, key=lambda d: hashlib.sha256(d.name.encode()).digest())]
    val_names = {d.name for d in val}
    return [d for d in docs if d.name not in val_names], val


def pack(docs: list[Document], tokenizer, eos_id: int, seq_len: int, writer: ShardWriter,
         batch_docs: int = 256) -> int:
    """Encode documents (each followed by EOS) and write consecutive seq_len+1 windows."""
    buffer = np.empty(0, dtype=np.int64)
    tokens = 0
    for i in range(0, len(docs), batch_docs):
        encoded = tokenizer.encode_batch([d.text for d in docs[i:i + batch_docs]])
        parts = [buffer] + [np.asarray(e.ids + [eos_id], dtype=np.int64) for e in encoded]
        buffer = np.concatenate(parts)
        n = len(buffer) // (seq_len + 1)
        for j in range(n):
            writer.add(buffer[j * (seq_len + 1):(j + 1) * (seq_len + 1)])
        tokens += n * (seq_len + 1)
        buffer = buffer[n * (seq_len + 1):]
    writer.finish()
    return tokens


def prepare_dataset(out: str | Path, *, inputs: list[str] | None = None, pattern: str = "*",
                    jsonl_field: str = "text", tokenizer_path: str | None = None, vocab_size: int = 8192,
                    seq_len: int = 256, val_fraction: float = 0.01, samples_per_shard: int = 4096,
                    max_files: int | None = None, max_bytes: int | None = None,
                    include_tests: bool = False) -> dict:
    """Write shards, tokenizer.json and manifest.json into `out`; returns the manifest."""
    out = Path(out)
    if seq_len < 1:
        raise ValueError(f"--seq-len={seq_len} must be >= 1")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction={val_fraction} must be in [0, 1)")
    files = expand_inputs(inputs, pattern) if inputs else stdlib_files(include_tests)
    source = ", ".join(inputs) if inputs else "python standard library sources"
    if max_files:
        files = files[:max_files]
    docs = [d for d in read_documents(files, jsonl_field, max_bytes) if d.text.strip()]
    if not docs:
        raise ValueError(f"no documents found in {source}")
    train_docs, val_docs = split_documents(docs, val_fraction)

    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*-*.tar")) + [out / "manifest.json"]:
        stale.unlink(missing_ok=True)  # never mix shards of two preparations
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
        if Path(tokenizer_path).resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(tokenizer_path, out / "tokenizer.json")
    else:
        tokenizer = train_bpe((d.text for d in train_docs), vocab_size)
        tokenizer.save(str(out / "tokenizer.json"))
    eos_id = eos_token_id(tokenizer, tokenizer_path or "trained tokenizer")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)

    splits = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        writer = ShardWriter(out, split, samples_per_shard, dtype)
        tokens = pack(split_docs, tokenizer, eos_id, seq_len, writer)
        splits[split] = {"shards": writer.shards, "samples": writer.next_id, "tokens": tokens,
                         "documents": len(split_docs)}
    if splits["train"]["samples"] == 0:
        raise ValueError(f"the training split has fewer than seq_len+1={seq_len + 1} tokens; "
                         "add text or lower --seq-len")
    manifest = {"format": FORMAT_VERSION, "seq_len": seq_len, "vocab_size": vocab, "eos_id": eos_id,
                "dtype": dtype.name, "tokenizer": "tokenizer.json", "source": source, "splits": splits}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--inputs", nargs="*", help="text files, directories or .jsonl files (default: stdlib)")
    ap.add_argument("--pattern", default="*", help="file glob inside input directories (e.g. '*.md')")
    ap.add_argument("--jsonl-field", default="text")
    ap.add_argument("--tokenizer", help="an existing tokenizer.json (else a BPE is trained)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--samples-per-shard", type=int, default=4096)
    ap.add_argument("--max-files", type=int)
    ap.add_argument("--max-bytes", type=int)
    ap.add_argument("--include-tests", action="store_true", help="stdlib: include test packages")
    args = ap.parse_args(argv)
    try:
        manifest = prepare_dataset(
            args.out, inputs=args.inputs, pattern=args.pattern, jsonl_field=args.jsonl_field,
            tokenizer_path=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
            val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
            max_files=args.max_files, max_bytes=args.max_bytes, include_tests=args.include_tests)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    s = manifest["splits"]
    print(f"{args.out}: {manifest['source']}; vocab {manifest['vocab_size']}, seq_len {manifest['seq_len']}; "
          f"train {s['train']['samples']} samples ({s['train']['tokens']:,} tokens, {len(s['train']['shards'])} shards), "
          f"val {s['val']['samples']} samples ({s['val']['tokens']:,} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
