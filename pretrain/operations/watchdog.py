"""Hang watchdog: a thread per rank that notices when a step takes far longer than usual, dumps
this rank's Python stacks (faulthandler), names the rank(s) that stopped advancing and exits with
EXIT_HANG, long before the process-group timeout (train.collective_timeout_s) would end the job
and blame a healthy rank.

    limit = max(train.watchdog_factor x median(recent step times), train.watchdog_min_s)

Armed once a step has completed without a compilation on this rank (the first step's time, and
any step's that compiled, would be warm-up, not a step time), and paused around evaluation and
checkpointing. Compilation (torch.compile, pretrain/operations/compile_events.py) is never a hang:
while this rank or any peer compiles, the step's clock stops; when a compilation ends on any rank,
it restarts from zero - a rank waiting in a collective for a peer that recompiles is waiting for
the compiler, not stuck. Peers' compilation state comes from their heartbeats. Each rank's thread writes a heartbeat file
<dir>/rank_<r>.json ({step, alive, progress}) every `interval` seconds; a SIGSTOPped or wedged
process writes none, so every live rank can tell which peer is stuck: the one whose heartbeat went
stale, else the one behind in steps. The directory is the run directory's .heartbeat/ (shared
between nodes like the checkpoints).
"""
from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from pretrain.files import write_atomic
from pretrain.operations.compile_events import CompileEvents, compile_events
from pretrain.operations.exit_codes import EXIT_HANG
from pretrain.operations.time_budget import StepTimes


def hang_limit(median_s: float | None, factor: float, floor_s: float) -> float | None:
    """Seconds a step may take before it counts as hung (None: not armed yet)."""
    if median_s is None:
        return None
    return max(factor * median_s, floor_s)


def read_heartbeats(directory: Path) -> dict[int, dict]:
    beats = {}
    for f in Path(directory).glob("rank_*.json"):
        try:
            beats[int(f.stem.split("_")[1])] = json.loads(f.read_text())
        except (ValueError, OSError):
            continue  # being replaced right now, or a foreign file
    return beats


def stuck_ranks(beats: dict[int, dict], world_size: int, now: float, stale_s: float) -> dict[int, str]:
    """{rank: why} for the ranks that stopped advancing: no heartbeat for stale_s (a stopped or
    wedged process), a missing heartbeat file, or (when every rank is alive) behind in steps."""
    out = {}
    for rank in range(world_size):
        beat = beats.get(rank)
        if beat is None:
            out[rank] = "no heartbeat file"
        elif now - beat["alive"] > stale_s:
            out[rank] = f"no heartbeat for {now - beat['alive']:.0f} s (at step {beat['step']}, host {beat.get('host')}, pid {beat.get('pid')})"
    if not out and beats:
        newest = max(b["step"] for b in beats.values())
        for rank, beat in beats.items():
            if beat["step"] < newest:
                out[rank] = f"at step {beat['step']} while others reached step {newest}"
    return out


class Watchdog:
    def __init__(self, directory: Path, rank: int, world_size: int, factor: float, floor_s: float,
                 exit_fn=os._exit, stream=None, compiles: CompileEvents | None = None):
        self.directory = Path(directory)
        self.rank, self.world_size = rank, world_size
        self.factor, self.floor_s = factor, floor_s
        self.interval = max(0.05, min(1.0, floor_s / 4))
        self.times = StepTimes()
        self.step = 0
        self.progress = time.time()
        self.paused = 0
        self._compiles = compiles   # None: this process's (compile_events(), looked up when read)
        self._step_compiles = 0     # compilations (forward + backward) seen when the step started
        self.exit_fn = exit_fn
        self.stream = stream or sys.stderr
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def file(self) -> Path:
        return self.directory / f"rank_{self.rank}.json"

    # ---- called by the training loop
    def start(self) -> "Watchdog":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread = threading.Thread(target=self._run, name="layerskip-watchdog", daemon=True)
        self._thread.start()
        return self

    @property
    def compiles(self) -> CompileEvents:
        return compile_events() if self._compiles is None else self._compiles

    def _compile_count(self) -> int:
        return self.compiles.compiles + self.compiles.backward_compiles

    def step_started(self, step: int) -> None:
        self.step, self.progress = step, time.time()
        self._step_compiles = self._compile_count()

    def step_done(self, seconds: float) -> None:
        if self._compile_count() == self._step_compiles:  # a step that compiled is no step time
            self.times.add(seconds)
        self.progress = time.time()

    @contextlib.contextmanager
    def suspended(self):
        """Evaluation and checkpoints take longer than a step: not a hang."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1
            self.progress = time.time()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.file.unlink()
        with contextlib.suppress(OSError):
            self.directory.rmdir()  # the last rank out removes the (then empty) directory

    # ---- the thread
    def _write(self) -> None:
        payload = {"rank": self.rank, "step": self.step, "alive": time.time(), "progress": self.progress,
                   "compiling": self.compiles.active > 0, "compile_end": self.compiles.last_end,
                   "host": socket.gethostname(), "pid": os.getpid()}
        try:
            write_atomic(self.file, json.dumps(payload), durable=False)  # rewritten every few seconds
        except OSError:
            pass  # a full disk must not kill the run from here

    def limit(self) -> float | None:
        return hang_limit(self.times.median(), self.factor, self.floor_s)

    def check(self, now: float) -> str | None:
        """The hang report when the current step is over the limit, else None."""
        limit = self.limit()
        if self.paused or limit is None or self.compiles.active:
            return None
        since = max(self.progress, self.compiles.last_end)
        if now - since <= limit:
            return None
        beats, stale_s = read_heartbeats(self.directory), max(3 * self.interval, 1.0)
        live = [b for b in beats.values() if now - b.get("alive", 0.0) <= stale_s]  # a stopped rank's flag is stale
        if any(b.get("compiling") for b in live):
            return None
        since = max([since] + [b.get("compile_end", 0.0) for b in live])
        if now - since <= limit:
            return None
        stuck = stuck_ranks(beats, self.world_size, now, stale_s=stale_s)
        stuck.pop(self.rank, None)
        names = "; ".join(f"rank {r}: {why}" for r, why in sorted(stuck.items())) or \
            "no other rank looks stuck (this rank may be the one hanging, e.g. in I/O)"
        return (f"watchdog: rank {self.rank} step {self.step} has run {now - since:.1f} s (since its start or the "
                f"last compilation on any rank), over the "
                f"limit {limit:.1f} s (max({self.factor:g} x median step {self.times.median():.3f} s, "
                f"train.watchdog_min_s={self.floor_s:g})); stuck: {names}; exiting with code {EXIT_HANG}")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._write()
            report = self.check(time.time())
            if report is not None:
                print(report, file=self.stream, flush=True)
                faulthandler.dump_traceback(file=self.stream, all_threads=True)
                self.stream.flush()
                self.exit_fn(EXIT_HANG)
                return
