"""Pipeline bubble per schedule, measured, against the textbook fraction.

Two pipeline ranks (gloo, CPU, one thread each) run the LayerSkip stage forward/backward of an
8-block model for m micro-batches with GPipe, 1F1B and Interleaved1F1B (2 virtual stages per
rank). On each rank, busy time is the time spent inside the stages' forward_one_chunk /
backward_one_chunk (compute; the waits for activations and gradients are outside them), and

    measured bubble = 1 - busy / wall,   averaged over ranks (median over repeats);
    expected        = (p-1) / (m+p-1)        (GPipe, 1F1B)
                      (p-1) / (v·m+p-1)      (interleaved, v virtual stages per rank).

Point-to-point transfers count as bubble here. Early-exit loss at the final exit only and no
layer dropout, so that stages are balanced (the exit head still adds its matmul to the last stage).

    python -m bench.pipeline_bubble [--repeats 5] [--micro 2,4,8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SCHEDULES = (("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2))


def bench_config(schedule: str, virtual: int, m: int):
    from pretrain.config import RunConfig

    cfg = RunConfig()
    mc = cfg.model
    mc.vocab_size, mc.dim, mc.n_layers, mc.n_heads, mc.n_kv_heads, mc.ffn_dim, mc.max_seq_len = \
        2048, 256, 8, 8, 4, 704, 128
    cfg.train.seq_len, cfg.train.micro_batch_size, cfg.train.global_batch_size = 128, 2, 2 * m
    cfg.train.device = "cpu"
    cfg.layerskip.layer_dropout.p_max = 0.0
    cfg.layerskip.early_exit.enabled = False
    cfg.parallel.pp, cfg.parallel.pp_schedule, cfg.parallel.virtual_stages = 2, schedule, virtual
    return cfg


def worker(repeats: int, micro: list[int]) -> None:
    import torch.distributed as dist

    from bench.common import interleaved_medians, random_batch, trainer_for
    from pretrain.layerskip.plan import step_plan
    from pretrain.trainer.step import LayerSkipStep
    from parallel.mesh import teardown_parallel
    from parallel.pipeline import run_schedule
    from tests.parallel_scripts.launch import report

    cases, samples = {}, {}
    for schedule, v in SCHEDULES:
        for m in micro:
            cfg = bench_config(schedule, v, m)
            trainer = trainer_for(cfg)
            busy = [0.0]
            stages = getattr(trainer.schedule, "_stages", None) or [trainer.schedule._stage]
            for stage in stages:
                for name in ("forward_one_chunk", "backward_one_chunk"):
                    setattr(stage, name, _timed(getattr(stage, name), busy))
            batch = random_batch(cfg.model.vocab_size, cfg.train.global_batch_size, cfg.train.seq_len)
            plan = step_plan(cfg, 0)
            name = f"{schedule}/m={m}"
            samples[name] = []

            def step(trainer=trainer, batch=batch, plan=plan, busy=busy, name=name):
                step = LayerSkipStep(plan, batch["targets"].numel())
                dist.barrier()
                busy[0], start = 0.0, time.perf_counter()
                run_schedule(trainer.schedule, trainer.stages, batch, step)
                samples[name].append((busy[0], time.perf_counter() - start))
                trainer.optimizer.zero_grad()
            cases[name] = step
    interleaved_medians(cases, repeats=repeats, warmup=1)
    out = {}
    for name, pairs in samples.items():
        pairs = pairs[1:]  # drop the warm-up call
        wall = statistics.median(w for _, w in pairs)
        bubble = statistics.median(1 - b / w for b, w in pairs)
        t = torch.tensor([bubble, wall], dtype=torch.float64)
        dist.all_reduce(t)
        out[name] = {"bubble": float(t[0]) / dist.get_world_size(), "step_s": float(t[1]) / dist.get_world_size()}
    if dist.get_rank() == 0:
        report(out)
    teardown_parallel()


def _timed(fn, acc: list[float]):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - start
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--micro", default="2,4,8")
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    micro = [int(x) for x in args.micro.split(",")]
    if args.worker:
        worker(args.repeats, micro)
        return
    from bench.common import record
    from tests.parallel_scripts.launch import results, torchrun_stdout

    measured = results(torchrun_stdout(2, ["-m", "bench.pipeline_bubble", "--worker", "--repeats", str(args.repeats),
                                           "--micro", args.micro], timeout=3600))[0]
    p, rows = 2, []
    for schedule, v in SCHEDULES:
        for m in micro:
            r = measured[f"{schedule}/m={m}"]
            expected = (p - 1) / (v * m + p - 1)
            r.update(schedule=schedule, micro_batches=m, virtual_stages=v, expected=expected)
            rows.append(r)
    table = ["| schedule | p | v | m | measured bubble | expected (p-1)/(v·m+p-1) | step (s) |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| {r['schedule']} | {p} | {r['virtual_stages']} | {r['micro_batches']} | {r['bubble']:.3f} | "
              f"{r['expected']:.3f} | {r['step_s']:.3f} |" for r in rows]
    table.append("\nBubble = 1 - (time in stage forward/backward) / (schedule wall time), mean of the two "
                 "ranks, median of the repeats; p2p transfer time counts as bubble. 8 blocks, dim 256, "
                 "seq 128, micro-batch 2, vocab 2048, one thread per rank.")
    record("pipeline_bubble", "Pipeline bubble per schedule (2 ranks, CPU gloo)",
           {"pp": p, "rows": rows, "repeats": args.repeats}, "\n".join(table))


if __name__ == "__main__":
    main()
