"""The operations side of one training invocation, as the few calls the training loop makes:

    ops = RunOperations(cfg, run_dir, rank, world_size, all_reduce_max, report)
    ops.open()                        # run lock, time budget (before anything is written)
    ops.start()                       # signals, watchdog
    checkpointer.start(ops, ...)      # the checkpointer asks ops at each step boundary
    for each step:
        ops.before_step(step); result = trainer.train_step(...)   # trainer.apply_update = ops.guard
        if ops.after_step(seconds) == "rollback": ops.rolled_back(checkpointer.rollback(), step)
        ... log, evaluate (inside `with ops.suspended():`) ...
        stop = checkpointer.maybe_save(done, ops.guard.clean)    # asks ops.stop_votes / stop_reason
        if stop: raise ops.leave(done, stop)                     # RunInterrupted (exit 75)
    ops.close()

What ops tells the Checkpointer (its RunHooks): whether a signal arrived or the time limit is near
(the votes are agreed in the Checkpointer's one all-reduce per step, so every rank takes the same
decision), and a pause for the hang watchdog while a checkpoint is written.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable

from pretrain.config import ConfigError, RunConfig
from pretrain.operations.exit_codes import NonFiniteStop, OperationsExit, RunInterrupted, EXIT_BAD_INPUT
from pretrain.operations.nonfinite import NonFiniteGuard
from pretrain.operations.requeue import write_requeue_file
from pretrain.operations.run_lock import RunLock
from pretrain.operations.signals import HANDLED, SignalFlag
from pretrain.operations.time_budget import StepTimes, deadline_from, should_leave
from pretrain.operations.watchdog import Watchdog

AllReduceMax = Callable[[list[float]], list[float]]
_SIGNALS = {s.name: int(s) for s in HANDLED}


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

    # ---- before any work
    def open(self) -> None:
        """Rank 0 takes the run lock; every rank learns whether that worked (a refusal is raised
        on every rank, nothing was written). A deadline already past is refused: the run would
        train one step and ask for a requeue on every start."""
        error: BaseException | None = None
        if self.rank == 0:
            try:
                self.lock.acquire()
            except OperationsExit as err:
                error = err
        failed = self.agree([1.0 if error is not None else 0.0])[0]
        if error is not None:
            raise error
        if failed:
            raise OperationsExit("rank 0 refused the run directory (see its error)", EXIT_BAD_INPUT)
        try:
            now = time.time()
            self.deadline = deadline_from(now, self.cfg.train.time_limit_s)
            if self.deadline <= now:
                raise ValueError(f"env LAYERSKIP_DEADLINE={self.deadline:.0f}: the deadline passed "
                                 f"{now - self.deadline:.0f} s ago, so no step can run before it; unset it "
                                 f"or give a future unix time")
        except ValueError as err:
            self.lock.release()
            raise ConfigError(str(err)) from None

    def start(self) -> None:
        self.signals.install()
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

    # ---- what the Checkpointer asks at each step boundary (its RunHooks)
    def stop_votes(self, save_s: float) -> list[float]:
        """[signal number or 0, 1 if one more step and a save of `save_s` would cross the deadline]."""
        sig = self.signals.pending()
        late = should_leave(time.time(), self.deadline, self.times.slowest(), save_s)
        return [float(_SIGNALS.get(sig, 1) if sig else 0), float(late)]

    def stop_reason(self, agreed: list[float]) -> str | None:
        sig_v, late_v = agreed
        if sig_v:
            name = next((n for n, v in _SIGNALS.items() if v == int(sig_v)), "signal")
            return f"signal {name}"
        return "time_limit" if late_v else None

    # ---- faults
    def rolled_back(self, path: Path | None, step: int) -> Path:
        """After the Checkpointer rolled back to checkpoint `path` (None: there was none to go
        back to); the data position is kept, so the window of batches that produced the
        non-finite steps is skipped."""
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
