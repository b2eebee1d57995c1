"""Compilation is not a hang: the watchdog's clock stops while this rank or a live peer compiles and
restarts when a compilation ends; a step that compiled is not a step time. A real hang is still
reported - also right after a compilation. Plus the compile-event counts the metrics show."""
import json
import os
import subprocess
import sys
import time

import torch

from pretrain.operations.compile_events import CompileEvents, compile_events, frame_compile_count
from pretrain.operations.exit_codes import EXIT_HANG
from pretrain.operations.watchdog import Watchdog


def test_compile_events_count_recompiles_and_time():
    ev = CompileEvents()
    ev.started("DYNAMO", "0/0", now=10.0)
    assert ev.active == 1
    ev.ended(now=12.5)
    ev.started("LAZY_BACKWARD", "0/0", now=13.0)
    ev.ended(now=14.0)
    ev.started("DYNAMO", "0/1", now=20.0)
    ev.ended(now=21.0)
    assert (ev.active, ev.compiles, ev.recompiles, ev.backward_compiles) == (0, 2, 1, 1)
    assert ev.seconds == 4.5 and ev.last_end == 21.0
    assert ev.metrics() == {"compile_graphs": 2, "compile_recompiles": 1, "compile_backward_graphs": 1,
                            "compile_s": 4.5}
    assert frame_compile_count("3/2") == 2 and frame_compile_count("!1/3/4") == 4 and frame_compile_count(None) == 0


def test_torch_compile_feeds_the_events_also_after_a_dynamo_reset():
    torch._dynamo.reset()  # clears torch's callbacks: compile_events() registers again
    ev = compile_events()
    before = ev.compiles, ev.recompiles
    f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    f(torch.ones(3))
    f(torch.ones(5))        # another shape: a recompile
    f(torch.ones(5))        # cached
    assert (ev.compiles - before[0], ev.recompiles - before[1]) == (2, 1)
    assert ev.active == 0 and ev.last_end > 0


def armed_dog(tmp_path, ev: CompileEvents, world_size: int = 1) -> Watchdog:
    dog = Watchdog(tmp_path, rank=0, world_size=world_size, factor=10, floor_s=2.0, compiles=ev)
    dog._write()
    dog.step_started(0)
    ev.started("DYNAMO", "0/0")
    ev.ended()
    dog.step_done(40.0)                     # compiled: not a step time, not armed yet
    assert dog.limit() is None and dog.check(time.time() + 100) is None
    dog.step_started(1)
    dog.step_done(0.05)                     # armed: limit max(10 x 0.05, 2) = 2 s
    assert dog.limit() == 2.0
    return dog


def test_a_compiling_rank_is_not_hung_and_the_clock_restarts_after(tmp_path):
    ev = CompileEvents()
    dog = armed_dog(tmp_path, ev)
    dog.step_started(2)
    ev.started("DYNAMO", "0/1")             # a recompile in step 2, far longer than the limit
    assert dog.check(time.time() + 600) is None
    end = time.time() + 600
    ev.ended(now=end)
    assert dog.check(end + 1.5) is None     # 1.5 s after the compilation: under the limit
    report = dog.check(end + 3.0)           # then stuck: a hang like any other
    assert report is not None and "rank 0 step 2 has run 3.0 s" in report


def test_a_peer_compiling_or_just_done_stops_the_clock_but_a_stale_peer_does_not(tmp_path):
    ev = CompileEvents()
    dog = armed_dog(tmp_path, ev, world_size=2)
    dog.step_started(2)
    now = time.time() + 10                  # this rank waits in a collective for rank 1
    peer = tmp_path / "rank_1.json"
    peer.write_text(json.dumps({"rank": 1, "step": 2, "alive": now, "compiling": True, "compile_end": 0.0}))
    assert dog.check(now) is None
    peer.write_text(json.dumps({"rank": 1, "step": 2, "alive": now, "compiling": False, "compile_end": now - 1}))
    assert dog.check(now) is None           # rank 1 compiled until 1 s ago
    peer.write_text(json.dumps({"rank": 1, "step": 2, "alive": now, "compiling": False, "compile_end": now - 5}))
    assert "rank 0 step 2 has run 5.0 s" in dog.check(now)
    # a SIGSTOPped rank's last heartbeat said "compiling": stale, so it no longer excuses the wait
    peer.write_text(json.dumps({"rank": 1, "step": 2, "alive": now - 60, "compiling": True, "compile_end": 0.0}))
    report = dog.check(now)
    assert "rank 1: no heartbeat for 60 s" in report


SLOW_COMPILE = """
import sys, time
sys.path.insert(0, {root!r})
import torch
from pretrain.operations.watchdog import Watchdog

def slow_backend(gm, example_inputs):      # a compiler that takes 4 s (8 x the watchdog's floor)
    time.sleep(4)
    return gm.forward

f = torch.compile(lambda x: torch.sin(x) + 1, backend=slow_backend, dynamic=False)
dog = Watchdog({dir!r}, rank=0, world_size=1, factor=10, floor_s=0.5).start()
dog.step_started(0); time.sleep(0.01); dog.step_done(0.01)        # armed: limit 0.5 s
dog.step_started(1); f(torch.ones(3)); dog.step_done(4.0)        # first compilation
dog.step_started(2); f(torch.ones(4, 2)); dog.step_done(4.0)     # a recompilation (new shape)
print("compiled without a hang report", flush=True)
dog.step_started(3)
def stuck_in_a_collective():
    time.sleep(30)
stuck_in_a_collective()
"""


def test_slow_compilation_is_not_a_hang_but_a_real_hang_is(tmp_path):
    """A real process: two 4 s compilations under a 0.5 s limit pass; then a step that never ends is
    reported (stacks dumped, exit 76)."""
    script = SLOW_COMPILE.format(root=os.getcwd(), dir=str(tmp_path / "beats"))
    started = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "compiled without a hang report" in proc.stdout, proc.stderr[-2000:]
    assert proc.returncode == EXIT_HANG, proc.stderr[-2000:]
    assert "watchdog: rank 0 step 3" in proc.stderr and "stuck_in_a_collective" in proc.stderr
    assert time.time() - started < 60
