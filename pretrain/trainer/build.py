"""Construct what a run needs: the model (fresh, or the weights of checkpoint.init_from) and the
optimizer of each model part."""
from __future__ import annotations

import inspect

import torch

from pretrain.config import RunConfig
from pretrain.device import fused_adamw_supported
from pretrain.model import LayerSkipTransformer
from pretrain.model_loading import load_model
from schedules.lr import learning_rate


def build_model(cfg: RunConfig) -> LayerSkipTransformer:
    """A fresh model of shape cfg.model (seeded by train.seed), or the checkpoint.init_from one
    (continual pretraining; cfg.model is that model's shape, see pretrain.config.check_run)."""
    if cfg.checkpoint.init_from:
        model, _ = load_model(cfg.checkpoint.init_from)
        return model.train()
    torch.manual_seed(cfg.train.seed)
    return LayerSkipTransformer(cfg.model)


def build_optimizer(cfg: RunConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D parameters). Fused where the device supports it."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    op = cfg.optim
    fused = fused_adamw_supported(device) if op.fused is None else op.fused
    if fused and "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        fused = False
    groups = [{"params": decay, "weight_decay": op.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=op.lr, betas=(op.beta1, op.beta2), eps=op.eps, **kwargs)


def learning_rate_at(cfg: RunConfig, step: int) -> float:
    """optim.lr under the configured warm-up and decay at `step` (schedules.lr)."""
    op = cfg.optim
    return learning_rate(step, base_lr=op.lr, warmup_steps=op.warmup_steps, total_steps=cfg.train.steps,
                         min_lr_ratio=op.min_lr_ratio, decay=op.decay)


class OptimizerParts:
    """One optimizer per model part (pipeline stage), stepped together; checkpoints address
    each through its own part so parameter names match the single model's."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.parts = optimizers

    def set_learning_rate(self, lr: float) -> None:
        for opt in self.parts:
            for group in opt.param_groups:
                group["lr"] = lr

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=set_to_none)
