"""Signals that ask the run to leave cleanly: SIGTERM (Slurm preemption / scancel), SIGUSR1 (the
early warning `sbatch --signal=B:USR1@<s>` sends), SIGINT (Ctrl-C) and SIGHUP (the terminal or SSH
session closed; the console is then gone, and the metrics sinks silence it, pretrain/metrics/sinks.py).

The handler only records the signal (async-signal-safe: an attribute store); the training loop
reads `pending()` at the next step boundary, all ranks agree on it through one all-reduce, and the
run writes a checkpoint and exits with EXIT_REQUEUE. A second SIGINT raises KeyboardInterrupt
at once, so an impatient Ctrl-C still stops a run that does not reach a step boundary.
"""
from __future__ import annotations

import signal
import threading

HANDLED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


class SignalFlag:
    """Installs handlers for HANDLED on `install()` (main thread only), restores the previous
    ones on `restore()`. `pending()` is the name of the first signal received, or None."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum).name

    def install(self) -> "SignalFlag":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread (e.g. a test runner)
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def pending(self) -> str | None:
        return self.received
