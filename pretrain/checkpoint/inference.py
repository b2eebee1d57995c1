"""Which checkpoint a path names, and what it says about its model without loading weights: its
shape and its tokenizer (the checks and fallback are loader.py's; pretrain.model_loading loads a
model from a checkpoint or from a Hugging Face directory)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import OmegaConf

from pretrain.checkpoint.errors import NoSoundCheckpoint
from pretrain.checkpoint.integrity import checkpoint_problem
from pretrain.checkpoint.loader import choose_checkpoint, names_one_checkpoint, report_to_stderr
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


def resolve_checkpoint(path: str | Path, report: Callable[[str], None] = report_to_stderr) -> Path:
    """The checkpoint `path` names: itself when it is one checkpoint directory that passes the
    checks, the newest that passes for a run directory; NoSoundCheckpoint (a FileNotFoundError)
    otherwise. Checks only, no loading (see load_sound)."""
    path = Path(path)
    if not path.exists():
        raise NoSoundCheckpoint(f"checkpoint path {path} does not exist", "it does not exist")
    if names_one_checkpoint(path):
        problem = checkpoint_problem(path)
        if problem:
            raise NoSoundCheckpoint(f"{path} cannot be loaded: {problem}", problem)
        return path
    candidates, start = choose_checkpoint(path, report)
    if not candidates:
        raise NoSoundCheckpoint(f"{path} holds no checkpoint (expected {path}/checkpoints/step_*/)")
    if start < 0:
        raise NoSoundCheckpoint(f"no checkpoint in {path} passes the checks (see the warnings above)")
    if start > 0:
        report(f"using {candidates[start]}, the newest checkpoint that passes the checks")
    return candidates[start]
