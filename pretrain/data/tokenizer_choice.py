"""The tokenizer of a preparation: a given one (tokenizer.json, Hugging Face directory, or a
prepared dataset), or a byte-level BPE trained on a bounded sample of the training documents."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from pretrain.data.corpus import BadRecords, SourceFile, read_documents
from pretrain.data.streams import split_hash
from pretrain.data.tokenizer import (TRAINED_EOS, bos_token_id, eos_token_id, load_tokenizer, tokenizer_file,
                                     train_bpe)

# Rough text bytes per stored byte, to spread the BPE sample over the whole corpus.
_EXPANSION = {"jsonl.gz": 4.0, "jsonl.zst": 5.0, "parquet": 3.0}


@dataclass
class TokenizerChoice:
    tokenizer: Tokenizer
    eos_id: int
    bos_id: int | None
    files: dict[str, bytes]   # written next to the shards: tokenizer.json (+ tokenizer_config.json)
    source: str               # how it was obtained, for the manifest


def given_tokenizer(path: str | Path, eos_token: str | None = None) -> TokenizerChoice:
    """A tokenizer.json file, or a directory holding one (with tokenizer_config.json for EOS/BOS)."""
    path = Path(path)
    json_file = tokenizer_file(path)
    tokenizer = load_tokenizer(json_file)
    eos_id = eos_token_id(tokenizer, json_file, eos_token)
    files = {"tokenizer.json": json_file.read_bytes()}
    config = json_file.with_name("tokenizer_config.json")
    if config.is_file():
        files["tokenizer_config.json"] = config.read_bytes()
    return TokenizerChoice(tokenizer, eos_id, bos_token_id(tokenizer, json_file), files, str(path))


def _sample_hash(name: str) -> float:
    """Independent of split_hash (another prefix), so the sample is not biased by the split."""
    return int.from_bytes(hashlib.sha256(b"bpe-sample:" + name.encode()).digest()[:8], "big") / 2 ** 64


def estimated_text_bytes(files: Iterable[SourceFile]) -> float:
    total = 0.0
    for f in files:
        name = f.path.name.lower()
        factor = next((v for k, v in _EXPANSION.items() if name.endswith(k)), 1.0)
        total += f.path.stat().st_size * factor
    return total


def bpe_sample(files: list[SourceFile], text_field: str, sample_bytes: int, val_fraction: float,
               max_bytes: int | None, on_bad_record: str) -> list[str]:
    """Texts of training documents, each kept with probability ~ sample_bytes / corpus size (by a
    hash of its name, so spread over the whole corpus and the same on every run), at most about
    `sample_bytes` of them. When the whole corpus fits, this is every training document, in order
    (with the split's fallback: the smallest-hash document is held out when no other is)."""
    estimate = estimated_text_bytes(files)
    rate = 1.0 if estimate <= sample_bytes else sample_bytes / estimate
    texts, size, complete = [], 0, True
    seen_val, smallest, count = False, None, 0
    for doc in read_documents(files, text_field, max_bytes, BadRecords(on_bad_record)):
        if not doc.text.strip():
            continue
        count += 1
        h = split_hash(doc.name)
        if h < val_fraction:
            seen_val = True
            continue
        if smallest is None or h < smallest[0]:
            smallest = (h, len(texts) if _sample_hash(doc.name) < rate else None)
        if rate < 1.0 and _sample_hash(doc.name) >= rate:
            continue
        texts.append(doc.text)
        size += len(doc.text.encode())
        if size >= sample_bytes:
            complete = False
            break
    if complete and not seen_val and count >= 2 and val_fraction > 0 and smallest and smallest[1] is not None:
        del texts[smallest[1]]
    return texts


def trained_tokenizer(texts: list[str], vocab_size: int, sample_bytes: int) -> TokenizerChoice:
    tokenizer = train_bpe(texts, vocab_size)
    size = sum(len(t.encode()) for t in texts)
    return TokenizerChoice(tokenizer, tokenizer.token_to_id(TRAINED_EOS), None,
                           {"tokenizer.json": tokenizer.to_str(pretty=True).encode()},
                           f"byte-level BPE (vocab_size={vocab_size}) trained on {len(texts):,} training documents "
                           f"({size:,} bytes; --tokenizer-sample-bytes={sample_bytes:,})")
