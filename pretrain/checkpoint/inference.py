"""Load a model for evaluation or decoding from a run directory, a checkpoint, or an HF Llama dir."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from pretrain.checkpoint.store import find_latest_checkpoint, is_checkpoint, load_model_weights
from pretrain.model import LayerSkipTransformer, ModelConfig


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


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[LayerSkipTransformer, str | None]:
    """(model in eval mode, tokenizer.json path or None) from our checkpoint or an HF Llama dir."""
    path = Path(path)
    if (path / "config.json").is_file() and not is_checkpoint(path):
        from pretrain.hf_interop import load_hf_checkpoint

        model, tokenizer = load_hf_checkpoint(path, dtype=dtype, device=device)
        return model.eval(), tokenizer
    ckpt = resolve_checkpoint(path)
    model = LayerSkipTransformer(model_config_of_checkpoint(ckpt))
    load_model_weights(ckpt, model)
    return model.to(device=device, dtype=dtype).eval(), tokenizer_of_checkpoint(ckpt)
