"""What a checkpoint says about its model without loading weights: its shape and its tokenizer.
(Which checkpoint to read is loader.py; pretrain.model_loading loads a model from one or from a
Hugging Face directory.)"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from pretrain.model import ModelConfig


def model_config_of_checkpoint(ckpt: Path) -> ModelConfig:
    cfg = OmegaConf.load(Path(ckpt) / "config.yaml")
    return ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))


def tokenizer_of_checkpoint(ckpt: Path) -> str | None:
    """The run copies its tokenizer next to its checkpoints: <run_dir>/tokenizer.json."""
    ckpt = Path(ckpt)
    for candidate in (ckpt / "tokenizer.json", ckpt.parent.parent / "tokenizer.json"):
        if candidate.is_file():
            return str(candidate)
    return None
