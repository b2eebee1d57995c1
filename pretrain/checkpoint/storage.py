"""The directory the checkpoints live in, prepared by rank 0 before anything is written:

- checkpoint.dir: <run_dir>/checkpoints becomes a symbolic link to it (so every tool that takes a
  run directory finds the checkpoints), refused if <run_dir>/checkpoints is something else;
- the directory is locked (lock.py) before anything in it is read or changed, so two runs sharing
  one checkpoint.dir never resume from or prune each other's checkpoints; and a checkpoint.dir
  belongs to the run directory that first used it (.owner.json), so a later run with another
  run_dir cannot continue, prune or overwrite that run's checkpoints either;
- checkpoint.resume=none in a directory that holds checkpoints is refused unless
  checkpoint.overwrite=true (then those checkpoints and eval.json are deleted: a new run never
  mixes with an older, longer one);
- leftovers of an interrupted save (step_<N>.tmp) are removed (the lock says no one else is
  writing them).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pretrain.checkpoint.layout import checkpoints_root, list_checkpoints
from pretrain.checkpoint.lock import DirectoryLock
from pretrain.config import ConfigError, RunConfig
from pretrain.files import write_atomic


def checkpoint_home(run_dir: Path, target: str | None) -> Path:
    """Where the run's checkpoints really are (checkpoint.dir, or <run_dir>/checkpoints); a
    ConfigError naming checkpoint.dir when it cannot be used."""
    link = checkpoints_root(run_dir)
    if not target:
        return link
    target_path = Path(target).expanduser().absolute()
    if target_path.exists() and not target_path.is_dir():
        raise ConfigError(f"checkpoint.dir={target!r}: exists and is not a directory")
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
    return target_path


def link_checkpoint_dir(run_dir: Path, home: Path) -> None:
    link = checkpoints_root(run_dir)
    if home != link and not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(home, target_is_directory=True)


OWNER = ".owner.json"


def check_owner(run_dir: Path, home: Path, target: str) -> None:
    """checkpoint.dir `home` holds the checkpoints of this run directory (recorded on first use)."""
    record = home / OWNER
    here = Path(run_dir).absolute()
    if not record.is_file():
        write_atomic(record, json.dumps({"run_dir": str(here)}))
        return
    try:
        owner = Path(json.loads(record.read_text())["run_dir"])
    except (ValueError, KeyError, TypeError, OSError):
        return  # unreadable: the lock still keeps two live runs apart
    same = owner == here or (owner.exists() and here.exists() and os.path.samefile(owner, here))
    if not same:
        raise ConfigError(f"checkpoint.dir={target!r}: holds the checkpoints of run {owner} (recorded in {record}); "
                          f"use that run_dir to continue it, or give this run another checkpoint.dir (if that "
                          f"run directory was moved to {here}, remove {record})")


def check_new_run(cfg: RunConfig, run_dir: Path) -> None:
    """resume=none over existing checkpoints: refuse, or (overwrite) delete them."""
    if cfg.checkpoint.resume != "none":
        return
    found = [path for _, path in reversed(list_checkpoints(run_dir))]
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
    root = checkpoints_root(run_dir)
    if root.is_dir():
        for child in root.glob("step_*.tmp"):
            shutil.rmtree(child, ignore_errors=True)


def prepare_checkpoint_dir(cfg: RunConfig, run_dir: Path) -> DirectoryLock:
    """Rank 0, holding the run lock: the steps above; returns the held lock of the checkpoint
    directory (released by the caller at the end of the run)."""
    home = checkpoint_home(run_dir, cfg.checkpoint.dir)
    lock = DirectoryLock(home, run_dir).acquire()
    try:
        if cfg.checkpoint.dir:
            check_owner(run_dir, home, cfg.checkpoint.dir)
        link_checkpoint_dir(run_dir, home)
        check_new_run(cfg, run_dir)
        remove_partial_saves(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock
