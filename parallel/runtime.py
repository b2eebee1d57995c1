"""What the training loop holds, the same for one process and for any parallel layout: the model
parts (one, or one per pipeline stage held here), their optimizers, the step, and the model to
evaluate. `build_trainer` picks the single-process trainer or the distributed one from the
ParallelContext that `setup_parallel` returned.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import RunConfig
from pretrain.layerskip.plan import StepPlan
from pretrain.model import LayerSkipTransformer
from pretrain.trainer.build import build_optimizer
from pretrain.trainer.step import StepResult, count_step_tokens, train_step
from parallel.consolidate import consolidated_model
from parallel.engine import ParallelTrainer
from parallel.mesh import ParallelContext
from parallel.parallelize import parallelize


class SingleProcessTrainer:
    """The plain trainer (activation checkpointing / compile as configured)."""

    def __init__(self, cfg: RunConfig, model: LayerSkipTransformer, device: torch.device):
        self.cfg = cfg
        self.model = parallelize(model, cfg)
        self.optimizer = build_optimizer(cfg, self.model, device)

    @property
    def model_parts(self) -> list[nn.Module]:
        return [self.model]

    @property
    def optimizer_parts(self) -> list[torch.optim.Optimizer]:
        return [self.optimizer]

    def train_step(self, plan: StepPlan, batch: dict[str, torch.Tensor]) -> StepResult:
        cfg = self.cfg
        return train_step(self.model, self.optimizer, plan, batch, micro_batch_size=cfg.train.micro_batch_size,
                          step_tokens=count_step_tokens(batch), dtype=cfg.train.dtype,
                          checkpoint_heads=cfg.layerskip.early_exit.checkpoint_heads,
                          grad_clip=cfg.optim.grad_clip, chunk_tokens=cfg.layerskip.early_exit.loss_chunk_tokens)

    def evaluation_model(self) -> nn.Module | None:
        return self.model

    def barrier(self) -> None:
        pass


class DistributedTrainer(ParallelTrainer):
    """ParallelTrainer plus what the loop needs around it."""

    @property
    def model_parts(self) -> list[nn.Module]:
        return self.parts

    @property
    def optimizer_parts(self) -> list[torch.optim.Optimizer]:
        return self.optimizer.parts

    def evaluation_model(self) -> nn.Module | None:
        """The whole model gathered on rank 0 (None elsewhere); all ranks must call."""
        return consolidated_model(self.parts, self.ctx, self.ctx.device)

    def barrier(self) -> None:
        dist.barrier()


def build_trainer(cfg: RunConfig, ctx: ParallelContext, model: LayerSkipTransformer):
    if ctx.layout.distributed:
        return DistributedTrainer(cfg, ctx, model)
    return SingleProcessTrainer(cfg, model, ctx.device)
