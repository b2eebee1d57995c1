"""Asynchronous vs synchronous checkpoints: how long the training loop is held, and the wall time of
"save + the next N training steps" (the overlap). One process, CPU.

    python -m bench.async_checkpoint [--dim 384] [--layers 6] [--steps 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import record
from pretrain.checkpoint.writer import CheckpointWriter
from pretrain.model import LayerSkipTransformer, ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=6, n_kv_heads=2,
                      ffn_dim=4 * args.dim, max_seq_len=128)
    torch.manual_seed(0)
    model = LayerSkipTransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab, (4, 128))

    def step():
        loss = model.logits(tokens).float().logsumexp(-1).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer state exists: the checkpoint holds model + AdamW moments
    n_params = sum(p.numel() for p in model.parameters())
    rows = {"sync": [], "async": []}
    steps_only = []
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        for r in range(args.repeats):
            started = time.perf_counter()
            for _ in range(args.steps):
                step()
            steps_only.append(time.perf_counter() - started)
            for mode in ("sync", "async"):
                writer = CheckpointWriter(async_save=mode == "async")
                started = time.perf_counter()
                writer.save(root / mode, r + 1, [model], [opt], {"data": None}, "x: 1\n", keep=1)
                held = time.perf_counter() - started
                for _ in range(args.steps):
                    step()
                writer.close()
                rows[mode].append((held, time.perf_counter() - started, writer.last_total_s))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {m: [statistics.median(x[i] for x in rows[m]) for i in range(3)] for m in rows}
    steps_s = statistics.median(steps_only)
    size_mb = sum(p.numel() * 4 * 3 for p in model.parameters()) / 1e6
    table = ("| mode | loop held by the save (s) | save + %d steps, wall (s) | save start to complete (s) |\n"
             "|---|---|---|---|\n" % args.steps)
    for m in ("sync", "async"):
        table += f"| {m} | {med[m][0]:.3f} | {med[m][1]:.3f} | {med[m][2]:.3f} |\n"
    table += (f"\n{args.steps} training steps alone: {steps_s:.3f} s. Model {n_params / 1e6:.1f} M parameters, "
              f"checkpoint ≈ {size_mb:.0f} MB (weights + AdamW moments, fp32). Medians of {args.repeats} "
              f"interleaved repeats. 'held' is what the training loop waits for; with async saving the write, "
              f"checksums and rename run in a background thread while the steps run (on a machine with few "
              f"cores they compete for CPU).")
    record("async_checkpoint", "Asynchronous vs synchronous checkpoint saving (one process, CPU)",
           {"median": med, "steps_alone_s": steps_s, "params": n_params, "args": vars(args)}, table)


if __name__ == "__main__":
    main()
