"""A model from any source this project reads: a run directory (its newest sound checkpoint), one
of our checkpoints, or a Hugging Face Llama directory. Sits above both pretrain.checkpoint and
pretrain.hf_interop, which know nothing of each other's formats.

Our checkpoints are read through pretrain.checkpoint.loader.load_sound, the loader training's
resume uses: the same checks (complete, matching checksums.json, not marked damaged), the same
fallback to an older checkpoint of a run directory, and a checkpoint whose weights turn out
non-finite is marked damaged and skipped. Failures are NoSoundCheckpoint (a FileNotFoundError)
with one line saying why. Entry points: load_model (model, tokenizer) and load_model_at (also the
checkpoint used)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pretrain.checkpoint.errors import NoSoundCheckpoint
from pretrain.checkpoint.inference import model_config_of_checkpoint, resolve_checkpoint, tokenizer_of_checkpoint
from pretrain.checkpoint.integrity import all_finite
from pretrain.checkpoint.layout import is_checkpoint
from pretrain.checkpoint.loader import load_sound, report_to_stderr
from pretrain.checkpoint.store import load_model_weights
from pretrain.hf_interop import load_hf_checkpoint, model_config_from_hf
from pretrain.model import LayerSkipTransformer, ModelConfig


@dataclass
class LoadedModel:
    model: LayerSkipTransformer      # in eval mode
    tokenizer: str | None            # tokenizer.json path
    checkpoint: Path | None          # our checkpoint it came from (None: an HF directory)


def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and not is_checkpoint(path)


def model_config_at(path: str | Path) -> ModelConfig:
    """The model shape stored at `path`, without loading weights (HFConfigError for an HF model
    this project cannot represent; FileNotFoundError when there is no sound model)."""
    if is_hf_dir(path):
        return model_config_from_hf(json.loads((Path(path) / "config.json").read_text()))
    return model_config_of_checkpoint(resolve_checkpoint(path))


def _weights_of(ckpt: Path) -> LayerSkipTransformer:
    model = LayerSkipTransformer(model_config_of_checkpoint(ckpt))
    load_model_weights(ckpt, model)
    return model


def _finite(model: LayerSkipTransformer) -> str | None:
    return None if all_finite(model.parameters()) else "non-finite weights at load"


def load_model_at(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  report: Callable[[str], None] = report_to_stderr) -> LoadedModel:
    """The model at `path` (see the module docstring); `report` gets the lines saying which
    checkpoint was skipped and why."""
    if is_hf_dir(path):
        model, tokenizer = load_hf_checkpoint(path, dtype=dtype, device=device)
        return LoadedModel(model.eval(), tokenizer, None)
    ckpt, model = load_sound(path, _weights_of, verify=_finite, report=report)
    if ckpt is None:
        raise NoSoundCheckpoint(f"{path} holds no checkpoint (expected {path}/checkpoints/step_*/)")
    return LoadedModel(model.to(device=device, dtype=dtype).eval(), tokenizer_of_checkpoint(ckpt), ckpt)


def load_model(path: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[LayerSkipTransformer, str | None]:
    """(model in eval mode, tokenizer.json path or None) from our checkpoint or an HF Llama dir."""
    loaded = load_model_at(path, device=device, dtype=dtype)
    return loaded.model, loaded.tokenizer
