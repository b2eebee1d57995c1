"""Write checkpoints, synchronously or asynchronously (checkpoint.async_save).

Asynchronous: the state is copied to CPU memory (DCP's DefaultStager, blocking, so the optimizer
step that follows cannot change what is saved) and torch.distributed.checkpoint.async_save writes
it from a background thread while training continues; under several processes the writes
coordinate over a separate gloo process group, so they never interleave with the training
collectives. Rank 0 then finalises in the background (config, trainer state, checksums, atomic
rename, pruning to checkpoint.keep). At most one save is in flight: the next save, a rollback and
the end of the run wait for it (`wait`).

Every failure removes the partial <step>.tmp directory; a full disk (or any OSError) becomes a
CheckpointWriteError naming the directory, so a retry does not trip over the leftovers and the
newest complete checkpoint stays in place.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from pretrain.checkpoint.checksums import write_checksums
from pretrain.checkpoint.errors import CheckpointWriteError
from pretrain.checkpoint.layout import TRAINER_STATE, barrier, checkpoint_dir, list_checkpoints, process_rank
from pretrain.checkpoint.store import as_list, collect_state, write_rng_state
from pretrain.files import fsync_path, write_atomic


def finalize_checkpoint(tmp: Path, final: Path, run_dir: Path, step: int, trainer_state: dict[str, Any],
                        config_yaml: str, keep: int) -> None:
    """Rank 0, once every rank's files are in `tmp`: config, trainer state, checksums, then the
    rename into place, then pruning (so the previous checkpoint is removed only after this one is
    complete)."""
    write_atomic(tmp / "config.yaml", config_yaml)
    write_atomic(tmp / TRAINER_STATE, json.dumps({"step": step, **trainer_state}, indent=2))
    write_checksums(tmp)
    fsync_path(tmp)
    if final.exists():  # re-saving the same step: replace only once the new one is complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(final.parent)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _os_error(err: BaseException) -> OSError | None:
    """The OSError behind `err` (DCP wraps per-rank failures in a CheckpointException)."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError):
            return e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):  # {rank: exception} or {rank: (exception, traceback)}
            for v in failures.values():
                stack += [x for x in (v if isinstance(v, tuple) else (v,)) if isinstance(x, BaseException)]
    return None


def _write_error(step: int, tmp: Path, err: BaseException) -> BaseException:
    os_err = _os_error(err)
    if os_err is None:
        return err
    hint = " (disk full: free space or set checkpoint.dir to a larger volume)" if os_err.errno == errno.ENOSPC else ""
    return CheckpointWriteError(f"could not write checkpoint step {step} to {tmp}: "
                                f"{os_err.strerror or os_err}{hint}; the partial directory was removed and "
                                f"the previous checkpoint is kept")


class CheckpointWriter:
    def __init__(self, async_save: bool = True):
        self.async_save = async_save
        self._stager: DefaultStager | None = None
        self._group = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.in_flight: int | None = None    # step being written in the background
        self.last_blocking_s = 0.0           # time the caller was held by the last save
        self.last_total_s = 0.0              # start to complete (rename done) of the last save
        self._started = 0.0

    def _process_group(self):
        if dist.is_initialized() and self._group is None:
            self._group = dist.new_group(backend="gloo")  # collective: every rank saves together
        return self._group

    def save(self, run_dir: Path, step: int, parts: list, optimizers: list, trainer_state: dict[str, Any],
             config_yaml: str, keep: int, blocking: bool | None = None) -> Path:
        """Start writing checkpoint `step` (all ranks call this); returns its final path. Blocking
        unless async_save (and not blocking=True); then `wait()` / `poll()` complete it."""
        self.wait()
        started = self._started = time.perf_counter()
        final = checkpoint_dir(run_dir, step)
        tmp = final.with_name(final.name + ".tmp")
        if process_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        background = self.async_save and not blocking
        try:
            state, _ = collect_state(parts, optimizers)
            write_rng_state(tmp)
            if background:
                group = self._process_group()
                if self._stager is None:
                    self._stager = DefaultStager(StagingOptions(False, False, False, False))
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group,
                                        async_stager=self._stager)
                future = getattr(future, "upload_completion", future)
            else:
                dcp.save(state, checkpoint_id=str(tmp))
        except BaseException as err:
            self._cleanup(tmp)
            raise _write_error(step, tmp, err) from err
        args = (tmp, final, Path(run_dir), step, trainer_state, config_yaml, keep)
        if background:
            self.in_flight = step
            self._thread = threading.Thread(target=self._complete, args=(future, *args),
                                            name="layerskip-checkpoint", daemon=True)
            self._thread.start()
        else:
            barrier()
            error = self._finish(*args)
            if dist.is_initialized():  # every rank learns whether rank 0 could finish
                flag = [error is not None]
                dist.broadcast_object_list(flag, src=0)
                if flag[0] and error is None:
                    error = CheckpointWriteError(f"rank 0 could not finish checkpoint step {step} (see its error)")
            if error is not None:
                raise error
            self.last_total_s = time.perf_counter() - started
        self.last_blocking_s = time.perf_counter() - started
        return final

    def _finish(self, tmp, final, run_dir, step, trainer_state, config_yaml, keep) -> BaseException | None:
        if process_rank() != 0:
            return None
        try:
            finalize_checkpoint(tmp, final, run_dir, step, trainer_state, config_yaml, keep)
            return None
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            self._cleanup(tmp)
            return _write_error(step, tmp, err)

    def _complete(self, future, *args) -> None:
        try:
            future.result()
        except BaseException as err:  # noqa: BLE001 - raised by wait()
            self._cleanup(args[0])
            self._error = _write_error(args[3], args[0], err)
            return
        self._error = self._finish(*args)
        self.last_total_s = time.perf_counter() - self._started

    @staticmethod
    def _cleanup(tmp: Path) -> None:
        if process_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)

    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()

    def check(self) -> None:
        """Raise the error of a background save that has failed (without waiting for one that runs)."""
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self.in_flight = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module | list[torch.nn.Module], optimizer,
                    trainer_state: dict[str, Any], config_yaml: str, keep: int) -> Path:
    """Write checkpoint `step` atomically and synchronously (all ranks call this) and prune to the
    newest `keep`. `model` / `optimizer`: one module and optimizer, or lists (one per model part,
    e.g. pipeline stages held by this rank)."""
    writer = CheckpointWriter(async_save=False)
    try:
        return writer.save(run_dir, step, as_list(model), as_list(optimizer), trainer_state, config_yaml, keep)
    finally:
        writer.close()
