"""Data pipeline benchmark (issue 11), side by side in one run:

(a) prepare throughput vs the raw tokenizer: `encode_batch` over the same documents (read into
    memory first, batches of 256 as prepare cuts them) vs `prepare --workers 1` and `--workers 2`,
    each in a fresh process, interleaved, medians;
(b) peak RSS of prepare (parent + worker processes) vs corpus size (~30 MB, ~300 MB, >= 1 GB);
(c) reading: this project's tar/.npy index (PackedDataset) vs webdataset's indexed reader
    (`wids.ShardListDataset`) on a >= 1 GB dataset: open time and random-read samples/s;
(d) loader samples/s (TrainBatches, one rank) vs what the trainer consumes, at the demo shape
    (measured: a train step of the demo model on this CPU) and the llama_1b shape (seq 2048,
    vocab 128256; consumption estimated for one accelerator from 6·N FLOPs/token, see the table).

The corpus is generated on the fly from the running interpreter's standard library, repeated with
variations (per copy: a seeded renaming of common identifiers and a rotation of the lines), as
JSON lines; nothing is downloaded. One tokenizer (a byte-level BPE of 4096, trained on 8 MB of the
corpus) for every measurement.

    nice python -m bench.data_pipeline [--sizes-mb 30,300,1024] [--repeats 3] [--workdir /tmp/data_bench]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BPE_VOCAB = 4096
WORDS = ("self", "value", "result", "name", "data", "path", "item", "key", "args", "line", "text", "node")


# -- corpus ---------------------------------------------------------------------------------------

def generate_corpus(directory: Path, target_bytes: int, file_bytes: int = 32 << 20) -> int:
    """JSON-lines files of stdlib sources with variations until `target_bytes` of text; returns it."""
    from pretrain.data.corpus import stdlib_files
    directory.mkdir(parents=True, exist_ok=True)
    texts = []
    for f in stdlib_files():
        try:
            texts.append(f.path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    written, copy, index, out, in_file = 0, 0, 0, None, 0
    while written < target_bytes:
        rng = np.random.default_rng(copy)
        renames = dict(zip(WORDS, rng.permutation(WORDS)))
        for text in texts:
            if out is None or in_file >= file_bytes:
                if out:
                    out.close()
                out = open(directory / f"corpus-{index:04d}.jsonl", "w")
                index, in_file = index + 1, 0
            lines = text.splitlines()
            shift = int(rng.integers(len(lines))) if lines else 0
            body = "\n".join(lines[shift:] + lines[:shift])
            for a, b in renames.items():
                body = body.replace(f" {a}.", f" {b}.")
            line = json.dumps({"text": body}) + "\n"
            out.write(line)
            size = len(body.encode())
            written += size
            in_file += len(line)
            if written >= target_bytes:
                break
        copy += 1
    out.close()
    return written


# -- child processes ------------------------------------------------------------------------------

def run_child(args: list[str]) -> dict:
    """Run `python -m bench.data_pipeline --child ...` and return its JSON report."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "bench.data_pipeline", "--child", *args],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(argv: list[str]) -> None:
    what, rest = argv[0], argv[1:]
    start = time.perf_counter()
    if what == "prepare":
        from pretrain.data.prepare import main
        if main(rest) != 0:
            raise SystemExit(1)
    elif what == "raw":
        from pretrain.data.corpus import expand_inputs, read_documents
        from pretrain.data.encode import document_batches
        from pretrain.data.tokenizer import load_tokenizer
        corpus, tokenizer = rest
        tok = load_tokenizer(tokenizer)
        batches = [[d.text for d in b] for b in document_batches(
            d for d in read_documents(expand_inputs([corpus])) if d.text.strip())]
        start = time.perf_counter()  # the raw figure is encoding alone, the texts already in memory
        for texts in batches:
            tok.encode_batch(texts)
    seconds = time.perf_counter() - start
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
              resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": rss}))


# -- (a), (b) -------------------------------------------------------------------------------------

def prepare_args(corpus: Path, out: Path, tokenizer: Path, workers: int) -> list[str]:
    return ["--inputs", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer), "--seq-len", "128",
            "--val-fraction", "0.01", "--workers", str(workers), "--overwrite"]


def throughput(corpus: Path, tokenizer: Path, work: Path, text_bytes: int, repeats: int) -> dict:
    times: dict[str, list[float]] = {"raw encode_batch": [], "prepare --workers 1": [], "prepare --workers 2": []}
    rss: dict[str, float] = {}
    for _ in range(repeats):
        times["raw encode_batch"].append(run_child(["raw", str(corpus), str(tokenizer)])["seconds"])
        for workers in (1, 2):
            r = run_child(["prepare", *prepare_args(corpus, work / "out", tokenizer, workers)])
            times[f"prepare --workers {workers}"].append(r["seconds"])
            rss[f"prepare --workers {workers}"] = r["peak_rss_mb"]
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "all_s": times, "mb_per_s": {k: text_bytes / 1e6 / v for k, v in med.items()},
            "ratio_to_raw": {k: med["raw encode_batch"] / v for k, v in med.items()}, "peak_rss_mb": rss}


# -- (c) reading ----------------------------------------------------------------------------------

def synthetic_dataset(out: Path, target_bytes: int, seq_len: int, vocab: int, per_shard: int) -> None:
    """A prepared-format dataset of random tokens (shards written by ShardWriter, a real manifest)."""
    from pretrain.data.shards import FORMAT_VERSION, ShardWriter, token_dtype
    dtype = token_dtype(vocab)
    n = target_bytes // ((seq_len + 1) * dtype.itemsize) + 1
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, count in (("train", n), ("val", per_shard)):
        writer = ShardWriter(out, split, per_shard, dtype, seq_len + 1)
        for lo in range(0, count, 1024):
            for row in rng.integers(0, vocab, (min(1024, count - lo), seq_len + 1)):
                writer.add(row)
        writer.finish()
        splits[split] = {"shards": writer.shards, "samples": count, "tokens": count * (seq_len + 1),
                         "documents": 0}
    (out / "manifest.json").write_text(json.dumps({"format": FORMAT_VERSION, "seq_len": seq_len,
                                                   "vocab_size": vocab, "eos_id": 0, "dtype": dtype.name,
                                                   "splits": splits}))


def reading(data: Path, reads: int) -> dict:
    import wids
    from pretrain.data.dataset import PackedDataset, _npy_header
    manifest = json.loads((data / "manifest.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    total = sum(s["samples"] for s in shards)
    ids = np.random.default_rng(1).integers(0, total, reads)
    result = {"dataset_bytes": sum(s["bytes"] for s in shards), "shards": len(shards), "samples": total}

    def ours(verify_on_first_read: bool):
        t0 = time.perf_counter()
        ds = PackedDataset(data, "train")
        if not verify_on_first_read:
            ds._verified = set(range(len(shards)))  # measure reading alone
        opened = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = [ds[int(i)] for i in ids]
        return opened, reads / (time.perf_counter() - t0), rows

    def theirs():
        spec = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "bench",
                "shardlist": [{"url": str(data / s["file"]), "nsamples": s["samples"]} for s in shards]}
        t0 = time.perf_counter()
        ds = wids.ShardListDataset(spec["shardlist"], lru_size=len(shards), keep=True, transformations=[])
        opened = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = []
        for i in ids:
            raw = ds[int(i)][".tokens.npy"]
            raw = raw if isinstance(raw, bytes) else raw.read()
            start, dtype, shape = _npy_header(raw)
            rows.append(np.frombuffer(raw[start:], dtype=dtype).astype(np.int64))
        return opened, reads / (time.perf_counter() - t0), rows

    o_open, o_rate_verify, o_rows = ours(True)
    o_open2, o_rate, _ = ours(False)
    w_open, w_rate, w_rows = theirs()
    assert all(np.array_equal(a, b) for a, b in zip(o_rows, w_rows)), "the two readers disagree"
    result.update({"ours_open_s": min(o_open, o_open2), "ours_samples_per_s": o_rate,
                   "ours_samples_per_s_first_pass_with_checksums": o_rate_verify,
                   "wids_open_s": w_open, "wids_samples_per_s": w_rate})
    return result


# -- (d) loader vs trainer ------------------------------------------------------------------------

def loader_rate(data, global_batch: int, steps: int) -> float:
    """Samples/s of TrainBatches.batch over `steps` steps (one rank, no prefetch thread)."""
    from pretrain.data.loader import TrainBatches
    batches = TrainBatches(data, global_batch, seed=0)
    batches.batch(0)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batches.batch(step)
    return steps * global_batch / (time.perf_counter() - t0)


def loader_figures(data_dir: Path, global_batch: int, steps: int) -> dict:
    """First pass (each shard's sha256 checked when first read) and steady state (all checked)."""
    from pretrain.data.dataset import PackedDataset
    first = loader_rate(PackedDataset(data_dir), global_batch, steps)
    warm = PackedDataset(data_dir)
    warm.verify()
    return {"loader_samples_per_s_first_pass": first, "loader_samples_per_s": loader_rate(warm, global_batch, steps)}


def measure_loader(demo_data: Path, big: Path) -> dict:
    return {
        "demo": {"seq_len": 128, "global_batch": 16, **loader_figures(demo_data, 16, 200),
                 "trainer_samples_per_s": demo_consumption(16, 128), "trainer": "measured on this CPU"},
        "llama_1b": {"seq_len": 2048, "global_batch": 8, **loader_figures(big, 8, 200),
                     "trainer_samples_per_s": llama_1b_estimate(2048),
                     "trainer": "estimate per accelerator: 40% MFU of 989 TFLOP/s, 6·1.24e9 FLOPs/token"}}


def demo_consumption(batch: int, seq: int, repeats: int = 5) -> float:
    """Samples/s a plain training step of the demo model takes on this CPU (forward, backward, AdamW)."""
    import torch
    from omegaconf import OmegaConf
    from pretrain.model import LayerSkipTransformer, ModelConfig
    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/model/demo.yaml")
    cfg = ModelConfig(**OmegaConf.to_container(conf))
    model = LayerSkipTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    L = cfg.n_layers

    def step():
        logits = model.exit_logits(model(tokens[:, :-1], exits=[L])[L])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def llama_1b_estimate(seq: int, peak_flops: float = 989e12, mfu: float = 0.4) -> float:
    """Samples/s one accelerator at `mfu` of `peak_flops` (H100 bf16 dense) consumes for the
    llama_1b shape: 6·N FLOPs per token, N = 1.24e9 parameters."""
    return peak_flops * mfu / (6 * 1.24e9) / seq


def render(payload: dict) -> str:
    t, r, rd, ld = payload["throughput"], payload["rss"], payload["reading"], payload["loader"]
    corpus_mb, repeats, reads = payload["corpus_bytes"] / 1e6, len(t["all_s"]["raw encode_batch"]), payload["reads"]
    lines = ["## (a) prepare throughput vs the raw tokenizer "
             f"({corpus_mb:.0f} MB of JSON lines, BPE {BPE_VOCAB}, medians of {repeats})", "",
             "| case | median s | MB/s | vs raw (medians) | fastest s | vs raw (fastest) |",
             "|---|---:|---:|---:|---:|---:|"]
    fastest = {k: min(v) for k, v in t["all_s"].items()}
    for k in t["median_s"]:
        lines.append(f"| {k} | {t['median_s'][k]:.1f} | {t['mb_per_s'][k]:.2f} | {100 * t['ratio_to_raw'][k]:.0f}% | "
                     f"{fastest[k]:.1f} | {100 * fastest['raw encode_batch'] / fastest[k]:.0f}% |")
    lines += ["", "Runs: " + "; ".join(f"{k}: {', '.join(f'{x:.0f}' for x in v)} s" for k, v in t["all_s"].items())
              + ". The machine is shared (load from other jobs varied during the run), hence both columns; "
              "the raw figure is encode_batch alone on texts already in memory, prepare's is the whole "
              "command (start, reading, JSON, split, packing, shards, checksums)."]
    lines += ["", "## (b) peak RSS of prepare (--workers 1) vs corpus size", "",
              "| corpus text | peak RSS |", "|---:|---:|"]
    for mb, v in r.items():
        lines.append(f"| {v['text_bytes'] / 1e6:,.0f} MB | {v['peak_rss_mb']:.0f} MB |")
    lines += ["", f"## (c) reading a {rd['dataset_bytes'] / 2**30:.2f} GiB dataset ({rd['shards']} shards, "
              f"{rd['samples']:,} samples of 2048+1 uint32 tokens), {reads} random reads", "",
              "| reader | open (s) | random-read samples/s |", "|---|---:|---:|",
              f"| PackedDataset (tar/.npy index) | {rd['ours_open_s']:.3f} | {rd['ours_samples_per_s']:,.0f} |",
              f"| PackedDataset, first pass incl. per-shard sha256 | | "
              f"{rd['ours_samples_per_s_first_pass_with_checksums']:,.0f} |",
              f"| wids.ShardListDataset (all shards cached) | {rd['wids_open_s']:.3f} | {rd['wids_samples_per_s']:,.0f} |",
              "", "## (d) loader vs trainer (one rank)", "",
              "| shape | loader samples/s | first pass (checksums) | trainer consumes samples/s | how |",
              "|---|---:|---:|---:|---|"]
    for k, v in ld.items():
        lines.append(f"| {k} (seq {v['seq_len']}, batch {v['global_batch']}) | {v['loader_samples_per_s']:,.0f} | "
                     f"{v.get('loader_samples_per_s_first_pass', float('nan')):,.0f} | "
                     f"{v['trainer_samples_per_s']:,.1f} | {v['trainer']} |")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------------

def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    from bench.common import record  # imports torch: not in the children (nor their spawned workers)
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes-mb", default="30,300,1024")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reads", type=int, default=4000)
    ap.add_argument("--read-mb", type=int, default=1100, help="size of the dataset for (c)")
    ap.add_argument("--workdir", default="/tmp/data_bench")
    ap.add_argument("--only-loader", action="store_true",
                    help="re-measure (d) only, on the corpus and dataset a full run left in --workdir, and "
                         "update the recorded results")
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.only_loader:
        stored = Path(__file__).resolve().parent / "results" / "data_pipeline.json"
        payload = json.loads(stored.read_text())
        run_child(["prepare", *prepare_args(work / "corpus_30mb", work / "out", work / "tokenizer", 1),
                   "--max-bytes", "8000000"])
        payload["loader"] = measure_loader(work / "out", work / "synthetic_llama")
        payload["loader_command"] = "python -m bench.data_pipeline " + " ".join(sys.argv[1:])
        payload.setdefault("corpus_bytes", next(iter(payload["rss"].values()))["text_bytes"])
        payload.setdefault("reads", args.reads)
        payload["full_run_command"] = payload.get("full_run_command", payload.get("command"))
        payload = {k: v for k, v in payload.items() if k not in ("command", "machine", "date", "git")}
        record("data_pipeline", "Data pipeline: prepare throughput, memory, reading, loader", payload,
               render(payload) + f"\n\n(a)-(c) from `{payload['full_run_command']}`; (d) from "
               f"`{payload['loader_command']}` on the same machine, the same day.")
        return
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    payload: dict = {"sizes_mb": sizes, "reads": args.reads}

    corpora = {}
    for mb in sizes:
        corpora[mb] = (work / f"corpus_{mb}mb", generate_corpus(work / f"corpus_{mb}mb", mb << 20))
    small, small_bytes = corpora[sizes[0]]
    tokenizer = work / "tokenizer"
    run_child(["prepare", "--inputs", str(small), "--out", str(tokenizer), "--tokenizer-only", "--overwrite",
               "--vocab-size", str(BPE_VOCAB), "--tokenizer-sample-bytes", str(8 << 20)])

    payload["corpus_bytes"] = small_bytes
    payload["throughput"] = throughput(small, tokenizer, work, small_bytes, args.repeats)
    payload["rss"] = {}
    for mb in sizes:
        corpus, text_bytes = corpora[mb]
        if mb == sizes[0]:
            rss = payload["throughput"]["peak_rss_mb"]["prepare --workers 1"]
        else:
            rss = run_child(["prepare", *prepare_args(corpus, work / "out", tokenizer, 1)])["peak_rss_mb"]
        payload["rss"][mb] = {"text_bytes": text_bytes, "peak_rss_mb": rss}
    demo_data = work / "out"  # the last prepared corpus, seq_len 128 (demo shape)

    big = work / "synthetic_llama"
    synthetic_dataset(big, args.read_mb << 20, seq_len=2048, vocab=128256, per_shard=2048)
    payload["reading"] = reading(big, args.reads)

    payload["loader"] = measure_loader(demo_data, big)
    shutil.rmtree(work / "out", ignore_errors=True)

    record("data_pipeline", "Data pipeline: prepare throughput, memory, reading, loader", payload, render(payload))


if __name__ == "__main__":
    main()
