"""Tokenize text into webdataset shards of packed fixed-length sequences, with a held-out split.

    python -m pretrain.data.prepare                                   # stdlib sources -> data/stdlib
    python -m pretrain.data.prepare --out data/demo --max-bytes 8000000 --vocab-size 4096 --seq-len 128
    python -m pretrain.data.prepare --out data/mine --inputs docs/ corpus.jsonl.zst --glob '*.md'
    python -m pretrain.data.prepare --out data/web --inputs hf_dataset/ --glob '*.parquet' \\
        --text-field content --tokenizer path/to/hf_model_dir --workers 8
    # N jobs (e.g. a Slurm array), then one merge:
    python -m pretrain.data.prepare --out data/web --inputs ... --tokenizer T --num-parts 8 --part 3
    python -m pretrain.data.prepare --out data/web --merge

Inputs are text files, directories (searched recursively for files matching --glob), JSON lines
(.jsonl, .jsonl.gz, .jsonl.zst: one document per line, text in --text-field) and Parquet files
(one document per row, column --text-field). With no inputs the corpus is the running
interpreter's standard-library .py sources (sorted; test packages only with --include-tests).
--tokenizer takes a tokenizer.json, a Hugging Face model/tokenizer directory (its
tokenizer_config.json names EOS and BOS) or a prepared dataset; without it a byte-level BPE with
an <|endoftext|> token is trained on a sample of at most --tokenizer-sample-bytes of the training
documents. Each document is encoded and followed by the end-of-text token; documents go to train
or val by a hash of their name (path relative to the input, plus :LINE / :ROW for records), and
each split's token stream is cut into samples of seq_len + 1 tokens (no padding, remainder dropped).

Documents stream through in bounded batches (memory does not grow with the corpus), encoded by
--workers processes (the output is the same for any number). With --num-parts N --part I (or
$SLURM_ARRAY_TASK_ID) a job encodes only its slice of the input files into OUT/parts/; --merge then
writes the dataset, the same whatever N.

Writes to --out: train-NNNNNN.tar and val-NNNNNN.tar (members <sample id>.tokens.npy),
tokenizer.json, and manifest.json (read by pretrain.data.dataset.PackedDataset). A non-empty
--out that is not such a dataset is refused unless --overwrite; a failed run leaves --out as it was.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.data.assemble import encode_part, write_dataset
from pretrain.data.corpus import BadRecords, expand_inputs, stdlib_files, stdlib_root
from pretrain.data.outdir import PARTS_DIR, check_output, commit, staging
from pretrain.data.parts import merge_parts, prepare_part, select_part
from pretrain.data.shards import token_dtype
from pretrain.data.streams import split_hash
from pretrain.files import write_atomic
from pretrain.data.tokenizer import post_processor_bos_id, vocab_size_of
from pretrain.data.tokenizer_choice import bpe_sample, given_tokenizer, trained_tokenizer

__all__ = ["prepare_dataset", "merge_parts", "split_documents", "main"]

DEFAULT_OUT = "data/stdlib"  # the default data.dir of the training config
DEFAULT_SAMPLE_BYTES = 64 * 2 ** 20


def split_documents(docs, val_fraction: float):
    """Documents whose name hashes below `val_fraction` go to val (order kept); at least one does
    when there are two or more documents and val_fraction > 0 (the one with the smallest hash).
    The in-memory statement of the split that prepare streams (see pretrain.data.streams)."""
    hashes = [split_hash(d.name) for d in docs]
    is_val = [h < val_fraction for h in hashes]
    if not any(is_val) and len(docs) >= 2 and val_fraction > 0:
        is_val[int(np.argmin(hashes))] = True
    return ([d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v])




def prepare_dataset(out: str | Path = DEFAULT_OUT, *, inputs: Sequence[str] | None = None, pattern: str = "*",
                    text_field: str = "text", jsonl_field: str | None = None,
                    tokenizer_path: str | Path | None = None, vocab_size: int = 8192, seq_len: int = 256,
                    val_fraction: float = 0.01, samples_per_shard: int = 4096, max_files: int | None = None,
                    max_bytes: int | None = None, include_tests: bool = False, eos_token: str | None = None,
                    add_special_tokens: bool = True, workers: int = 1, num_parts: int = 1,
                    part: int | None = None, tokenizer_sample_bytes: int = DEFAULT_SAMPLE_BYTES,
                    on_bad_record: str = "error", overwrite: bool = False, tokenizer_only: bool = False) -> dict:
    """Write shards, tokenizer.json and manifest.json into `out`; returns the manifest.

    inputs: text files, directories (files matching `pattern`, recursively), JSON-lines and
    Parquet files; None or empty: the standard-library .py sources. `tokenizer_path`: a
    tokenizer.json or a directory holding one (copied to `out`), else a byte-level BPE of
    `vocab_size` is trained on at most `tokenizer_sample_bytes` of training documents.
    With `part` set, only that part's files are encoded into out/parts/ (returns the part's
    info); merge_parts() writes the dataset. With `tokenizer_only`, only the tokenizer is written.
    """
    out = Path(out)
    text_field = jsonl_field or text_field
    for flag, value, low in (("--seq-len", seq_len, 1), ("--samples-per-shard", samples_per_shard, 1),
                             ("--workers", workers, 1), ("--num-parts", num_parts, 1),
                             ("--tokenizer-sample-bytes", tokenizer_sample_bytes, 1),
                             ("--max-files", max_files or 1, 1), ("--max-bytes", max_bytes or 1, 1)):
        if value < low:
            raise ValueError(f"{flag}={value} must be >= {low}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction={val_fraction} must be in [0, 1)")
    BadRecords(on_bad_record)  # checks the policy name
    if part is not None:
        if not 0 <= part < num_parts:
            raise ValueError(f"--part={part} must be in 0..{num_parts - 1} (--num-parts={num_parts})")
        if tokenizer_path is None:
            raise ValueError("--part needs --tokenizer (every part must encode with the same one): train it "
                             "first with --tokenizer-only --out TOKDIR, then pass --tokenizer TOKDIR")
        if max_bytes:
            raise ValueError("--max-bytes cannot be split into parts; leave it out or use --max-files")
    elif num_parts > 1:
        raise ValueError(f"--num-parts={num_parts} needs --part (or $SLURM_ARRAY_TASK_ID)")
    choice = given_tokenizer(tokenizer_path, eos_token) if tokenizer_path is not None else None

    files = expand_inputs(list(inputs), pattern) if inputs else stdlib_files(include_tests)
    source = describe_source(inputs, pattern, include_tests, max_files, max_bytes)
    if max_files:
        files = files[:max_files]
    if not files:
        raise ValueError(f"no input files in {source}")
    check_output(out, [Path(i) for i in inputs] if inputs else [stdlib_root()], overwrite)
    if choice is None:
        texts = bpe_sample(files, text_field, tokenizer_sample_bytes, val_fraction, max_bytes, on_bad_record)
        if not texts:
            raise ValueError(f"no training documents (non-empty text) found in {source}")
        choice = trained_tokenizer(texts, vocab_size, tokenizer_sample_bytes)
        del texts
    if tokenizer_only:
        if (out / "manifest.json").exists() and not overwrite:
            raise ValueError(f"--out {out} holds a dataset; --tokenizer-only would replace its tokenizer.json. "
                             "Choose another --out (or pass --overwrite)")
        out.mkdir(parents=True, exist_ok=True)
        for name, data in choice.files.items():
            write_atomic(out / name, data)
        return {"tokenizer": str(out / "tokenizer.json"), "tokenizer_source": choice.source}
    vocab = vocab_size_of(choice.tokenizer)
    # the BOS each document starts with: configured (tokenizer_config.json), or added by the post-processor
    bos_id = choice.bos_id if choice.bos_id is not None or not add_special_tokens else \
        post_processor_bos_id(choice.tokenizer)
    settings = dict(
        inputs=list(inputs) if inputs else None, pattern=pattern, text_field=text_field, seq_len=seq_len,
        val_fraction=val_fraction, samples_per_shard=samples_per_shard, max_files=max_files,
        max_bytes=max_bytes, include_tests=include_tests, add_special_tokens=add_special_tokens,
        on_bad_record=on_bad_record, dtype=token_dtype(vocab).name, vocab_size=vocab, eos_id=choice.eos_id,
        bos_id=bos_id, tokenizer_sha256=hashlib.sha256(choice.files["tokenizer.json"]).hexdigest(),
        tokenizer_source=choice.source, num_parts=num_parts, source=source)

    if part is not None:
        return prepare_part(out, select_part(files, num_parts, part), choice, settings, part, workers)
    with staging(out) as stage:
        stream = stage / "stream"
        stream.mkdir()
        info = encode_part(stream, files, choice, {**settings, "part": 0}, max_bytes, workers)
        if info["documents"]["train"] + info["documents"]["val"] == 0:
            raise ValueError(f"no documents (non-empty text) found in {source}")
        manifest = write_dataset(stage, [(stream, info)], choice.files)
        shutil.rmtree(stream)
        commit(stage, out, keep_other=not overwrite)
    return manifest


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


def summary(out: str | Path, manifest: dict) -> str:
    lines = [f"prepared {out} from {manifest['source']}",
             f"  tokenizer: {manifest['tokenizer_source']}; vocab {manifest['vocab_size']}, "
             f"eos {manifest['eos_token']!r} = {manifest['eos_id']}, stored as {manifest['dtype']}"]
    for split in ("train", "val"):
        s = manifest["splits"][split]
        lines.append(f"  {split + ':':6} {s['documents']:,} documents -> {s['samples']:,} samples of "
                     f"{manifest['seq_len']}+1 tokens ({s['tokens']:,} tokens, {s['dropped_tokens']:,} "
                     f"dropped) in {len(s['shards'])} shard(s)")
    bad = manifest.get("bad_records", {}).get("skipped")
    if bad:
        lines.append("  skipped: " + ", ".join(f"{n:,} {reason.replace('_', ' ')}" for reason, n in bad.items())
                     + (" (first: " + manifest["bad_records"]["examples"][0] + ")"
                        if manifest["bad_records"]["examples"] else ""))
    return "\n".join(lines)


def part_summary(parts_dir: Path, part: int, num_parts: int, info: dict) -> str:
    """One part's line. Its validation documents are those whose name hashes below --val-fraction;
    when no part has one, --merge moves the smallest-hash training document of all parts to val (as
    a single prepare does), so a part's "0" is not the dataset's."""
    docs, tokens = info["documents"], info["tokens"]
    val = f"{docs['val']:,} validation"
    if docs["val"] == 0 and info["val_fraction"] > 0:
        val += (f" (none of its documents hashes below --val-fraction {info['val_fraction']:g}; if no part has "
                f"one, --merge holds out the smallest-hash training document of all parts)")
    return (f"prepared part {part} of {num_parts} in {parts_dir}: {info['files']} files, {docs['train']:,} training + "
            f"{val} documents, {tokens['train']:,} + {tokens['val']:,} tokens; then run --merge")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain.data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("positional_inputs", nargs="*", metavar="INPUT",
                    help="text files, directories, JSON-lines or Parquet files (same as --inputs)")
    ap.add_argument("--inputs", nargs="+", default=[], metavar="INPUT",
                    help="text files, directories, .jsonl/.jsonl.gz/.jsonl.zst or .parquet files "
                         "(default: the stdlib .py sources)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output directory (default: {DEFAULT_OUT})")
    ap.add_argument("--overwrite", action="store_true",
                    help="use a non-empty --out that does not hold a dataset written by prepare (its files are replaced)")
    ap.add_argument("--glob", "--pattern", dest="pattern", default="*",
                    help="which files to take inside input directories, e.g. '*.md' (default: all files; "
                         "binary files are skipped and counted)")
    ap.add_argument("--text-field", "--jsonl-field", dest="text_field", default="text",
                    help="the text field of JSON records / column of Parquet files (default: text)")
    ap.add_argument("--on-bad-record", choices=("error", "skip"), default="error",
                    help="a bad record (invalid JSON, missing field, not UTF-8, unreadable file): stop with "
                         "an error naming file and line (default), or skip it and count it in the manifest")
    ap.add_argument("--tokenizer", metavar="PATH",
                    help="a Hugging Face tokenizer.json, a model/tokenizer directory holding one (with "
                         "tokenizer_config.json for EOS/BOS) or a prepared dataset, instead of training a BPE")
    ap.add_argument("--eos-token", help="the end-of-text token of --tokenizer (default: its "
                    "tokenizer_config.json eos_token, else the first of </s>, <|end_of_text|>, "
                    "<|endoftext|>, <|eot_id|>)")
    ap.add_argument("--no-special-tokens", dest="add_special_tokens", action="store_false",
                    help="do not let --tokenizer's post-processor add special tokens (e.g. BOS)")
    ap.add_argument("--vocab-size", type=int, default=8192,
                    help="vocabulary of the trained BPE, <|endoftext|> included (default: 8192)")
    ap.add_argument("--tokenizer-sample-bytes", type=int, default=DEFAULT_SAMPLE_BYTES,
                    help="train the BPE on at most about this many bytes of training documents, sampled "
                         f"over the whole corpus (default: {DEFAULT_SAMPLE_BYTES:,})")
    ap.add_argument("--tokenizer-only", action="store_true",
                    help="only train (or copy) the tokenizer into --out, e.g. before --num-parts jobs")
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
    ap.add_argument("--workers", type=int, default=1,
                    help="tokenizer processes (default: 1, which still uses the tokenizer's threads); "
                         "the output is the same for any number")
    ap.add_argument("--num-parts", type=int, default=1,
                    help="split the input files into N parts prepared by N independent jobs (see --part, --merge)")
    ap.add_argument("--part", type=int,
                    help="which part this job prepares, 0..N-1 (default with --num-parts: $SLURM_ARRAY_TASK_ID)")
    ap.add_argument("--merge", action="store_true",
                    help="write the dataset of the parts in OUT/parts (the same whatever --num-parts was)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    inputs = list(args.positional_inputs) + list(args.inputs)
    part = args.part
    if part is None and args.num_parts > 1 and os.environ.get("SLURM_ARRAY_TASK_ID"):
        part = int(os.environ["SLURM_ARRAY_TASK_ID"])
    try:
        if args.merge:
            manifest = merge_parts(args.out, overwrite=args.overwrite)
        else:
            manifest = prepare_dataset(
                args.out, inputs=inputs or None, pattern=args.pattern, text_field=args.text_field,
                tokenizer_path=args.tokenizer, vocab_size=args.vocab_size, seq_len=args.seq_len,
                val_fraction=args.val_fraction, samples_per_shard=args.samples_per_shard,
                max_files=args.max_files, max_bytes=args.max_bytes, include_tests=args.include_tests,
                eos_token=args.eos_token, add_special_tokens=args.add_special_tokens, workers=args.workers,
                num_parts=args.num_parts, part=part, tokenizer_sample_bytes=args.tokenizer_sample_bytes,
                on_bad_record=args.on_bad_record, overwrite=args.overwrite, tokenizer_only=args.tokenizer_only)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.tokenizer_only:
        print(f"wrote {manifest['tokenizer']}: {manifest['tokenizer_source']}")
    elif part is not None and not args.merge:
        print(part_summary(Path(args.out) / PARTS_DIR, part, args.num_parts, manifest))
    else:
        print(summary(args.out, manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
