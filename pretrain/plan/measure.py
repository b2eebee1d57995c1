"""The real counterpart of a plan: one tracked training step of the same worst case (layer dropout
off, the curriculum's step with the most exits on, the simulated number of micro-batches) on real
tensors, every process printing 'RESULT {json}' with its rank's peak as pretrain/plan/memory.py
defines it, and on an accelerator also the allocator's peak (torch's max_memory_allocated over the
tracked step).

    torchrun --nproc-per-node N -m pretrain.plan.measure <the training run's overrides>
"""
from __future__ import annotations

import json
import sys

import torch

from pretrain.config import check_layout
from pretrain.plan.config import planned_run_config
from pretrain.device import peak_memory_allocated, reset_peak_memory, select_device, synchronize
from pretrain.layerskip.plan import step_plan
from pretrain.model import LayerSkipTransformer
from pretrain.plan.memory import random_batch, tracked_step, warm_optimizer_state
from pretrain.plan.simulate import fewer_micro_batches, worst_case_config, worst_exit_step
from pretrain.trainer.trainer import Trainer
from parallel.mesh import launched_world_size, local_rank, setup_parallel, teardown_parallel


def measure(overrides: list[str]) -> dict:
    cfg = planned_run_config(overrides)
    world = launched_world_size()
    step, _ = worst_exit_step(cfg)
    cfg = fewer_micro_batches(worst_case_config(cfg), world)
    dims = check_layout(cfg, world)
    dims.device = select_device(cfg.train.device, local_rank())
    setup_parallel(dims)
    try:
        local = cfg.train.global_batch_size // dims.dp
        batch = random_batch(cfg.model.vocab_size, local, cfg.train.seq_len, dims.dp_rank * local, dims.device)
        torch.manual_seed(cfg.train.seed)
        trainer = Trainer(cfg, dims, LayerSkipTransformer(cfg.model))
        warm_optimizer_state(trainer.model_parts, trainer.optimizer_parts)
        synchronize(dims.device)
        reset_peak_memory(dims.device)
        memory = tracked_step(trainer, step_plan(cfg, step), batch, warm=False)
        synchronize(dims.device)
        return {"rank": dims.rank, "peak": memory.peak, "by_kind": memory.by_kind,
                "allocator_peak": peak_memory_allocated(dims.device), "device": str(dims.device)}
    finally:
        teardown_parallel()


if __name__ == "__main__":
    print("RESULT " + json.dumps(measure(sys.argv[1:])), flush=True)
