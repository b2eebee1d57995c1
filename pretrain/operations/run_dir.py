"""Checks and preparation of the run directory, done by rank 0 before anything in it is written:

- checkpoint.dir: <run_dir>/checkpoints becomes a symbolic link to it (so every tool that takes a
  run directory finds the checkpoints), refused if <run_dir>/checkpoints is something else;
- checkpoint.resume=none in a directory that holds checkpoints is refused unless
  checkpoint.overwrite=true (then those checkpoints and eval.json are deleted: a new run never
  mixes with an older, longer one);
- workers restarted by torchrun (--max-restarts) continue the run their first round began, even
  when it was started with checkpoint.resume=none;
- leftovers of an interrupted save (step_<N>.tmp) are removed (the run lock says no one else is
  writing them).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from pretrain.config import ConfigError, RunConfig


def resume_mode_of_workers(mode: str, restart_count: int) -> str:
    """checkpoint.resume for workers in restart round `restart_count` (TORCHELASTIC_RESTART_COUNT):
    a fresh start (none) becomes auto from the second round on, so a restart neither refuses
    the run's own checkpoints nor, with checkpoint.overwrite=true, deletes them."""
    return "auto" if mode == "none" and restart_count > 0 else mode


def for_restarted_workers(cfg: RunConfig) -> RunConfig:
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    mode = resume_mode_of_workers(cfg.checkpoint.resume, int(count) if count.isdigit() else 0)
    if mode == cfg.checkpoint.resume:
        return cfg
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=mode))


def link_checkpoint_dir(run_dir: Path, target: str | None) -> None:
    if not target:
        return
    target_path = Path(target).expanduser().absolute()
    if target_path.exists() and not target_path.is_dir():
        raise ConfigError(f"checkpoint.dir={target!r}: exists and is not a directory")
    link = Path(run_dir) / "checkpoints"
    if link.is_symlink():
        if Path(os.readlink(link)) != target_path:
            raise ConfigError(f"checkpoint.dir={target!r}: {link} already links to {os.readlink(link)}; "
                              f"use that directory or another run_dir")
    elif link.exists():
        raise ConfigError(f"checkpoint.dir={target!r}: {link} already holds this run's checkpoints; "
                          f"move them to {target_path} and remove {link}, or drop checkpoint.dir")
    try:
        target_path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"checkpoint.dir={target!r}: cannot create it ({err.strerror})") from None
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target_path, target_is_directory=True)


def existing_checkpoints(run_dir: Path) -> list[Path]:
    from pretrain.checkpoint.fallback import candidate_checkpoints

    return candidate_checkpoints(run_dir)


def check_new_run(cfg: RunConfig, run_dir: Path) -> None:
    """resume=none over existing checkpoints: refuse, or (overwrite) delete them."""
    if cfg.checkpoint.resume != "none":
        return
    found = existing_checkpoints(run_dir)
    if not found:
        return
    if not cfg.checkpoint.overwrite:
        raise ConfigError(f"checkpoint.resume=none but {run_dir} already holds checkpoints "
                          f"({', '.join(p.name for p in found[:3])}{', ...' if len(found) > 3 else ''}); "
                          f"use checkpoint.resume=auto to continue that run, another run_dir, or "
                          f"checkpoint.overwrite=true to delete them and start over")
    for path in found:
        shutil.rmtree(path)
    (Path(run_dir) / "eval.json").unlink(missing_ok=True)


def remove_partial_saves(run_dir: Path) -> None:
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for child in root.glob("step_*.tmp"):
            shutil.rmtree(child, ignore_errors=True)


def prepare_run_dir(cfg: RunConfig, run_dir: Path) -> None:
    """Rank 0, holding the run lock, before any file of the run is written."""
    link_checkpoint_dir(run_dir, cfg.checkpoint.dir)
    check_new_run(cfg, run_dir)
    remove_partial_saves(run_dir)


def write_run_record(run_dir: Path, config_yaml: str, tokenizer: Path | None) -> None:
    """After every check passed (rank 0): config.yaml, the data's tokenizer.json and Hydra's
    command-line overrides (hydra/overrides.yaml), each replaced atomically."""
    from pretrain.metrics.logger import write_text_atomic

    write_text_atomic(Path(run_dir) / "config.yaml", config_yaml)
    if tokenizer is not None and tokenizer.is_file():
        write_text_atomic(Path(run_dir) / "tokenizer.json", tokenizer.read_text(encoding="utf-8"))
    try:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        if HydraConfig.initialized():
            (Path(run_dir) / "hydra").mkdir(exist_ok=True)
            write_text_atomic(Path(run_dir) / "hydra" / "overrides.yaml",
                              OmegaConf.to_yaml(list(HydraConfig.get().overrides.task)))
    except ImportError:
        pass
