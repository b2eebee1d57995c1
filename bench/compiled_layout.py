"""The compiled multi-process code path on ONE device (make gpu-check, part m).

A machine with one GPU cannot run two NCCL ranks (NCCL refuses two ranks on one device), and gloo
moves no CUDA tensors for FSDP/TP collectives. So this runs ONE process as rank 0 of a fake process
group of world size N (torch's FakeStore / "fake" backend, what torchtitan's memory estimator
uses): the real Trainer builds the real layout (DTensor weights with the sequence-parallel TP plan
and vocabulary-parallel loss, FSDP2 fully_shard, activation checkpointing) and runs the real
kernels on the device; the collectives move no data but are deterministic (an all-gather repeats
this rank's shard, a reduce-scatter keeps its slice, an all-reduce is the identity), as if every
peer held this rank's data. Each layout trains eager and compiled (train.compile) from the same
weights on the same batches, with per-sample layer dropout and the rotational exit loss, so the
two must give the same losses.

Measured per layout: the largest relative loss difference compiled vs eager, compilations and
recompilations (pretrain/operations/compile_events.py), compile seconds, and the median step time
eager and compiled after warm-up. What it proves on a GPU: inductor generates and runs GPU kernels
for the TP / FSDP2 blocks with their functional collectives (the part a CPU run cannot show); what it
does not: real collectives across devices, whose equality to one process make test-compile checks
with gloo on CPU at 2 and 4 processes. Pipeline layouts are left out (a fake receive returns no data).

    python -m bench.compiled_layout [--device auto] [--steps 12] [--backend inductor] [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore  # also registers the "fake" backend

from bench.common import RESULTS, machine, random_batch
from pretrain.config import RunConfig, check_layout
from pretrain.data.loader import rank_slice
from pretrain.device import device_name, select_device, synchronize
from pretrain.layerskip.plan import step_plan
from pretrain.model import LayerSkipTransformer, ModelConfig
from pretrain.operations.compile_events import compile_events
from pretrain.trainer.trainer import Trainer

LAYOUTS = {   # name: parallel keys (world size = their product), activation checkpointing
    "fsdp2": ({"dp_shard": 2}, False),
    "tp2": ({"tp": 2}, False),
    "tp2_ac": ({"tp": 2}, True),
    "tp2_fsdp2_ac": ({"tp": 2, "dp_shard": 2}, True),
}


def run_config(layout: str, dry_run: bool, steps: int, compiled: bool, backend: str) -> RunConfig:
    shape = (dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
             if dry_run else dict(vocab_size=32768, dim=1024, n_layers=8, n_heads=16, n_kv_heads=8, ffn_dim=2816,
                                  max_seq_len=1024))
    cfg = RunConfig(model=ModelConfig(**shape))
    parallel, ac = LAYOUTS[layout]
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    tr = cfg.train
    tr.steps, tr.global_batch_size, tr.micro_batch_size = steps, 8, 4
    tr.seq_len = 32 if dry_run else 1024
    tr.activation_checkpointing, tr.compile, tr.compile_backend = ac, compiled, backend
    cfg.layerskip.layer_dropout.p_max, cfg.layerskip.layer_dropout.time_scale = 0.5, "constant"
    cfg.layerskip.early_exit.curriculum, cfg.layerskip.early_exit.rotation_period = "rotational", 2
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
    return cfg


def train(cfg: RunConfig, dims) -> dict:
    """cfg.train.steps steps of the Trainer on `dims` (rank 0 of the fake group): losses, median step
    time (second half), and the compilations they caused."""
    device = dims.device
    torch.manual_seed(0)
    trainer = Trainer(cfg, dims, LayerSkipTransformer(cfg.model))
    trainer.optimizer.set_learning_rate(cfg.optim.lr)
    events = compile_events()
    before = dict(events.metrics())
    losses, times = [], []
    for step in range(cfg.train.steps):
        batch = random_batch(cfg.model.vocab_size, cfg.train.global_batch_size, cfg.train.seq_len, seed=step)
        batch["sample_ids"] += step * cfg.train.global_batch_size
        batch = {k: rank_slice(v, dims.dp_rank, dims.dp).to(device) for k, v in batch.items()}
        synchronize(device)
        started = time.perf_counter()
        losses.append(trainer.train_step(step_plan(cfg, step), batch).loss)
        synchronize(device)
        times.append(time.perf_counter() - started)
    counts = {k: v - before[k] for k, v in events.metrics().items()}
    return {"losses": losses, "step_s": statistics.median(times[len(times) // 2:]), **counts}


def measure_layout(layout: str, device: torch.device, dry_run: bool, steps: int, backend: str) -> dict:
    """Compiled, then eager, in one fake process group of the layout's world size."""
    cfg = run_config(layout, dry_run, steps, True, backend)
    dims = check_layout(cfg, cfg.parallel.dp_shard * cfg.parallel.tp)
    dims.device = device
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=dims.world_size)
    try:
        dims.build_mesh()
        torch._dynamo.reset()
        comp = train(cfg, dims)
        eager = train(run_config(layout, dry_run, steps, False, backend), dims)
    finally:
        dist.destroy_process_group()
    rel = max(abs(a - b) / abs(b) for a, b in zip(comp["losses"], eager["losses"]))
    return {"parallel": LAYOUTS[layout][0], "activation_checkpointing": LAYOUTS[layout][1],
            "loss_rel": rel, "eager_step_s": eager["step_s"], "compiled_step_s": comp["step_s"],
            "speedup": eager["step_s"] / comp["step_s"], "losses_eager": eager["losses"],
            "losses_compiled": comp["losses"],
            **{k: comp[k] for k in ("compile_graphs", "compile_recompiles", "compile_backward_graphs", "compile_s")}}


def measure(device: torch.device, dry_run: bool, steps: int, backend: str, layouts: list[str]) -> dict:
    rows = {layout: measure_layout(layout, device, dry_run, steps, backend) for layout in layouts}
    cfg = run_config(layouts[0], dry_run, steps, True, backend)
    return {"device": device_name(device), "machine": machine(), "backend": backend, "steps": steps,
            "model": cfg.model.__dict__, "seq_len": cfg.train.seq_len, "batch": cfg.train.global_batch_size,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "layouts": rows}


def report(result: dict) -> str:
    lines = ["# Compiled multi-process layouts on one device (bench.compiled_layout)", "",
             f"- device: {result['device']}; {result['machine']}; backend {result['backend']}; {result['date']}",
             f"- {result['steps']} steps, global batch {result['batch']} x {result['seq_len']} tokens, layer dropout "
             "p 0.5, rotational exit loss; one process as rank 0 of a fake process group (collectives move no "
             "data): compiled vs eager of the same layout, not vs one process", "",
             "| layout | loss rel. diff compiled vs eager | graphs | recompiles | compile s | eager step s | "
             "compiled step s | speedup |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result["layouts"].items():
        lines.append(f"| {name} | {r['loss_rel']:.1e} | {r['compile_graphs']} | {r['compile_recompiles']} | "
                     f"{r['compile_s']:.1f} | {r['eager_step_s']:.4f} | {r['compiled_step_s']:.4f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager", "eager"))
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--max-loss-rel", type=float, default=1e-4, help="fail above this compiled-vs-eager difference")
    ap.add_argument("--dry-run", action="store_true", help="toy model (the CPU check of the script)")
    args = ap.parse_args(argv)
    layouts = args.layouts.split(",")
    unknown = sorted(set(layouts) - LAYOUTS.keys())
    if unknown or args.steps < 2:
        ap.error(f"--layouts {','.join(unknown)}: unknown" if unknown else "--steps must be >= 2")
    result = measure(select_device(args.device), args.dry_run, args.steps, args.backend, layouts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compiled_layout.json").write_text(json.dumps(result, indent=1))
    text = report(result)
    (RESULTS / "compiled_layout.md").write_text(text)
    print(text)
    ok = all(r["loss_rel"] <= args.max_loss_rel and r["compile_graphs"] >= 1 for r in result["layouts"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
