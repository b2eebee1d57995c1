"""The two halves of a preparation: input files -> the token streams of a part (encode_part), and
the parts' streams -> shards, tokenizer files and manifest.json (write_dataset)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from pretrain.data.corpus import BadRecords, SourceFile, read_documents
from pretrain.data.encode import Encoder, document_batches, encode_documents
from pretrain.data.progress import PrepareProgress
from pretrain.data.shards import FORMAT_VERSION, KEY_DIGITS, MEMBER_SUFFIX
from pretrain.data.streams import PART_INFO, StreamWriter, pack_parts
from pretrain.files import write_atomic
from pretrain.data.tokenizer_choice import TokenizerChoice


def encode_part(directory: Path, files: list[SourceFile], choice: TokenizerChoice, settings: dict,
                 max_bytes: int | None, workers: int) -> dict:
    """Encode `files` into the token streams of one part in `directory`; part.json last."""
    bad = BadRecords(settings["on_bad_record"])
    encoder = Encoder(choice.files["tokenizer.json"].decode(), choice.eos_id, choice.bos_id,
                      settings["add_special_tokens"])
    docs = (d for d in read_documents(files, settings["text_field"], max_bytes, bad) if d.text.strip())
    writer = StreamWriter(directory, np.dtype(settings["dtype"]), settings["val_fraction"])
    progress = PrepareProgress(f"prepare part {settings['part']}" if settings.get("num_parts", 1) > 1 else "prepare")
    try:
        for batch, ids, lengths in encode_documents(document_batches(docs), encoder, workers):
            writer.add(batch, ids, lengths)
            progress.add(len(batch), sum(len(d.text.encode("utf-8", "surrogatepass")) for d in batch), len(ids))
    finally:
        writer.close()
    progress.finish()
    info = {**settings, **writer.info(), "files": len(files), "bad_records": bad.as_dict()}
    write_atomic(directory / PART_INFO, (json.dumps(info, indent=2) + "\n").encode())
    return info


def combined_bad_records(infos: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for info in infos:
        for reason, n in info["bad_records"]["skipped"].items():
            counts[reason] = counts.get(reason, 0) + n
    examples = [e for info in infos for e in info["bad_records"]["examples"]][:10]
    return {"policy": infos[0]["bad_records"]["policy"], "skipped": dict(sorted(counts.items())),
            "examples": examples}


def write_dataset(stage: Path, parts: list[tuple[Path, dict]], tokenizer_files: dict[str, bytes]) -> dict:
    """Shards, tokenizer files and manifest.json of the parts' streams, in `stage`."""
    s = parts[0][1]
    dtype = np.dtype(s["dtype"])
    splits = pack_parts(parts, stage, s["seq_len"], s["samples_per_shard"], s["val_fraction"], dtype)
    if splits["train"]["samples"] == 0:
        raise ValueError(f"the training split has {splits['train']['encoded_tokens']} tokens, fewer than "
                         f"seq_len+1={s['seq_len'] + 1}; add text or lower --seq-len")
    if s["val_fraction"] > 0 and splits["val"]["samples"] == 0:
        warnings.warn(f"the validation split has no samples ({splits['val']['documents']} documents, "
                      f"{splits['val']['encoded_tokens']} tokens < seq_len+1={s['seq_len'] + 1}); "
                      "raise --val-fraction or lower --seq-len", stacklevel=3)
    for name, data in tokenizer_files.items():
        write_atomic(stage / name, data)
    from tokenizers import Tokenizer
    eos_token = Tokenizer.from_str(tokenizer_files["tokenizer.json"].decode()).id_to_token(s["eos_id"])
    manifest = {
        "format": FORMAT_VERSION, "seq_len": s["seq_len"], "sample_len": s["seq_len"] + 1,
        "vocab_size": s["vocab_size"], "eos_id": s["eos_id"], "eos_token": eos_token, "bos_id": s["bos_id"],
        "dtype": dtype.name, "member_suffix": MEMBER_SUFFIX, "key_digits": KEY_DIGITS,
        "tokenizer": "tokenizer.json", "tokenizer_sha256": s["tokenizer_sha256"],
        "tokenizer_source": s["tokenizer_source"], "source": s["source"],
        "settings": {k: s[k] for k in ("inputs", "pattern", "text_field", "val_fraction", "samples_per_shard",
                                       "max_files", "max_bytes", "include_tests", "add_special_tokens",
                                       "on_bad_record")},  # not num_parts: --merge equals one job
        "bad_records": combined_bad_records([info for _, info in parts]),
        "splits": splits,
    }
    write_atomic(stage / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest
