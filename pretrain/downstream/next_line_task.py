"""Build a multiple-choice task with signal at CPU scale from the held-out split of a prepared
corpus: given a few lines of code, choose the true next line among four drawn from the same file.

    python -m pretrain.downstream.next_line_task --data-dir data/demo --out data/tasks/stdlib_next_line \\
        [--records 400] [--context-lines 4] [--seed 0] [--name stdlib_next_line] [--overwrite]
    python -m pretrain.eval --checkpoint runs/demo --tasks stdlib_next_line --include-path data/tasks/stdlib_next_line

The validation split's token stream (its samples in order) is cut into documents at the
end-of-text token and decoded; a record takes `context_lines` consecutive lines (ending with a
newline) as the query, the following line as the answer, and three distractors: other lines of the
same document, each at least 8 visible characters and different from the answer (--distractors file),
or the answer's words reordered (--distractors shuffle: the same tokens, only the order differs). Choices are scored
as continuations with no separator (target_delimiter ""), so `acc` compares whole-line
log-likelihoods and `acc_norm` per byte. Writes <out>/<name>.yaml (dataset_path: json, data_files:
the absolute path of <out>/records.jsonl), <out>/<name>_gen.yaml (the same records as a generation
task: greedy until the newline, chrF and exact match of the line) and the records; --out must be new or empty (or
--overwrite)."""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import numpy as np

from pretrain.data.dataset import PackedDataset
from pretrain.data.tokenizer import load_tokenizer

MIN_CHARS = 8


def held_out_documents(data_dir: str | Path) -> list[str]:
    """The validation split's documents as text (the first and last may be partial)."""
    val = PackedDataset(data_dir, "val")
    if not len(val):
        raise ValueError(f"{data_dir} has no validation samples (prepare it with --val-fraction > 0)")
    stream = np.concatenate([np.asarray(val[i]) for i in range(len(val))])
    eos = val.manifest["eos_id"]
    tokenizer = load_tokenizer(Path(data_dir) / val.manifest["tokenizer"])
    cuts = np.flatnonzero(stream == eos)
    pieces = np.split(stream, cuts)
    return [tokenizer.decode([int(t) for t in p if t != eos]) for p in pieces if len(p) > 1]


def shuffled_lines(line: str, rng: random.Random, count: int = 3) -> list[str] | None:
    """`count` different reorderings of the line's space-separated words (indentation kept), or None
    when the line has too few words: the same tokens, only their order is wrong."""
    indent, words = line[:len(line) - len(line.lstrip())], line.strip().split(" ")
    if len(words) < 3:
        return None
    seen, out = {line}, []
    for _ in range(50):
        candidate = indent + " ".join(rng.sample(words, len(words)))
        if candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
            if len(out) == count:
                return out
    return None


def distractors_from_file(lines: list[str], answer: str, rng: random.Random) -> list[str] | None:
    """Three other lines of the same document (at least MIN_CHARS visible characters each)."""
    pool = sorted({l for l in lines if len(l.strip()) >= MIN_CHARS and l.strip() != answer.strip()})
    return rng.sample(pool, 3) if len(pool) >= 3 else None


def next_line_records(documents: list[str], records: int, context_lines: int, seed: int,
                      distractors: str = "file") -> list[dict]:
    """Up to `records` multiple-choice records, spread over the documents (round robin, random order).
    distractors: 'file' (other lines of the same file) or 'shuffle' (the true line's words reordered)."""
    rng = random.Random(seed)
    per_doc = []
    for text in documents:
        lines = text.split("\n")
        candidates = [i for i in range(context_lines, len(lines) - 1) if len(lines[i].strip()) >= MIN_CHARS]
        rng.shuffle(candidates)
        per_doc.append((lines, candidates))
    out: list[dict] = []
    while len(out) < records and any(c for _, c in per_doc):
        for lines, candidates in per_doc:
            if not candidates or len(out) >= records:
                continue
            i = candidates.pop()
            choices = (shuffled_lines(lines[i], rng) if distractors == "shuffle"
                       else distractors_from_file(lines, lines[i], rng))
            if choices is None:
                continue
            gold = rng.randrange(4)
            choices.insert(gold, lines[i])
            query = "\n".join(lines[i - context_lines:i]) + "\n"
            out.append({"query": query, "choices": choices, "gold": gold, "answer": lines[i],
                        **generation_split(query, lines[i])})
    return out


def generation_yaml(name: str, records_path: Path) -> str:
    """The same records as a generation task: greedy until the newline; chrF (character n-gram F-score,
    graded where a small model rarely gets a whole line right) and exact match of the line."""
    return "\n".join([
        "# Built by python -m pretrain.downstream.next_line_task: generate the next line of held-out code.",
        f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {json.dumps(str(records_path.resolve()))}", "test_split: test", "output_type: generate_until",
        "doc_to_text: prompt", "doc_to_target: target", "generation_kwargs:", '  until: ["\\n"]',
        "  max_gen_toks: 24", "  do_sample: false", "metric_list:", "  - metric: chrf", "  - metric: exact_match",
        "    aggregation: mean", "    higher_is_better: true", '    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]',
        "metadata:", "  version: 1.0", ""])


def generation_split(query: str, answer: str) -> dict:
    """prompt / target of the generation variant: the answer's indentation but its last space moves
    into the prompt, as a byte-level BPE tokenizer splits code ("\\n   " then " return"), so that the
    prompt ends where a token of the training text would end and the target starts the first word."""
    indent = len(answer) - len(answer.lstrip())
    cut = max(indent - 1, 0)
    return {"prompt": query + answer[:cut], "target": answer[cut:]}


def task_yaml(name: str, records_path: Path) -> str:
    return "\n".join([
        f"# Built by python -m pretrain.downstream.next_line_task: choose the true next line of held-out code.",
        f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
        f"    test: {json.dumps(str(records_path.resolve()))}", "test_split: test", "output_type: multiple_choice",
        'doc_to_text: query', 'doc_to_choice: choices', "doc_to_target: gold", 'target_delimiter: ""',
        "metric_list:", "  - metric: acc", "    aggregation: mean", "    higher_is_better: true",
        "  - metric: acc_norm", "    aggregation: mean", "    higher_is_better: true", "metadata:", "  version: 1.0", ""])


def build(data_dir: str, out: str, records: int, context_lines: int, seed: int, name: str, overwrite: bool,
          distractors: str = "file") -> Path:
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {out_dir} exists and is not empty; pass --overwrite to replace it")
    if records < 1 or context_lines < 1:
        raise ValueError(f"--records={records} and --context-lines={context_lines} must be >= 1")
    rows = next_line_records(held_out_documents(data_dir), records, context_lines, seed, distractors)
    if not rows:
        raise ValueError(f"{data_dir}: the held-out documents give no record (too few lines of >= {MIN_CHARS} characters)")
    tmp = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / f"{name}.yaml").write_text(task_yaml(name, out_dir / "records.jsonl"))
    (tmp / f"{name}_gen.yaml").write_text(generation_yaml(f"{name}_gen", out_dir / "records.jsonl"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    print(f"wrote {len(rows)} records and tasks {name!r} (multiple choice), {name + '_gen'!r} (generation) to {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True, help="a prepared dataset with a validation split")
    ap.add_argument("--out", required=True, help="task directory to write (--include-path it)")
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--context-lines", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="stdlib_next_line")
    ap.add_argument("--distractors", choices=("file", "shuffle"), default="file",
                    help="file: three other lines of the same file; shuffle: the true line's words reordered")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        build(args.data_dir, args.out, args.records, args.context_lines, args.seed, args.name, args.overwrite,
              args.distractors)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
