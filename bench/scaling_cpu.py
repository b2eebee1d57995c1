"""Step time against the number of ranks and the layout, CPU gloo (strong scaling: one global
batch of 16 x 128 tokens, LayerSkip on: p_max 0.2, rotational early-exit loss).

Each rank runs one thread, so up to the machine's core count ranks add compute; beyond it they
time-share the cores and the numbers show the cost of oversubscription and communication only.

    python -m bench.scaling_cpu [--repeats 5] [--steps-layouts ...]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

# world size -> layouts (ParallelConfig fields)
LAYOUTS = {
    1: {"single": {}},
    # DP2 reduce-scatters each of its 2 micro-batches (sharded accumulation, the default); "once a
    # step" is parallel.fsdp_reduce_every_micro_batch=false, side by side for its cost
    2: {"DP2": {"dp_shard": 2}, "DP2, one reduction a step": {"dp_shard": 2, "fsdp_reduce_every_micro_batch": False},
        "TP2": {"tp": 2}, "PP2 1F1B": {"pp": 2}},
    4: {"DP4": {"dp_shard": 4}, "TP2xDP2": {"tp": 2, "dp_shard": 2}, "PP2xDP2": {"pp": 2, "dp_shard": 2}},
    8: {"PP2xDP2xTP2": {"pp": 2, "dp_shard": 2, "tp": 2}},
}


def bench_config(parallel: dict):
    from pretrain.config import RunConfig

    cfg = RunConfig()
    mc = cfg.model
    mc.vocab_size, mc.dim, mc.n_layers, mc.n_heads, mc.n_kv_heads, mc.ffn_dim, mc.max_seq_len = \
        4096, 256, 8, 8, 4, 704, 128
    tr = cfg.train
    tr.seq_len, tr.global_batch_size, tr.micro_batch_size, tr.device, tr.steps = 128, 16, 4, "cpu", 100
    cfg.layerskip.layer_dropout.p_max, cfg.layerskip.layer_dropout.time_scale = 0.2, "constant"
    cfg.layerskip.early_exit.curriculum, cfg.layerskip.early_exit.rotation_period = "rotational", 2
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


def worker(world: int, repeats: int) -> None:
    import torch.distributed as dist

    from bench.common import interleaved_medians, random_batch, trainer_for
    from pretrain.data.loader import rank_slice
    from pretrain.layerskip.plan import step_plan
    from parallel.mesh import teardown_parallel
    from tests.parallel_scripts.launch import report

    cases, times = {}, {}
    for name, parallel in LAYOUTS[world].items():
        cfg = bench_config(parallel)
        trainer = trainer_for(cfg)
        full = random_batch(cfg.model.vocab_size, cfg.train.global_batch_size, cfg.train.seq_len)
        batch = {k: rank_slice(v, trainer.dims.dp_rank, trainer.dims.dp) for k, v in full.items()}
        times[name] = []
        counter = [0]

        def step(trainer=trainer, batch=batch, cfg=cfg, name=name, counter=counter):
            if dist.is_initialized():
                dist.barrier()
            start = time.perf_counter()
            trainer.train_step(step_plan(cfg, counter[0]), batch)
            times[name].append(time.perf_counter() - start)
            counter[0] += 1
        cases[name] = step
    interleaved_medians(cases, repeats=repeats, warmup=1)
    out = {}
    for name, ts in times.items():
        t = torch.tensor([statistics.median(ts[1:])], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out[name] = float(t[0])
    if not dist.is_initialized() or dist.get_rank() == 0:
        report(out)
    teardown_parallel()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--worlds", default="1,2,4,8")
    ap.add_argument("--worker", type=int, default=0)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.repeats)
        return
    from bench.common import record
    from tests.parallel_scripts.launch import results, torchrun_stdout

    rows, tokens = [], 16 * 128
    for world in (int(w) for w in args.worlds.split(",")):
        measured = results(torchrun_stdout(world, ["-m", "bench.scaling_cpu", "--worker", str(world),
                                                   "--repeats", str(args.repeats)], timeout=3600))[0]
        for name, seconds in measured.items():
            rows.append({"layout": name, "ranks": world, "step_s": seconds, "tokens_per_s": tokens / seconds})
    base = rows[0]["step_s"]
    cores = os.cpu_count()
    table = ["| layout | ranks | step (s) | tokens/s | speedup vs 1 rank |", "|---|---|---|---|---|"]
    table += [f"| {r['layout']} | {r['ranks']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{base / r['step_s']:.2f}x{' (oversubscribed)' if r['ranks'] > cores else ''} |" for r in rows]
    table.append(f"\nOne thread per rank on {cores} cores; step = optimizer step of the whole global batch "
                 "(slowest rank, median of the repeats); 8 blocks, dim 256, vocab 4096, global batch 16x128, "
                 "micro-batch 4, LayerSkip p_max 0.2 + rotational exits.")
    record("scaling_cpu", "Step time vs ranks, CPU gloo", {"rows": rows, "cores": cores, "repeats": args.repeats},
           "\n".join(table))


if __name__ == "__main__":
    main()
