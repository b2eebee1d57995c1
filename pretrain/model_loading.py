"""A model from any source this project reads: a run directory (its newest checkpoint), one of
our checkpoints, or a Hugging Face Llama directory. Sits above both pretrain.checkpoint and
pretrain.hf_interop, which know nothing of each other's formats."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.checkpoint.inference import model_config_of_checkpoint, resolve_checkpoint, tokenizer_of_checkpoint
from pretrain.checkpoint.store import is_checkpoint, load_model_weights
from pretrain.hf_interop import load_hf_checkpoint, model_config_from_hf
from pretrain.model import LayerSkipTransformer, ModelConfig


def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and not is_checkpoint(path)


def model_config_at(path: str | Path) -> ModelConfig:
    """The model shape stored at `path`, without loading weights (HFConfigError for an HF model
    this project cannot represent; FileNotFoundError when there is no model)."""
    if is_hf_dir(path):
        return model_config_from_hf(json.loads((Path(path) / "config.json").read_text()))
    return model_config_of_checkpoint(resolve_checkpoint(path))


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[LayerSkipTransformer, str | None]:
    """(model in eval mode, tokenizer.json path or None) from our checkpoint or an HF Llama dir."""
    if is_hf_dir(path):
        model, tokenizer = load_hf_checkpoint(path, dtype=dtype, device=device)
        return model.eval(), tokenizer
    ckpt = resolve_checkpoint(path)
    model = LayerSkipTransformer(model_config_of_checkpoint(ckpt))
    load_model_weights(ckpt, model)
    return model.to(device=device, dtype=dtype).eval(), tokenizer_of_checkpoint(ckpt)
