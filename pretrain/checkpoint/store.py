"""What a checkpoint holds and how it is read back: model + optimizer through
torch.distributed.checkpoint (resharding between parallel layouts), trainer state (step, data
position) as JSON and each rank's RNG state. Writing is writer.py; which checkpoint to read, with
which checks, is loader.py; names and places are layout.py."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from pretrain.checkpoint.layout import TRAINER_STATE, is_checkpoint, process_rank

# Single-process runs save and load DCP checkpoints without a process group, which is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


# Optimizer state keyed by parameter name ("state.<fqn>.exp_avg"), so that a checkpoint written
# under one parallel layout loads under another, including a split of the model into parts.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _rename(state: dict[str, Any], aliases: dict[str, str], reverse: bool = False) -> dict[str, Any]:
    """Rename flattened optimizer keys of aliased parameters ('state.<fqn>.*', 'param_groups.<fqn>.*').
    A part may declare `checkpoint_aliases` {its name: canonical name} for a weight it holds under
    another name (a pipeline stage's replica of a tied output projection = the embedding)."""
    if not aliases:
        return state
    pairs = [(b, a) if reverse else (a, b) for a, b in aliases.items()]
    out = {}
    for key, value in state.items():
        for src, dst in pairs:
            for kind in ("state.", "param_groups."):
                if key.startswith(kind + src + "."):
                    key = kind + dst + key[len(kind + src):]
        out[key] = value
    return out


def collect_state(models: list, optimizers: list) -> tuple[dict, list[tuple[list[str], list[str]]]]:
    """Merged {"model": ..., "optim": ...} over the parts, and each part's keys."""
    merged: dict[str, dict] = {"model": {}, "optim": {}}
    keys = []
    for i, model in enumerate(models):
        opt = optimizers[i] if optimizers else []
        model_sd, optim_sd = get_state_dict(model, opt, options=_OPTIONS)
        optim_sd = _rename(optim_sd, getattr(model, "checkpoint_aliases", {}))
        merged["model"].update(model_sd)
        merged["optim"].update(optim_sd)
        keys.append((list(model_sd), list(optim_sd)))
    if not optimizers:
        del merged["optim"]
    return merged, keys


def write_rng_state(directory: Path) -> None:
    torch.save({"torch": torch.get_rng_state()}, Path(directory) / f"rng_rank{process_rank()}.pt")


def load_checkpoint(path: Path, model: torch.nn.Module | list[torch.nn.Module], optimizer) -> dict[str, Any]:
    """Load model (and optimizer) in place from a checkpoint written under any layout;
    returns the trainer state. Restores this rank's RNG state when the file exists."""
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs {TRAINER_STATE} and DCP .metadata)")
    models, optimizers = as_list(model), as_list(optimizer)
    state, keys = collect_state(models, optimizers)
    dcp.load(state, checkpoint_id=str(path))
    for i, part in enumerate(models):
        model_keys, optim_keys = keys[i]
        optim_sd = {k: state["optim"][k] for k in optim_keys} if optimizers else {}
        set_state_dict(part, optimizers[i] if optimizers else [],
                       model_state_dict={k: state["model"][k] for k in model_keys},
                       optim_state_dict=_rename(optim_sd, getattr(part, "checkpoint_aliases", {}), reverse=True),
                       options=StateDictOptions(strict=True, flatten_optimizer_state_dict=True))
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    rng_file = path / f"rng_rank{process_rank()}.pt"
    if rng_file.is_file():
        torch.set_rng_state(torch.load(rng_file, weights_only=True)["torch"])
    return trainer_state


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Model weights only (continual pretraining, inference)."""
    model_sd, _ = get_state_dict(model, [])
    state = {"model": model_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={},
                   options=StateDictOptions(strict=True))
