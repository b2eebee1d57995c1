"""What torch.compile is doing in this process: whether a compilation runs right now, how many have
run, how many of them were recompilations, and the time they took.

Fed by torch's compilation callbacks (torch._dynamo.callback), which fire around every Dynamo frame
compilation (a first compile, or a recompile after a guard failed) and around the lazy compilation
of a backward graph (AOTAutograd compiles it at the first backward). Recompile: a compilation of a
frame that was compiled before (CompileId frame_compile_id > 0). Blocks share one code object, so
the count is over all blocks: a handful over a run is the shape variants settling (a block first
run on one row under layer dropout is specialised); a count that keeps growing with the steps is a
recompile storm (logged as `compile_recompiles` in metrics.jsonl).

The hang watchdog (pretrain/operations/watchdog.py) reads `active` and `last_end`: time spent
compiling is not a hang.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field


@dataclass
class CompileEvents:
    active: int = 0               # compilations running now (0 or 1: torch reports the outermost)
    compiles: int = 0             # forward (Dynamo frame) compilations, recompilations included
    recompiles: int = 0           # of those, compilations of a frame compiled before
    backward_compiles: int = 0    # lazy backward-graph compilations
    seconds: float = 0.0          # wall time spent in all of them
    last_end: float = 0.0         # time.time() when the latest one ended (0: none yet)
    _started: float = field(default=0.0, repr=False)

    def started(self, trigger: str, compile_id: str | None, now: float | None = None) -> None:
        """A compilation began (`trigger` "DYNAMO" or "LAZY_BACKWARD"; compile_id "frame/count")."""
        self._started = time.time() if now is None else now
        self.active += 1
        if trigger == "LAZY_BACKWARD":
            self.backward_compiles += 1
            return
        self.compiles += 1
        if frame_compile_count(compile_id) > 0:
            self.recompiles += 1

    def ended(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self.active:   # (none: registered while this compilation ran; its start went unseen)
            self.active -= 1
            self.seconds += now - self._started
        self.last_end = now

    def metrics(self) -> dict[str, float]:
        """The metrics.jsonl fields (cumulative over this process)."""
        return {"compile_graphs": self.compiles, "compile_recompiles": self.recompiles,
                "compile_backward_graphs": self.backward_compiles, "compile_s": round(self.seconds, 3)}


def frame_compile_count(compile_id: str | None) -> int:
    """How many times the frame was compiled before this compilation ("3/2" -> 2); 0 if unknown."""
    try:
        return int(str(compile_id).rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return 0


_events = CompileEvents()
_callbacks: tuple = ()
_lock = threading.Lock()


def compile_events() -> CompileEvents:
    """This process's CompileEvents, registered with torch's compilation callbacks once torch._dynamo
    is imported (torch.compile imports it; a process that never compiles does not pay for the
    import), and again if torch._dynamo.reset() cleared them. Cheap: call it where it is read."""
    global _callbacks
    module = sys.modules.get("torch._dynamo.callback")
    if module is None:
        return _events
    callback_handler = module.callback_handler
    with _lock:
        if not _callbacks or _callbacks[0] not in callback_handler.start_callbacks:
            _callbacks = (lambda args: _events.started(args.callback_trigger.name, args.compile_id),
                          lambda args: _events.ended())
            callback_handler.register_start_callback(_callbacks[0])
            callback_handler.register_end_callback(_callbacks[1])
        return _events
