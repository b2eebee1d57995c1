"""The distributed training step: the model split and sharded per the layout, one optimizer per
model part, and `train_step(plan, batch)` returning the same StepResult as the single-process
step (losses and counts reduced over all ranks, so every rank holds the global values).

Order of wrapping per part: tensor parallel -> activation checkpointing -> FSDP.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from pretrain.config import RunConfig
from pretrain.layerskip.plan import StepPlan
from pretrain.model import LayerSkipTransformer
from pretrain.trainer.build import build_optimizer
from pretrain.trainer.step import StepResult, count_step_tokens, materialize_missing_grads, split_micro_batches
from parallel.fsdp import apply_fsdp, set_gradient_sync
from parallel.grad_sync import clip_grad_norm_global, reduce_exit_head_grads, reduce_tied_embedding_grads
from parallel.mesh import ParallelContext
from parallel.parallelize import apply_activation_checkpointing
from parallel.pipeline import build_schedule, run_schedule, split_into_stages
from parallel.stage import StepState, as_stage
from parallel.tensor_parallel import apply_tensor_parallel


class OptimizerParts:
    """One optimizer per model part (pipeline stage), stepped together; checkpoints address
    each through its own part so parameter names match the single model's."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.parts = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.parts for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)


class ParallelTrainer:
    def __init__(self, cfg: RunConfig, ctx: ParallelContext, model: LayerSkipTransformer):
        self.cfg, self.ctx, self.layout = cfg, ctx, ctx.layout
        device = ctx.device
        tp = self.layout.tp
        model = model.to(device)
        if self.layout.pp > 1:
            self.stages = split_into_stages(model, self.layout, ctx.pp_rank, seq_shards=tp)
        else:
            L = model.cfg.n_layers
            self.stages = [(0, as_stage(model, 0, L, seq_shards=tp))]
        self.parts = [module for _, module in self.stages]
        for part in self.parts:
            if tp > 1:
                apply_tensor_parallel(part, ctx.tp_mesh)
            if cfg.train.activation_checkpointing:
                apply_activation_checkpointing(part)
            if self.layout.dp > 1:
                # Under pipelining, weights stay gathered from forward to backward (each
                # micro-batch would otherwise all-gather them twice); the schedule reshards.
                apply_fsdp(part, ctx.dp_mesh, reshard_after_forward=self.layout.pp == 1)
                part.dummy_row_for_empty = True
        self.optimizer = OptimizerParts([build_optimizer(cfg, part, device) for part in self.parts])
        self.schedule = None
        if self.layout.pp > 1:
            local_batch = cfg.train.global_batch_size // self.layout.dp
            self.schedule = build_schedule(self.stages, self.layout, device=device, pp_group=ctx.pp_group,
                                           micro_batch=local_batch // self.layout.microbatches,
                                           seq_len=cfg.train.seq_len, dim=model.cfg.dim, seq_shards=tp)

    @property
    def has_first_stage(self) -> bool:
        return any(i == 0 for i, _ in self.stages)

    @property
    def has_last_stage(self) -> bool:
        return any(m.is_last_stage for _, m in self.stages)

    def _all_reduce(self, t: torch.Tensor, *groups) -> torch.Tensor:
        for group in groups:
            if group is not None:
                dist.all_reduce(t, group=group)
        return t

    def global_token_count(self, batch: dict[str, torch.Tensor]) -> int:
        count = torch.tensor([count_step_tokens(batch)], dtype=torch.float64, device=self.ctx.device)
        return int(self._all_reduce(count, self.ctx.dp_group).item())

    def _accumulate(self, batch: dict[str, torch.Tensor]) -> None:
        model = self.parts[0]
        micros = split_micro_batches(batch, self.cfg.train.micro_batch_size)
        for i, micro in enumerate(micros):
            set_gradient_sync(model, i == len(micros) - 1)
            loss = model(micro["tokens"], targets=micro["targets"], sample_ids=micro["sample_ids"])
            loss.backward()

    def train_step(self, plan: StepPlan, batch: dict[str, torch.Tensor]) -> StepResult:
        cfg, ctx = self.cfg, self.ctx
        step_tokens = self.global_token_count(batch)
        for part in self.parts:
            part.step_state = StepState(plan=plan, step_tokens=step_tokens, dtype=cfg.train.dtype,
                                        checkpoint_heads=cfg.layerskip.early_exit.checkpoint_heads,
                                        chunk_tokens=cfg.layerskip.early_exit.loss_chunk_tokens)
        with loss_parallel() if self.layout.tp > 1 else contextlib.nullcontext():
            if self.schedule is not None:
                run_schedule(self.schedule, batch, has_first=self.has_first_stage, has_last=self.has_last_stage)
            else:
                self._accumulate(batch)
        with torch.no_grad():
            for part in self.parts:
                materialize_missing_grads(part)
            if self.layout.pp > 1:
                reduce_exit_head_grads(self.parts, ctx.pp_group)
                reduce_tied_embedding_grads(self.parts, ctx.pp_group)
        grad_norm = clip_grad_norm_global(self.parts, cfg.optim.grad_clip, ctx.pp_group)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._result(plan, step_tokens, grad_norm, global_rows=cfg.train.global_batch_size)

    def _result(self, plan: StepPlan, step_tokens: int, grad_norm: float, global_rows: int) -> StepResult:
        """Per-exit losses and block-rows run, summed over stages (pp) and data-parallel ranks;
        tensor-parallel ranks already agree."""
        L = self.parts[0].cfg.n_layers
        vec = torch.zeros(L + 1, dtype=torch.float64, device=self.ctx.device)
        for part in self.parts:
            st = part.step_state
            for layer, value in st.exit_sums.items():
                vec[layer - 1] += value.to(torch.float64)
            vec[L] += st.rows_run
            part.step_state = None
        self._all_reduce(vec, self.ctx.pp_group, self.ctx.dp_group)
        values = vec.tolist()
        exit_losses = {l: values[l - 1] for l in sorted(plan.exit_weights)}
        loss = sum(plan.exit_weights[l] * v for l, v in exit_losses.items())
        return StepResult(loss=loss, exit_losses=exit_losses, grad_norm=grad_norm, tokens=step_tokens,
                          rows_run=int(values[L]), rows_total=global_rows * L)
