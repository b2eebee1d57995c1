"""Construct what a run needs: model (fresh or from a checkpoint), optimizer, data."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from pretrain.checkpoint.inference import model_config_of_checkpoint, resolve_checkpoint
from pretrain.checkpoint.store import load_model_weights
from pretrain.config import ConfigError, RunConfig
from pretrain.device import fused_adamw_supported
from pretrain.model import LayerSkipTransformer, ModelConfig


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def init_model_config(cfg: RunConfig) -> ModelConfig:
    """The model shape: from checkpoint.init_from when starting from existing weights
    (continual pretraining), else from the `model` group."""
    src = cfg.checkpoint.init_from
    if not src:
        return cfg.model
    path = Path(src)
    if not path.exists():
        raise ConfigError(f"checkpoint.init_from={src!r}: path does not exist")
    if _is_hf_dir(path):
        import json

        from pretrain.hf_interop import model_config_from_hf

        shape = model_config_from_hf(json.loads((path / "config.json").read_text()))
    else:
        shape = model_config_of_checkpoint(resolve_checkpoint(path))
    return shape


def build_model(cfg: RunConfig, device: torch.device) -> LayerSkipTransformer:
    src = cfg.checkpoint.init_from
    if src and _is_hf_dir(Path(src)):
        from pretrain.hf_interop import load_hf_checkpoint

        model, _ = load_hf_checkpoint(src, dtype=torch.float32, device="cpu")
    else:
        torch.manual_seed(cfg.train.seed)
        model = LayerSkipTransformer(cfg.model)
        if src:
            load_model_weights(resolve_checkpoint(Path(src)), model)
    return model.to(device)


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


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
