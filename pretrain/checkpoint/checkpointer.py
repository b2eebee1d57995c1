"""The one object that owns a run's checkpoints (after torchtitan's CheckpointManager): where they
live and its lock, resume with fallback, when to save (policy.py), the asynchronous writer,
rollback, and the checks on both sides (no checkpoint with non-finite weights is written; one
that holds them when loaded is marked damaged and skipped).

    ckpt = Checkpointer(cfg, rank, world_size, agree, report)
    ckpt.open()                                    # rank 0: checkpoint dir, its lock, new-run check
    ckpt.track(parts, optimizers)                  # what is saved and loaded: this rank's parts
    path, state = ckpt.resume()                    # per checkpoint.resume; (None, None): fresh start
    ckpt.start(hooks, trainer_state)               # hooks: stop votes, watchdog pause (operations)
    for each step: ... stop = ckpt.maybe_save(done, clean)   # ONE all-reduce; saves when due
    ckpt.close()

`hooks` is what the operations side tells the Checkpointer at each step boundary (the
RunHooks protocol below): whether a signal or the time limit asks the run to stop, agreed in the
same all-reduce as the every_minutes clock, so every rank takes the same decision.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, ContextManager, Protocol

from omegaconf import OmegaConf

from pretrain.checkpoint.errors import CheckpointDirInUse, NoSoundCheckpoint, NonFiniteWeights
from pretrain.checkpoint.integrity import all_finite
from pretrain.checkpoint.layout import list_checkpoints
from pretrain.checkpoint.loader import load_sound
from pretrain.checkpoint.policy import SavePolicy
from pretrain.checkpoint.storage import prepare_checkpoint_dir
from pretrain.checkpoint.store import load_checkpoint
from pretrain.checkpoint.writer import CheckpointWriter
from pretrain.config import ConfigError, RunConfig

Agree = Callable[[list[float]], list[float]]
SHAPE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")


class RunHooks(Protocol):
    def stop_votes(self, save_s: float) -> list[float]:
        """This rank's reasons to stop now, as numbers (all 0: none); `save_s` = a save's duration."""

    def stop_reason(self, agreed: list[float]) -> str | None:
        """The stop reason from the agreed (max over ranks) votes."""

    def suspended(self) -> ContextManager:
        """A block the hang watchdog must not count (a save)."""


class _NoHooks:
    def stop_votes(self, save_s: float) -> list[float]:
        return []

    def stop_reason(self, agreed: list[float]) -> str | None:
        return None

    def suspended(self) -> ContextManager:
        return contextlib.nullcontext()


def shape_conflicts(saved_model: dict, cfg: RunConfig) -> list[str]:
    """'model.dim=128 (the checkpoint has 256)' for each shape key that differs."""
    return [f"model.{k}={getattr(cfg.model, k)} (the checkpoint has {saved_model[k]})"
            for k in SHAPE_KEYS if k in saved_model and saved_model[k] != getattr(cfg.model, k)]


class Checkpointer:
    def __init__(self, cfg: RunConfig, rank: int, world_size: int, agree: Agree,
                 report: Callable[[str], None] = print):
        self.cfg, self.run_dir = cfg, Path(cfg.run_dir)
        self.rank, self.world_size, self.agree, self.report = rank, world_size, agree, report
        self.policy = SavePolicy(cfg.checkpoint.every, cfg.checkpoint.every_minutes,
                                 cfg.train.stop_at_step or cfg.train.steps)
        self.writer = CheckpointWriter(async_save=cfg.checkpoint.async_save)
        self.hooks: RunHooks = _NoHooks()
        self.lock = None
        self.parts: list = []
        self.optimizers: list = []
        self.trainer_state: Callable[[], dict] = dict
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.structured(cfg))
        self.last_save = time.time()     # wall time of the last save (for every_minutes)
        self.last_save_s = 0.0           # how long the last blocking save held the run

    # ---- before any work
    def open(self) -> None:
        """Rank 0 prepares and locks the checkpoint directory (storage.py); every rank learns
        whether that worked (a refusal is raised on every rank)."""
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.lock = prepare_checkpoint_dir(self.cfg, self.run_dir)
            except (ConfigError, CheckpointDirInUse) as err:
                error = err
            except OSError as err:   # e.g. no permission to create the lock file
                error = ConfigError(f"checkpoint directory of {self.run_dir}: {err.strerror or err} "
                                    f"({err.filename or ''}); check checkpoint.dir and its permissions")
        if self.agree([1.0 if error is not None else 0.0])[0]:
            raise error or ConfigError("rank 0 refused the checkpoint directory (see its error)")

    def track(self, parts: list, optimizers: list) -> None:
        """The model parts and optimizers of this rank, which a save writes and a load fills."""
        self.parts, self.optimizers = parts, optimizers

    # ---- reading
    def _load(self, path: Path) -> dict:
        return load_checkpoint(path, self.parts, self.optimizers)

    def _finite(self, _state) -> str | None:
        ok = all_finite(p for part in self.parts for p in part.parameters())
        return None if ok else "non-finite weights at load"

    def _check_shape(self, source: Path) -> None:
        """The model shape of the newest checkpoint with a readable config equals the run's: a
        mismatch is a setting to fix, not damage (no checkpoint is skipped or marked for it)."""
        found = [source] if source != self.run_dir else [p for _, p in reversed(list_checkpoints(self.run_dir))]
        for path in found:
            try:
                saved = OmegaConf.to_container(OmegaConf.load(path / "config.yaml").model)
            except Exception:  # noqa: BLE001 - unreadable: the integrity checks will say why
                continue
            conflicts = shape_conflicts(saved, self.cfg)
            if conflicts:
                raise ConfigError(f"{'; '.join(conflicts)}: the checkpoints in {path.parent} hold another model; "
                                  f"resume with the model settings they were trained with (see {path / 'config.yaml'}), "
                                  f"or start this model in another run_dir")
            return

    def resume(self) -> tuple[Path | None, dict | None]:
        """(checkpoint, trainer state) per checkpoint.resume (auto: the newest that passes every
        check; a path: that one), or (None, None) for a fresh start."""
        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return None, None
        source = self.run_dir if mode == "auto" else Path(mode)
        if mode != "auto" and not source.exists():
            raise ConfigError(f"checkpoint.resume={mode!r}: no such checkpoint")
        self._check_shape(source)
        try:
            return load_sound(source, self._load, verify=self._finite, report=self.report, agree=self.agree,
                              world_size=self.world_size)
        except NoSoundCheckpoint as err:
            if mode != "auto":
                raise ConfigError(f"checkpoint.resume={mode!r}: cannot resume from it: {err.problem}") from None
            raise ConfigError(f"no checkpoint in {self.run_dir / 'checkpoints'} can be resumed from (see the "
                              f"warnings above); a sound one without checksums.json can be vouched for with "
                              f"`python -m pretrain.checkpoint trust PATH`; to start over instead: "
                              f"checkpoint.resume=none checkpoint.overwrite=true (deletes them)") from None

    def rollback(self) -> Path | None:
        """Back to the newest checkpoint that loads (None: there is none)."""
        self.writer.wait()
        try:
            path, _ = load_sound(self.run_dir, self._load, verify=self._finite, report=self.report,
                                 agree=self.agree, world_size=self.world_size)
        except NoSoundCheckpoint:
            return None
        return path

    # ---- writing
    def start(self, hooks: RunHooks, trainer_state: Callable[[], dict]) -> None:
        """Saving begins: `hooks` as above, `trainer_state()` the JSON state a save records beside
        the weights (data position, W&B run id)."""
        self.hooks, self.trainer_state = hooks, trainer_state
        self.last_save = time.time()

    def wait(self) -> None:
        """Until the save in flight is on disk (raises its error)."""
        self.writer.wait()

    def save_seconds(self) -> float:
        """The duration to plan for a save (the slowest measured, blocking or in the background)."""
        return max(self.last_save_s, self.writer.last_total_s)

    def maybe_save(self, done: int, clean: bool) -> str | None:
        """After step `done`: agree (one all-reduce) on whether to stop and whether the clock
        asks for a save, save when the policy says so; returns the stop reason (None: go on)."""
        self.writer.check()   # a background save that failed stops the run here
        votes = self.hooks.stop_votes(self.save_seconds())
        agreed = self.agree(votes + [float(self.policy.minutes_due(time.time(), self.last_save))])
        stop = self.hooks.stop_reason(agreed[:-1])
        decision = self.policy.decide(done, stop=stop is not None, minutes_due=agreed[-1] > 0, clean=clean)
        if decision.save:
            self.save(done, decision.blocking)
        return stop

    def save(self, done: int, blocking: bool) -> Path:
        """Write checkpoint `done` (all ranks), after checking the weights are finite everywhere."""
        bad = 0.0 if all_finite(p for part in self.parts for p in part.parameters()) else 1.0
        if self.agree([bad])[0]:
            raise NonFiniteWeights(f"the weights hold non-finite values after step {done}; no checkpoint was "
                                   f"written; rerun to resume from the newest checkpoint")
        started = time.perf_counter()
        with self.hooks.suspended():
            path = self.writer.save(self.run_dir, done, self.parts, self.optimizers, self.trainer_state(),
                                    self.config_yaml, self.cfg.checkpoint.keep, blocking=blocking)
        if blocking:
            self.last_save_s = time.perf_counter() - started
        self.last_save = time.time()
        return path

    def close(self, *, failed: bool = False) -> None:
        """Wait for the save in flight (its weights were finite: let it complete) and release the
        lock; after a failure a second error from the writer is not raised over the first."""
        try:
            if failed:
                with contextlib.suppress(BaseException):
                    self.writer.close()
            else:
                self.writer.close()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None
