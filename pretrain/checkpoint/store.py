"""Training checkpoints: model + optimizer through torch.distributed.checkpoint (resharding
between parallel layouts), plus trainer state (step, data position, RNG) as JSON / torch files.

Layout: <run_dir>/checkpoints/step_<N>/ with the DCP files, trainer_state.json, config.yaml and
rng_rank<r>.pt. A checkpoint is written to a temporary sibling directory and renamed into place
only when complete, so a crash mid-save leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

# Single-process runs save and load DCP checkpoints without a process group, which is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

STEP_DIR = re.compile(r"^step_(\d+)$")
TRAINER_STATE = "trainer_state.json"


def process_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in the run directory, oldest first (renamed into place; whether they
    load is pretrain.checkpoint.fallback's question)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def is_checkpoint(path: Path) -> bool:
    return (Path(path) / TRAINER_STATE).is_file() and (Path(path) / ".metadata").is_file()


# Optimizer state keyed by parameter name ("state.<fqn>.exp_avg"), so that a checkpoint written
# under one parallel layout loads under another, including a split of the model into parts.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

def _as_list(x) -> list:
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


def _collect(models: list, optimizers: list) -> tuple[dict, list[tuple[list[str], list[str]]]]:
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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module | list[torch.nn.Module], optimizer, trainer_state: dict[str, Any],
                    config_yaml: str, keep: int) -> Path:
    """Write checkpoint `step` atomically and synchronously (all ranks call this) and prune to the
    newest `keep`. `model` / `optimizer`: one module and optimizer, or lists (one per model part,
    e.g. pipeline stages held by this rank). See pretrain.checkpoint.writer for the asynchronous
    writer the training loop uses."""
    from pretrain.checkpoint.writer import CheckpointWriter

    writer = CheckpointWriter(async_save=False)
    try:
        return writer.save(run_dir, step, _as_list(model), _as_list(optimizer), trainer_state, config_yaml, keep)
    finally:
        writer.close()


def write_rng_state(directory: Path) -> None:
    torch.save({"torch": torch.get_rng_state()}, Path(directory) / f"rng_rank{process_rank()}.pt")


def finalize_checkpoint(tmp: Path, final: Path, run_dir: Path, step: int, trainer_state: dict[str, Any],
                        config_yaml: str, keep: int) -> None:
    """Rank 0, once every rank's files are in `tmp`: config, trainer state, checksums, then the
    rename into place, then pruning (so the previous checkpoint is removed only after this one is
    complete)."""
    from pretrain.checkpoint.checksums import write_checksums

    (tmp / "config.yaml").write_text(config_yaml)
    _write_json_atomic(tmp / TRAINER_STATE, {"step": step, **trainer_state})
    write_checksums(tmp)
    fsync_path(tmp)
    if final.exists():  # re-saving the same step: replace only once the new one is complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, model: torch.nn.Module | list[torch.nn.Module], optimizer) -> dict[str, Any]:
    """Load model (and optimizer) in place from a checkpoint written under any layout;
    returns the trainer state. Restores this rank's RNG state when the file exists."""
    path = Path(path)
    if not is_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs {TRAINER_STATE} and DCP .metadata)")
    models, optimizers = _as_list(model), _as_list(optimizer)
    state, keys = _collect(models, optimizers)
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


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entry to disk (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
