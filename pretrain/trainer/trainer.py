"""The trainer, one for every layout (world size 1 included): the model split into parts (one,
or one per pipeline stage held here), each wrapped by parallel.parallelize; one optimizer per
part; and `train_step(plan, batch)`, which runs the LayerSkip step (pretrain/trainer/step.py)
over the micro-batches - by a plain loop, or by the pipeline schedule - and returns losses and
counts reduced over all ranks, so every rank holds the global values.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from pretrain.config import RunConfig
from pretrain.layerskip.plan import StepPlan
from pretrain.model import LayerSkipTransformer
from pretrain.operations.compile_events import compile_events
from pretrain.trainer.build import OptimizerParts, build_optimizer
from pretrain.trainer.step import LayerSkipStep, StepResult, count_step_tokens, split_micro_batches
from parallel.consolidate import consolidated_model
from parallel.dims import ParallelDims
from parallel.fsdp import set_gradient_sync
from parallel.grad_sync import clip_grad_norm_global, finalize_gradients
from parallel.parallelize import ParallelizeSettings, parallelize
from parallel.pipeline import build_schedule, run_schedule
from parallel.stage import split_into_stages, stages_of_rank


class Trainer:
    def __init__(self, cfg: RunConfig, dims: ParallelDims, model: LayerSkipTransformer):
        self.cfg, self.dims = cfg, dims
        tr = cfg.train
        settings = ParallelizeSettings(activation_checkpointing=tr.activation_checkpointing, compile=tr.compile,
                                       compile_backend=tr.compile_backend)
        self.stages = split_into_stages(model.to(dims.device), dims.num_stages,
                                        stages_of_rank(dims.pp_rank, dims.pp, dims.virtual_stages), seq_shards=dims.tp)
        self.model_parts: list[nn.Module] = [parallelize(part, dims, settings) for _, part in self.stages]
        if tr.compile:
            compile_events()   # counting from the first compilation (metrics, hang watchdog)
        self.optimizer = OptimizerParts([build_optimizer(cfg, part, dims.device) for part in self.model_parts])
        self.schedule = None
        if dims.pp > 1:
            micro_batch = tr.global_batch_size // dims.dp // dims.microbatches
            self.schedule = build_schedule(self.stages, dims, micro_batch=micro_batch, seq_len=tr.seq_len)
        # Called with the global loss and gradient norm before the optimizer step; False skips it.
        self.apply_update: Callable[[float, float], bool] = lambda loss, grad_norm: True

    @property
    def optimizer_parts(self) -> list[torch.optim.Optimizer]:
        return self.optimizer.parts

    def _all_reduce(self, t: torch.Tensor, *groups) -> torch.Tensor:
        for group in groups:
            if group is not None:
                dist.all_reduce(t, group=group)
        return t

    def all_reduce_max(self, values: list[float]) -> list[float]:
        """Element-wise max of `values` over the whole world (identity with one process)."""
        if not dist.is_initialized():
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.dims.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def train_step(self, plan: StepPlan, batch: dict[str, torch.Tensor]) -> StepResult:
        cfg, dims = self.cfg, self.dims
        count = torch.tensor([count_step_tokens(batch)], dtype=torch.float64, device=dims.device)
        step_tokens = int(self._all_reduce(count, dims.dp_group).item())
        step = LayerSkipStep(plan, step_tokens, dtype=cfg.train.dtype,
                             checkpoint_heads=cfg.layerskip.early_exit.checkpoint_heads,
                             chunk_tokens=cfg.layerskip.early_exit.loss_chunk_tokens)
        with loss_parallel() if dims.tp > 1 else contextlib.nullcontext():
            if self.schedule is not None:
                run_schedule(self.schedule, self.stages, batch, step)
            else:
                part = self.model_parts[0]
                micros = split_micro_batches(batch, cfg.train.micro_batch_size)
                for i, micro in enumerate(micros):
                    set_gradient_sync(part, i == len(micros) - 1, cfg.parallel.fsdp_reduce_every_micro_batch)
                    part(micro["tokens"], step=step, targets=micro["targets"],
                         sample_ids=micro["sample_ids"]).backward()
        finalize_gradients(self.model_parts, dims.pp_group)
        grad_norm = clip_grad_norm_global(self.model_parts, cfg.optim.grad_clip, dims.pp_group)
        result = self._result(plan, step, grad_norm)
        result.skipped = not self.apply_update(result.loss, grad_norm)
        if not result.skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def _result(self, plan: StepPlan, step: LayerSkipStep, grad_norm: float) -> StepResult:
        """Per-exit losses and block-rows run, summed over stages (pp) and data-parallel ranks;
        tensor-parallel ranks already agree."""
        L = self.model_parts[0].cfg.n_layers
        vec = torch.zeros(L + 1, dtype=torch.float64, device=self.dims.device)
        for layer, value in step.exit_sums.items():
            vec[layer - 1] += value.to(torch.float64)
        vec[L] += step.rows_run
        values = self._all_reduce(vec, self.dims.pp_group, self.dims.dp_group).tolist()
        exit_losses = {l: values[l - 1] for l in sorted(plan.exit_weights)}
        loss = sum(plan.exit_weights[l] * v for l, v in exit_losses.items())
        return StepResult(loss=loss, exit_losses=exit_losses, grad_norm=grad_norm, tokens=step.step_tokens,
                          rows_run=int(values[L]), rows_total=self.cfg.train.global_batch_size * L)

    def evaluation_model(self) -> nn.Module | None:
        """The whole model on rank 0 (gathered there under a parallel layout; None on the other
        ranks, which must call too)."""
        if not self.dims.distributed:
            return self.model_parts[0]
        return consolidated_model(self.model_parts, self.dims, self.dims.device)

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
