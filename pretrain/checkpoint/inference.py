"""Where a run keeps its model: the newest checkpoint of a run directory, its shape and tokenizer.
(pretrain.model_loading loads a model from these or from a Hugging Face directory.)"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from pretrain.checkpoint.store import find_latest_checkpoint, is_checkpoint
from pretrain.model import ModelConfig


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory resolves to its newest checkpoint; a checkpoint directory to itself."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if is_checkpoint(path):
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} holds no checkpoint (expected {path}/checkpoints/step_*/)")
    return latest


def model_config_of_checkpoint(ckpt: Path) -> ModelConfig:
    cfg = OmegaConf.load(ckpt / "config.yaml")
    return ModelConfig(**OmegaConf.to_container(cfg.model, resolve=True))


def tokenizer_of_checkpoint(ckpt: Path) -> str | None:
    """The run copies its tokenizer next to its checkpoints: <run_dir>/tokenizer.json."""
    for candidate in (ckpt / "tokenizer.json", ckpt.parent.parent / "tokenizer.json"):
        if candidate.is_file():
            return str(candidate)
    return None
