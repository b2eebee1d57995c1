"""MFU of a LayerSkip training step on one device, and throughput with LayerSkip vs without
(issue: 3-D parallel training, item 9), side by side in one run on one model and optimizer:

    python -m bench.mfu model=llama_1b train.seq_len=2048 train.global_batch_size=8 \\
        train.micro_batch_size=2 train.dtype=bfloat16 train.peak_flops=989e12 train.compile=true

Arguments are Hydra overrides of conf/ (the trainer's own configuration and code path:
parallelize, fused AdamW, autocast, compile, activation checkpointing as configured), plus
--repeats N and --dry-run (print, do not write bench/results). Cases, steps interleaved:
  layerskip  the configured layerskip group (default: continual, S(t) = 1) at steps spread over
             the run, so the dropout draws and the rotating exits vary;
  plain      the same model with no layer dropout and the final exit only.
Per case: median step time, tokens/s, TFLOP/s executed (dropped block rows left out, the head
counted at every exit that is on: pretrain.metrics.flops) and MFU = that / train.peak_flops.
Random tokens: the data pipeline is not what is measured (no data is read, so a model whose
model.vocab_size is auto gets Llama 3's 128,256; set model.vocab_size=N for another).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from bench.common import random_batch, record, trainer_for
from pretrain.config import compose_run_config
from pretrain.device import synchronize
from pretrain.layerskip.plan import StepPlan, step_plan
from pretrain.metrics.flops import mfu, step_flops
from pretrain.model.config import VOCAB_AUTO
from pretrain.trainer.preflight import init_model_config


AUTO_VOCAB = 128256  # no data to take the vocabulary from: Llama 3's tokenizer (llama_1b's shape)


def load_config(overrides: list[str], vocab_size: int = AUTO_VOCAB):
    cfg = init_model_config(compose_run_config(["layerskip=continual", *overrides])[0])
    if cfg.model.vocab_size == VOCAB_AUTO:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
    return cfg


def plain_plan(step: int, num_layers: int) -> StepPlan:
    return StepPlan(step=step, drop_rates=(0.0,) * num_layers, exit_weights={num_layers: 1.0}, dropout_seed=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dry-run", action="store_true")
    args, overrides = ap.parse_known_args()
    cfg = load_config(overrides)
    trainer = trainer_for(cfg)
    device, tr, L = trainer.dims.device, cfg.train, cfg.model.n_layers
    batch = random_batch(cfg.model.vocab_size, tr.global_batch_size, tr.seq_len, device=device)
    # steps spread over the run: S(t) and the curriculum as they are mid-training
    spread = [tr.steps // 2 + i for i in range(args.repeats + 1)]
    cases = {"layerskip": lambda i: step_plan(cfg, spread[i]), "plain": lambda i: plain_plan(spread[i], L)}
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    flops: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(args.repeats + 1):           # repeat 0 warms up (compile, allocator)
        for name, make_plan in cases.items():
            plan = make_plan(i)
            synchronize(device)
            started = time.perf_counter()
            result = trainer.train_step(plan, batch)
            synchronize(device)
            if i:
                seconds[name].append(time.perf_counter() - started)
                flops[name].append(step_flops(cfg.model, tr.seq_len, result.rows_run,
                                              tr.global_batch_size * len(plan.exit_weights)))
    rows, payload = [], {"overrides": overrides, "repeats": args.repeats, "cases": {}}
    for name in cases:
        t = statistics.median(seconds[name])
        f = statistics.median(flops[name])
        util = mfu(f, t, tr.peak_flops, 1)
        payload["cases"][name] = {"step_s": t, "tokens_per_s": tr.global_batch_size * tr.seq_len / t,
                                  "tflops_per_s": f / t / 1e12, "mfu": util}
        rows.append(f"| {name} | {t:.4f} | {tr.global_batch_size * tr.seq_len / t:,.0f} | {f / t / 1e12:.3g} | "
                    + (f"{util:.1%}" if util is not None else "(set train.peak_flops)") + " |")
    speed = payload["cases"]["plain"]["step_s"] / payload["cases"]["layerskip"]["step_s"]
    n_params = cfg.model.num_params()
    table = "\n".join([
        f"Model: {L} layers, dim {cfg.model.dim}, vocab {cfg.model.vocab_size} ({n_params / 1e6:,.0f} M parameters); "
        f"batch {tr.global_batch_size} x seq {tr.seq_len}, micro-batch {tr.micro_batch_size}, {tr.dtype}, "
        f"compile={tr.compile}, activation checkpointing={tr.activation_checkpointing}; layer dropout "
        f"p_max={cfg.layerskip.layer_dropout.p_max} ({cfg.layerskip.layer_dropout.depth_scale}), exits "
        f"{cfg.layerskip.early_exit.curriculum}; median of {args.repeats} interleaved steps.", "",
        "| case | step s | tokens/s | TFLOP/s executed | MFU |", "|---|---|---|---|---|", *rows, "",
        f"layerskip / plain throughput: **{speed:.2f}x**"])
    if args.dry_run:
        print(table)
    else:
        record("mfu", "MFU and LayerSkip vs plain throughput, one device", {**payload, "speed_ratio": speed}, table)


if __name__ == "__main__":
    main()
