"""Peak memory and step time of a LayerSkip training step with every exit on, per way of computing
the early-exit loss: plain (each exit's logits kept until backward), checkpoint_heads (recomputed
in backward) and layerskip.early_exit.loss_chunk_tokens (chunked linear + cross-entropy).

    python -m bench.exit_loss_memory [--repeats 3] [--steps 2] [--layers 8] [--dim 256] [--vocab 32000]
                                     [--seq 1024] [--batch 1] [--chunks 1024,256]

Method. Each variant runs in a fresh subprocess (same seed, model, batch), one after the other in
a rotating order, `--repeats` times. The child sets glibc's mmap threshold to 64 KiB
(MALLOC_MMAP_THRESHOLD_), so every tensor above that is its own mapping, returned to the OS when
freed: the resident set size then follows live tensor memory (torch's CPU allocator does not
cache). After a warm-up step (AdamW state allocated), before each measured step the child frees
heap slack (malloc_trim), reads VmRSS and resets the kernel's peak-RSS mark (writing 5 to
/proc/self/clear_refs); after the step VmHWM - VmRSS(before) is the step's peak memory above the
standing model + optimizer state (gradients, activations, logits: everything the step allocates).
Step time is the wall time of the same steps. Medians over steps and repeats.

Also written: a table on paper of the logits memory per step at LayerSkip shapes.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import record

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant: str, args: argparse.Namespace) -> dict:
    """One variant: warm-up step, then `args.steps` measured steps; peak bytes and seconds each."""
    import gc

    import torch

    from bench.common import trainer_for
    from pretrain.config import RunConfig
    from pretrain.layerskip.plan import StepPlan
    from pretrain.model import LayerSkipTransformer, ModelConfig
    from schedules.exit_loss import exit_loss_weights

    torch.set_num_threads(args.threads)
    L = args.layers
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=L, n_heads=args.dim // 64,
                      n_kv_heads=max(1, args.dim // 128), ffn_dim=int(args.dim * 8 / 3) // 64 * 64,
                      max_seq_len=args.seq)
    run = RunConfig(model=cfg)  # the trainer's own step: one micro-batch, clipping at 1, AdamW
    run.train.global_batch_size = run.train.micro_batch_size = args.batch
    run.train.seq_len, run.train.device, run.optim.lr = args.seq, "cpu", 1e-4
    ee = run.layerskip.early_exit
    ee.checkpoint_heads = variant == "checkpoint_heads"
    ee.loss_chunk_tokens = int(variant.split("=")[1]) if variant.startswith("chunk") else 0
    torch.manual_seed(0)
    trainer = trainer_for(run, LayerSkipTransformer(cfg))
    seq = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    batch = {"tokens": seq[:, :-1], "targets": seq[:, 1:], "sample_ids": torch.arange(args.batch)}
    plan = StepPlan(step=0, drop_rates=(0.0,) * L, dropout_seed=0,
                    exit_weights=exit_loss_weights(0, num_layers=L, curriculum="none"))

    def step():
        return trainer.train_step(plan, batch)

    libc = ctypes.CDLL("libc.so.6")
    losses, peaks, seconds = [step().loss], [], []
    for _ in range(args.steps):
        gc.collect()
        libc.malloc_trim(0)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        start = time.perf_counter()
        losses.append(step().loss)
        seconds.append(time.perf_counter() - start)
        peaks.append((_status_kib("VmHWM") - before) * 1024)
    return {"variant": variant, "peak_bytes": peaks, "step_s": seconds, "losses": losses}


def run_child(variant: str, argv: list[str], threads: int) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "bench.exit_loss_memory", "--child", variant, *argv],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def paper_table(chunk: int, exits_note: str) -> tuple[list[str], list[dict]]:
    """Logits memory of one micro-batch of N = seq tokens (batch 1), bf16 compute, k exits on.

    plain: held from forward to backward, every exit's float32 log-softmax [N, V] (4 B; the bf16
      logits are freed after the float32 copy); working set of one exit: bf16 logits + float32
      copy + its log-softmax, then in backward its gradient (float32) and the bf16 cast: ~(2+4+4+4+2) N V.
    checkpoint_heads: held nothing vocabulary-sized; working set of one exit as plain (recomputed).
    chunked: held one float32 dW [V, D] (the head gradient's size); working set one chunk of
      C tokens: bf16 logits + float32 logits/softmax + bf16 gradient: (2+4+2) C V.
    """
    shapes = [("llama_1b (Llama-3.2-1B)", 2048, 128256, 16, 8192), ("llama2_7b", 4096, 32000, 32, 4096),
              ("Llama-3-8B shape", 4096, 128256, 32, 8192)]
    lines = [f"Per micro-batch of batch 1 x seq tokens, bf16 compute, {exits_note}; chunk C = {chunk} tokens; "
             "GiB = 2^30 B; per tensor-parallel rank divide V by tp.", "",
             "| model | D | V | seq N | exits k | plain: held k·N·V·4 | plain: peak (held + one exit's working set) "
             "| checkpoint_heads: peak | chunked: dW V·D·4 + chunk (2+4+2)·C·V | plain / chunked |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for name, D, V, L, N in shapes:
        k = min(8, L)
        held = k * N * V * 4
        working = (2 + 4 + 4 + 4 + 2) * N * V
        chunked = V * D * 4 + (2 + 4 + 2) * chunk * V
        rows.append({"model": name, "dim": D, "vocab": V, "seq": N, "exits": k, "plain_held": held,
                     "plain_peak": held + working, "checkpoint_heads_peak": working, "chunked_peak": chunked})
        lines.append(f"| {name} | {D} | {V} | {N} | {k} | {held / GiB:.1f} GiB | {(held + working) / GiB:.1f} GiB | "
                     f"{working / GiB:.1f} GiB | {chunked / GiB:.2f} GiB | {(held + working) / chunked:.0f}x |")
    return lines, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="fresh subprocesses per variant (rotating order)")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per subprocess, after one warm-up step")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--chunks", default="1024,256", help="loss_chunk_tokens values to measure")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    argv = [a for a in sys.argv[1:]]
    variants = ["plain", "checkpoint_heads"] + [f"chunk={c}" for c in args.chunks.split(",")]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            runs[v].append(run_child(v, argv, args.threads))
            print(v, runs[v][-1]["peak_bytes"], [round(s, 2) for s in runs[v][-1]["step_s"]], flush=True)
    med = {v: {"peak_bytes": statistics.median(p for run in rs for p in run["peak_bytes"]),
               "step_s": statistics.median(s for run in rs for s in run["step_s"]),
               "loss": rs[0]["losses"][-1]} for v, rs in runs.items()}
    base = med["plain"]
    table = [f"Model: {args.layers} layers, dim {args.dim}, vocab {args.vocab}; batch {args.batch} x seq {args.seq}; "
             f"all {args.layers} exits on (curriculum none, e = sum_l), float32, AdamW; {args.threads} threads. "
             f"Medians of {args.steps} measured steps x {args.repeats} fresh subprocesses per variant, run in "
             "rotating order in one invocation. Peak = VmHWM during the step - VmRSS before it (see the "
             "module docstring).", "",
             "| exit loss | peak step memory | vs plain | step s | vs plain | loss after the steps |",
             "|---|---|---|---|---|---|"]
    for v, m in med.items():
        table.append(f"| {v} | {m['peak_bytes'] / 2**20:,.0f} MiB | {base['peak_bytes'] / m['peak_bytes']:.2f}x less | "
                     f"{m['step_s']:.3f} | {m['step_s'] / base['step_s']:.2f}x | {m['loss']:.6f} |")
    table += ["", "Targets (chunked vs plain): >= 4x less peak memory, step time <= 1.1x.", "",
              "## Logits memory per step on paper", ""]
    chunk = int(args.chunks.split(",")[0])
    paper, paper_rows = paper_table(chunk, "8 exits on")
    table += paper + ["", paper_table.__doc__.split("\n\n", 1)[1].strip().replace("\n    ", "\n")]
    record("exit_loss_memory", "Early-exit loss: peak memory and step time, plain vs checkpoint_heads vs chunked",
           {"args": vars(args), "runs": runs, "medians": med, "paper": paper_rows}, "\n".join(table))


if __name__ == "__main__":
    main()
