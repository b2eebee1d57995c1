"""A plan's report: what each simulated rank holds at its peak, whether that fits the device, and
the predicted step time - as a dict (the JSON) and as text."""
from __future__ import annotations

import dataclasses

from pretrain.config import RunConfig
from pretrain.plan.devices import GIB, Device
from pretrain.plan.estimate import Throughput
from pretrain.plan.memory import RankMemory
from parallel.dims import ParallelDims


def layout_of(cfg: RunConfig, dims: ParallelDims) -> dict:
    return {"tp": dims.tp, "pp": dims.pp, "dp_shard": dims.dp_shard, "dp_replicate": dims.dp_replicate,
            "pp_schedule": dims.pp_schedule if dims.pp > 1 else None,
            "microbatches": dims.microbatches if dims.pp > 1 else None,
            "virtual_stages": dims.virtual_stages, "micro_batch_size": cfg.train.micro_batch_size,
            "activation_checkpointing": cfg.train.activation_checkpointing,
            "loss_chunk_tokens": cfg.layerskip.early_exit.loss_chunk_tokens}


def rank_row(r: RankMemory, usable: int) -> dict:
    k = r.memory.by_kind
    return {"rank": r.rank, "pp_rank": r.pp_rank, "stages": r.stages, "parameters": k["Parameter"],
            "gradients": k["Gradient"], "optimizer_state": k["Optstate"], "activations": k["Activation"],
            "temporaries": k["Temp"], "buffers_other": k["Buffer"] + k["Other"], "exit_logits": r.exit_logits,
            "in_flight_micro_batches": r.in_flight, "peak": r.memory.peak, "fits": r.memory.peak <= usable}


def build_report(cfg: RunConfig, dims: ParallelDims, device: Device, margin: float, step: int, exits_on: int,
                 ranks: list[RankMemory], throughput: Throughput, mfu: float) -> dict:
    usable = int(device.memory_bytes * (1 - margin))
    rows = [rank_row(r, usable) for r in ranks]
    return {"world_size": dims.world_size, "device": dataclasses.asdict(device), "memory_margin": margin,
            "usable_bytes": usable, "layout": layout_of(cfg, dims), "dtype": cfg.train.dtype,
            "model": {"n_layers": cfg.model.n_layers, "dim": cfg.model.dim, "vocab_size": cfg.model.vocab_size,
                      "params": cfg.model.num_params()},
            "global_batch_size": cfg.train.global_batch_size, "seq_len": cfg.train.seq_len,
            "worst_step": step, "exits_on": exits_on, "ranks": rows,
            "peak": max(r["peak"] for r in rows), "fits": all(r["fits"] for r in rows),
            "plan_mfu": mfu, "throughput": dataclasses.asdict(throughput)}


def _gib(n: int | None) -> str:
    """GiB with two decimals; small values in MiB (a tiny model's report stays readable)."""
    if n is None:
        return "-"
    return f"{n / GIB:.2f}" if abs(n) >= GIB / 100 or n == 0 else f"{n / GIB * 1024:.2f} MiB"


def format_report(rep: dict) -> str:
    lay, dev, tp = rep["layout"], rep["device"], rep["throughput"]
    pp = (f" pp={lay['pp']} ({lay['pp_schedule']}, {lay['microbatches']} micro-batches, "
          f"{lay['virtual_stages']} stage(s)/rank)" if lay["pp"] > 1 else " pp=1")
    lines = [
        f"layout: world {rep['world_size']} = dp_replicate={lay['dp_replicate']} dp_shard={lay['dp_shard']} "
        f"tp={lay['tp']}{pp}; micro_batch_size={lay['micro_batch_size']}, activation_checkpointing="
        f"{lay['activation_checkpointing']}, loss_chunk_tokens={lay['loss_chunk_tokens']}, {rep['dtype']}",
        f"worst case simulated: step {rep['worst_step']} ({rep['exits_on']} exits on), layer dropout off "
        f"(nothing dropped); one fake training step per rank below (fake tensors, fake process group)",
        f"device: {dev['name']} {dev['memory_gib']:.0f} GiB, usable {_gib(rep['usable_bytes'])} GiB "
        f"(margin {rep['memory_margin']:.0%})", "",
        "| rank | pp stage(s) | params | grads | optim | activations | temps | exit logits | in-flight mb "
        "| peak GiB | fits |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["ranks"]:
        lines.append(f"| {r['rank']} | {','.join(map(str, r['stages']))} | {_gib(r['parameters'])} | "
                     f"{_gib(r['gradients'])} | {_gib(r['optimizer_state'])} | {_gib(r['activations'])} | "
                     f"{_gib(r['temporaries'])} | {_gib(r['exit_logits'])} | {r['in_flight_micro_batches']} | "
                     f"{_gib(r['peak'])} | {'yes' if r['fits'] else 'NO'} |")
    lines += ["", "(GiB; peak = live tensor bytes at the step's high point; 'exit logits' = peak minus the same "
              "step with the final exit only, what LayerSkip's early exits add on that rank)",
              f"predicted: {tp['step_s']:.3g} s/step, {tp['tokens_per_s']:,.0f} tokens/s "
              f"({tp['tokens_per_s'] / rep['world_size']:,.0f} per device) at plan.mfu={rep['plan_mfu']:.2f} "
              f"(pipeline bubble {tp['bubble']:.1%}, effective MFU {tp['mfu']:.1%}); "
              f"{'FITS' if rep['fits'] else 'DOES NOT FIT'} on {dev['name']}"]
    return "\n".join(lines)
