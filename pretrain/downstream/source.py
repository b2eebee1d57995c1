"""What the downstream evaluation knows about a model before loading it, and the model itself,
loaded once on first use and shared by every exit and strategy evaluated.

Reading the shape and the tokenizer costs nothing; the weights are loaded only when a request is
scored, after every request was checked against the model's positions, so bad input fails before
any model is loaded."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pretrain.checkpoint.inference import resolve_checkpoint, tokenizer_of_checkpoint
from pretrain.data.tokenizer import eos_token_id, load_tokenizer, tokenizer_config, tokenizer_file
from pretrain.model import ModelConfig
from pretrain.model_loading import is_hf_dir, load_model, model_config_at


def tokenizer_path_at(path: str | Path) -> str:
    """tokenizer.json of an HF directory, or the one a run keeps beside its checkpoints."""
    if is_hf_dir(path):
        return str(tokenizer_file(path))
    found = tokenizer_of_checkpoint(resolve_checkpoint(path))
    if found is None:
        raise FileNotFoundError(f"{path} has no tokenizer.json (the evaluation needs the model's tokenizer)")
    return found


def prefix_token(tokenizer, tokenizer_path: str, eot: int) -> int:
    """The token put before an empty context (rolling log-likelihood): the configured bos_token,
    else end-of-text, as the harness's HF backend does."""
    bos = tokenizer_config(tokenizer_path).get("bos_token")
    if isinstance(bos, dict):
        bos = bos.get("content")
    bos_id = tokenizer.token_to_id(bos) if isinstance(bos, str) else None
    return eot if bos_id is None else bos_id


@dataclass
class ModelSource:
    path: str
    cfg: ModelConfig
    tokenizer_path: str
    device: torch.device
    dtype: torch.dtype = torch.float32
    tokenizer: object = field(default=None, repr=False)
    _model: torch.nn.Module | None = field(default=None, repr=False)
    prepare: object = field(default=None, repr=False)   # called on the model once loaded (e.g. TP sharding)

    @classmethod
    def open(cls, path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> "ModelSource":
        """Shape and tokenizer of the model at `path` (FileNotFoundError / ValueError when none)."""
        return cls(str(path), model_config_at(path), tokenizer_path_at(path), device, dtype)

    @classmethod
    def of_model(cls, model: torch.nn.Module, tokenizer_path: str) -> "ModelSource":
        """A model already in memory (evaluation during training)."""
        return cls("<in memory>", model.cfg, tokenizer_path, model.tok_embeddings.weight.device,
                   model.tok_embeddings.weight.dtype, _model=model)

    def __post_init__(self):
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.eot_id = eos_token_id(self.tokenizer, self.tokenizer_path)
        self.prefix_id = prefix_token(self.tokenizer, self.tokenizer_path, self.eot_id)

    @property
    def num_layers(self) -> int:
        return self.cfg.n_layers

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model, _ = load_model(self.path, device=self.device, dtype=self.dtype)
            if self.prepare is not None:
                self.prepare(self._model)
        return self._model
