"""Scale-out over machines: each of N jobs prepares the token streams of its slice of the input
files into OUT/parts/part-I-of-N; the merge writes one dataset from all of them, the same as one job
over all files (see pretrain.data.streams)."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from pretrain.data.assemble import encode_part, write_dataset
from pretrain.data.corpus import SourceFile
from pretrain.data.outdir import PARTS_DIR, check_output, commit, staging
from pretrain.data.streams import read_part
from pretrain.files import write_atomic
from pretrain.data.tokenizer_choice import TokenizerChoice

# Settings every part of one dataset must share (checked by the merge).
SHARED_SETTINGS = ("inputs", "pattern", "text_field", "seq_len", "val_fraction", "samples_per_shard", "max_files",
                   "include_tests", "add_special_tokens", "on_bad_record", "dtype", "vocab_size", "eos_id",
                   "bos_id", "tokenizer_sha256", "tokenizer_source", "num_parts")


def select_part(files: list[SourceFile], num_parts: int, part: int) -> list[SourceFile]:
    """The files of part `part` of `num_parts`: contiguous runs of the sorted file list, balanced
    by size (file j goes to the part its middle byte falls in)."""
    sizes = np.asarray([f.path.stat().st_size for f in files], dtype=np.float64)
    if sizes.sum() == 0:
        sizes[:] = 1.0
    middle = np.cumsum(sizes) - sizes / 2
    owner = np.minimum((middle * num_parts / sizes.sum()).astype(np.int64), num_parts - 1)
    return [f for f, o in zip(files, owner) if o == part]


def part_name(part: int, num_parts: int) -> str:
    return f"part-{part:05d}-of-{num_parts:05d}"


def prepare_part(out: Path, files: list[SourceFile], choice: TokenizerChoice, settings: dict, part: int,
                  workers: int) -> dict:
    parts = out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    final = parts / part_name(part, settings["num_parts"])
    tmp = parts / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        for name, data in choice.files.items():
            write_atomic(tmp / name, data)
        info = encode_part(tmp, files, choice, {**settings, "part": part}, None, workers)
        if final.exists():  # an earlier attempt of this part
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def merge_parts(out: str | Path, overwrite: bool = False) -> dict:
    """Write the dataset of out/parts/part-*-of-N (all N present and complete) into `out`. The
    parts stay (remove out/parts after checking the result)."""
    out = Path(out)
    parts_dir = out / PARTS_DIR
    dirs = sorted(p for p in parts_dir.glob("part-*-of-*") if p.is_dir()) if parts_dir.is_dir() else []
    if not dirs:
        raise ValueError(f"no parts in {parts_dir}: run prepare with --num-parts N --part I first")
    infos = [(d, read_part(d)) for d in dirs]
    n = infos[0][1]["num_parts"]
    names = [d.name for d, _ in infos]
    expected = [part_name(i, n) for i in range(n)]
    if names != expected:
        missing = sorted(set(expected) - set(names))
        extra = sorted(set(names) - set(expected))
        raise ValueError(f"{parts_dir}: parts of --num-parts={n} are " + (f"missing {', '.join(missing[:5])}"
                         if missing else "") + (" and " if missing and extra else "")
                         + (f"mixed with {', '.join(extra[:5])} from another --num-parts" if extra else ""))
    for d, info in infos[1:]:
        differ = [k for k in SHARED_SETTINGS if info.get(k) != infos[0][1].get(k)]
        if differ:
            raise ValueError(f"{d} was prepared with other settings than {dirs[0].name} "
                             f"({', '.join(differ)}); prepare every part with the same arguments")
    check_output(out, [], overwrite)
    tokenizer_files = {p.name: p.read_bytes() for p in (dirs[0] / "tokenizer.json", dirs[0] / "tokenizer_config.json")
                       if p.is_file()}
    with staging(out) as stage:
        manifest = write_dataset(stage, infos, tokenizer_files)
        commit(stage, out, keep_other=not overwrite)
    return manifest
