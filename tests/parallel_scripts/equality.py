"""Run several parallel layouts of one world size in a single torchrun launch and compare each
(the Trainer) with a one-process reference step written without the trainer (common.reference_step):
loss and per-exit losses at every step, final parameters, and the pipeline's exit-head replicas.

    torchrun --nproc-per-node 2 tests/parallel_scripts/equality.py tp=2 pp=2,pp_schedule=1F1B ...

Each argument is one layout: comma-separated ParallelConfig fields (plus tie=1, p_max=0.9,
global_batch=N, micro_batch=N, steps=N, eps=X (Adam), ac=1 (activation checkpointing),
ckpt_heads=1 (recomputed exit heads), compile=1 (train.compile), backend=NAME (its backend), chunk=N
(layerskip.early_exit.loss_chunk_tokens)).
"""
from __future__ import annotations

import faulthandler
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from common import (fresh_model, global_batch, lr_at, max_rel, rank_batch, reference_run, report,
                    tiny_config)
from pretrain.config import check_layout
from pretrain.layerskip.plan import step_plan
from pretrain.operations.compile_events import compile_events
from pretrain.trainer.trainer import Trainer
from parallel.consolidate import consolidated_model, full_state_dict
from parallel.grad_sync import check_replicas_identical
from parallel.mesh import init_process_group, teardown_parallel

CFG_KEYS = {"tie": ("tie", lambda v: bool(int(v))), "p_max": ("p_max", float),
            "global_batch": ("global_batch", int), "micro_batch": ("micro_batch", int), "steps": ("steps", int),
            "eps": ("adam_eps", float), "ac": ("activation_checkpointing", lambda v: bool(int(v))),
            "ckpt_heads": ("checkpoint_heads", lambda v: bool(int(v))), "export": ("export", lambda v: bool(int(v))),
            "compile": ("compile", lambda v: bool(int(v))), "chunk": ("loss_chunk_tokens", int),
            "backend": ("compile_backend", str)}


def parse(spec: str) -> tuple[dict, dict]:
    cfg_kwargs, parallel = {}, {}
    for item in spec.split(","):
        key, value = item.split("=")
        if key in CFG_KEYS:
            name, conv = CFG_KEYS[key]
            cfg_kwargs[name] = conv(value)
        else:
            parallel[key] = value if key == "pp_schedule" else int(value)
    return cfg_kwargs, parallel


def run_layout(spec: str, references: dict) -> dict:
    cfg_kwargs, parallel = parse(spec)
    export = cfg_kwargs.pop("export", False)
    cfg = tiny_config(**cfg_kwargs, **parallel)
    ref_key = tuple(sorted((k, v) for k, v in cfg_kwargs.items()
                           if k not in ("activation_checkpointing", "checkpoint_heads", "compile", "loss_chunk_tokens",
                                        "compile_backend")))
    if ref_key not in references:
        references[ref_key] = reference_run(tiny_config(**cfg_kwargs))
    ref_losses, ref_exits, ref_state = references[ref_key]
    dims = check_layout(cfg, dist.get_world_size())
    dims.build_mesh()
    if cfg.train.compile:
        torch._dynamo.reset()  # this layout's compilations counted from zero
    compiles = compile_events()
    before = dict(compiles.metrics())
    trainer = Trainer(cfg, dims, fresh_model(cfg))
    worst_loss, worst_exit, rows = 0.0, 0.0, []
    started = time.perf_counter()
    for step in range(cfg.train.steps):
        trainer.optimizer.set_learning_rate(lr_at(cfg, step))
        batch = rank_batch(global_batch(cfg, step), dims.dp_rank, dims.dp)
        result = trainer.train_step(step_plan(cfg, step), batch)
        worst_loss = max(worst_loss, max_rel(result.loss, ref_losses[step]))
        assert sorted(result.exit_losses) == sorted(ref_exits[step]), (result.exit_losses, ref_exits[step])
        for layer, value in result.exit_losses.items():
            worst_exit = max(worst_exit, max_rel(value, ref_exits[step][layer]))
        rows.append(result.rows_run / result.rows_total)
    seconds = (time.perf_counter() - started) / cfg.train.steps
    replica_gap = check_replicas_identical(trainer.model_parts, dims.pp_group) if dims.pp > 1 else 0.0
    state = full_state_dict(trainer.model_parts, dims)
    if export and state is None:
        export_hf(trainer, dims, "/nonexistent")  # collective: every rank takes part
    out = {"layout": spec, "loss_rel": worst_loss, "exit_rel": worst_exit, "replica_gap": replica_gap,
           "blocks_run_fraction": rows, "step_s": seconds,
           **{k: v - before[k] for k, v in compiles.metrics().items()}}
    if state is not None:
        assert sorted(state) == sorted(ref_state), (sorted(state), sorted(ref_state))
        out["param_abs"] = max(float((state[k] - ref_state[k]).abs().max()) for k in ref_state)
        if export:  # to the HF layout from this layout; read back, the weights are the gathered ones
            out["export_abs"] = exported_gap(trainer, dims, state)
        if os.environ.get("DEBUG_PARAMS"):
            out["per_param"] = {k: float((state[k] - ref_state[k]).abs().max()) for k in ref_state}
    return out


def export_hf(trainer, dims, out_dir: str) -> None:
    """The model gathered on rank 0 (all ranks take part), written in the HF layout there."""
    from pretrain.hf_interop import save_hf_checkpoint

    model = consolidated_model(trainer.model_parts, dims)
    if model is not None:
        save_hf_checkpoint(model, out_dir)
    dist.barrier()


def exported_gap(trainer, dims, state: dict) -> float:
    from pretrain.hf_interop import load_hf_checkpoint

    with tempfile.TemporaryDirectory() as out:
        export_hf(trainer, dims, out)
        model, _ = load_hf_checkpoint(out)
        return max(float((v - state[k]).abs().max()) for k, v in model.state_dict().items() if k in state)


def main(specs: list[str]) -> None:
    if os.environ.get("HANG_DUMP"):  # debugging a hang: dump every rank's stack after N seconds
        faulthandler.dump_traceback_later(int(os.environ["HANG_DUMP"]), exit=True)
    init_process_group(torch.device("cpu"))
    references: dict = {}
    for spec in specs:
        out = run_layout(spec, references)
        if dist.get_rank() == 0:
            report(out)
    teardown_parallel()  # behind a barrier


if __name__ == "__main__":
    main(sys.argv[1:])
