"""The operations side of one training invocation, as the few calls the training loop makes:

    ops = RunOperations(cfg, run_dir, rank, world_size, all_reduce_max, report)
    ops.open()                        # lock, run-directory checks (before anything is written)
    path, state = ops.resume(load)    # newest checkpoint that loads (None, None: fresh start)
    ops.start(start_step)             # signals, time budget, watchdog
    for each step:
        ops.before_step(step); result = trainer.train_step(...)   # trainer.apply_update = ops.guard
        if ops.after_step(seconds) == "rollback": ops.rollback(load)
        ... log, evaluate (inside `with ops.suspended():`) ...
        decision = ops.boundary(done)         # ONE all-reduce: signal / time limit / periodic save
        if decision.save or <the loop's own schedule>: ops.save(done, save_fn, blocking=...)
        if decision.stop: break               # then ops.leave(done) -> RunInterrupted (exit 75)
    ops.close()

Every rank takes every decision from values all ranks agreed on, so they stay in lock step.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pretrain.config import ConfigError, RunConfig
from pretrain.operations.exit_codes import NonFiniteStop, OperationsExit, RunInterrupted, EXIT_BAD_INPUT
from pretrain.operations.nonfinite import NonFiniteGuard
from pretrain.operations.requeue import write_requeue_file
from pretrain.operations.run_dir import prepare_run_dir
from pretrain.operations.run_lock import RunLock
from pretrain.operations.signals import HANDLED, SignalFlag
from pretrain.operations.time_budget import StepTimes, deadline_from, should_leave
from pretrain.operations.watchdog import Watchdog

AllReduceMax = Callable[[list[float]], list[float]]
_SIGNALS = {s.name: int(s) for s in HANDLED}


@dataclass
class Decision:
    stop: str | None = None     # "signal SIGUSR1" | "time_limit" | None
    save: bool = False          # a checkpoint is due (periodic, or before leaving)


class RunOperations:
    def __init__(self, cfg: RunConfig, run_dir: Path, rank: int, world_size: int,
                 all_reduce_max: AllReduceMax, report: Callable[[str], None] = print):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.rank, self.world_size = rank, world_size
        self.agree = all_reduce_max
        self.report = report
        tr = cfg.train
        self.guard = NonFiniteGuard(tr.nonfinite_policy, tr.nonfinite_max_consecutive)
        self.signals = SignalFlag()
        self.lock = RunLock(self.run_dir)
        self.times = StepTimes()
        self.watchdog: Watchdog | None = None
        self.deadline = float("inf")
        self.last_save = time.time()
        self.last_save_s = 0.0
        self.writer = None

    # ---- before any work
    def open(self) -> None:
        """Rank 0 takes the run lock and checks / prepares the run directory; every rank learns
        whether that worked (a refusal is raised on every rank, nothing was written)."""
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.lock.acquire()
                prepare_run_dir(self.cfg, self.run_dir)
            except (OperationsExit, ConfigError) as err:
                self.lock.release()
                error = err
        failed = self.agree([1.0 if error is not None else 0.0])[0]
        if error is not None:
            raise error
        if failed:
            raise OperationsExit("rank 0 refused the run directory (see its error)", EXIT_BAD_INPUT)
        try:
            self.deadline = deadline_from(time.time(), self.cfg.train.time_limit_s)
        except ValueError as err:
            self.lock.release()
            raise ConfigError(str(err)) from None

    def resume(self, load: Callable[[Path], dict]) -> tuple[Path | None, dict | None]:
        """(checkpoint, trainer state) to resume from per checkpoint.resume, or (None, None)."""
        from pretrain.checkpoint.fallback import checkpoint_problem, choose_checkpoint, load_newest_good

        mode = self.cfg.checkpoint.resume
        if mode == "none":
            return None, None
        if mode != "auto":
            path = Path(mode)
            if not path.exists():
                raise ConfigError(f"checkpoint.resume={mode!r}: no such checkpoint")
            problem = checkpoint_problem(path) if self.rank == 0 else None
            if self.agree([1.0 if problem else 0.0])[0]:
                raise ConfigError(f"checkpoint.resume={mode!r}: cannot resume from it: {problem or 'see rank 0'}")
            return path, load(path)
        candidates, start = choose_checkpoint(self.run_dir, self.report, self.agree)
        path, state = load_newest_good(candidates, start, load, self.report, self.world_size)
        if candidates and path is None:
            raise ConfigError(f"no checkpoint in {self.run_dir / 'checkpoints'} can be resumed from (see the "
                              f"warnings above); remove the damaged ones, or start over with "
                              f"checkpoint.resume=none checkpoint.overwrite=true")
        if path is not None and path != candidates[0]:
            self.report(f"resuming from {path}, the newest checkpoint that loads")
        return path, state

    def start(self, writer) -> None:
        self.writer = writer
        self.signals.install()
        self.last_save = time.time()
        tr = self.cfg.train
        if tr.watchdog_factor > 0:
            self.watchdog = Watchdog(self.run_dir / ".heartbeat", self.rank, self.world_size,
                                     tr.watchdog_factor, tr.watchdog_min_s).start()

    # ---- every step
    def before_step(self, step: int) -> None:
        self.guard.step = step
        if self.watchdog:
            self.watchdog.step_started(step)

    def after_step(self, seconds: float) -> str:
        """'continue' or 'rollback' (raises NonFiniteStop per the policy)."""
        self.times.add(seconds)
        if self.watchdog:
            self.watchdog.step_done(seconds)
        return self.guard.action()

    def suspended(self):
        return self.watchdog.suspended() if self.watchdog else contextlib.nullcontext()

    def boundary(self, done: int) -> Decision:
        """The one all-reduce per step: did any rank get a signal, reach the time budget, or find
        a periodic checkpoint due?"""
        if self.writer is not None:
            self.writer.check()   # a background save that failed stops the run here
        now = time.time()
        sig = self.signals.pending()
        save_s = max(self.last_save_s, getattr(self.writer, "last_total_s", 0.0))
        late = should_leave(now, self.deadline, self.times.slowest(), save_s)
        every = self.cfg.checkpoint.every_minutes
        due = every > 0 and now - self.last_save >= 60.0 * every
        sig_v, late_v, due_v = self.agree([float(_SIGNALS.get(sig, 1) if sig else 0), float(late), float(due)])
        if sig_v:
            name = next((n for n, v in _SIGNALS.items() if v == int(sig_v)), sig or "signal")
            return Decision(stop=f"signal {name}", save=True)
        if late_v:
            return Decision(stop="time_limit", save=True)
        return Decision(save=bool(due_v))

    # ---- checkpoints
    def check_weights(self, parts) -> None:
        """Refuse to checkpoint non-finite weights (all ranks agree)."""
        from pretrain.operations.nonfinite import all_finite

        bad = 0.0 if all_finite(p for part in parts for p in part.parameters()) else 1.0
        if self.agree([bad])[0]:
            raise NonFiniteStop(f"the weights hold non-finite values at step {self.guard.step}; no checkpoint "
                                f"was written; rerun to resume from the newest checkpoint")

    def save(self, save: Callable[[bool], Path], parts, blocking: bool) -> Path:
        """Write a checkpoint through `save(blocking)`, after checking the weights are finite."""
        self.check_weights(parts)
        started = time.perf_counter()
        with self.suspended():
            path = save(blocking)
        if blocking:
            self.last_save_s = time.perf_counter() - started
        self.last_save = time.time()
        return path

    def rollback(self, load: Callable[[Path], dict], step: int) -> Path:
        """Back to the newest checkpoint that loads; the data position is kept, so the window of
        batches that produced the non-finite steps is skipped."""
        from pretrain.checkpoint.fallback import choose_checkpoint, load_newest_good

        if self.writer is not None:
            self.writer.wait()
        candidates, start = choose_checkpoint(self.run_dir, self.report, self.agree)
        path, _ = load_newest_good(candidates, start, load, self.report, self.world_size)
        if path is None:
            raise NonFiniteStop(f"stopped by the non-finite guard: {self.guard.describe()}; no checkpoint to "
                                f"roll back to")
        self.report(f"non-finite guard: {self.guard.describe()}; rolled back to {path}, continuing after "
                    f"step {step} (the batches since the checkpoint are skipped)")
        return path

    def leave(self, done: int, reason: str) -> RunInterrupted:
        if self.rank == 0:
            where = write_requeue_file(done, reason)
            self.report(f"stopping at step {done} ({reason}): checkpoint written"
                        + (f", requeue requested in {where}" if where else "") + "; rerun to resume")
        return RunInterrupted(f"interrupted at step {done} ({reason}); a checkpoint was written, rerun to resume")

    def close(self) -> None:
        if self.watchdog:
            self.watchdog.stop()
        self.signals.restore()
        self.lock.release()
