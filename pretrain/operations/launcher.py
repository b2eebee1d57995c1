"""torchrun that passes the trainer's exit codes on (launch/torchrun.sh runs it):

    python -m pretrain.operations.launcher [torchrun options] -m pretrain.train [overrides]

Plain torchrun exits 1 with a traceback whenever a worker exits non-zero (ChildFailedError) or
torchrun itself is signalled (SignalException), so a batch script and Slurm see 1 where the
trainer said 75 (checkpointed, requeue) or 76 (hang). Here:
  - workers that failed: exit with the root cause's exit code (the first worker to fail); for 75,
    one line instead of torchrun's failure report;
  - torchrun signalled (SIGTERM at preemption, SIGHUP when the terminal closes, SIGINT, SIGUSR1):
    torchrun forwards the signal and waits for its workers; each worker leaves its exit code in
    $LAYERSKIP_EXIT_DIR (`record_exit_code`, called by pretrain.train), and when every worker of
    this node left the same one, that is the exit code (one line, no traceback); otherwise 1, as
    torchrun: the root cause is elsewhere (srun returns the highest code of its tasks, so a node
    whose workers were stopped must not hide the 76 or 75 another node's workers exited with).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

EXIT_DIR_ENV = "LAYERSKIP_EXIT_DIR"
MEANING = {75: "checkpoint written on a signal or at the time limit; rerun (requeue) to resume",
           76: "the hang watchdog fired", 65: "stopped by the non-finite guard",
           74: "a checkpoint could not be written", 2: "bad input"}


def record_exit_code(code: int) -> None:
    """Called by a worker just before it exits with `code` (no-op outside this launcher)."""
    directory = os.environ.get(EXIT_DIR_ENV)
    if not directory:
        return
    name = f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}-{os.environ.get('RANK', '0')}"
    try:
        Path(directory, name).write_text(str(code))
    except OSError:  # the launcher's directory is gone: it is not waiting for this any more
        pass


def recorded_codes(directory: Path) -> list[int]:
    """The exit codes the workers of the newest round recorded."""
    rows = []
    for f in directory.iterdir():
        restart, _, rank = f.name.partition("-")
        try:
            rows.append((int(restart), int(rank), int(f.read_text().strip())))
        except ValueError:
            continue
    newest = max((r for r, _, _ in rows), default=None)
    return [code for r, _, code in rows if r == newest]


def describe(code: int) -> str:
    return f"{code} ({MEANING[code]})" if code in MEANING else str(code)


def exit_code_after_signal(signum: int, codes: list[int], nproc: int | None) -> tuple[int, str]:
    """(exit code, line) when torchrun was signalled and its `nproc` workers (None: not known)
    recorded `codes`."""
    name = signal.Signals(signum).name
    nproc = nproc or len(codes)
    if codes and len(codes) == nproc and len(set(codes)) == 1:
        return codes[0], f"torchrun: {name}: all {nproc} workers of this node left with exit code {describe(codes[0])}"
    return 1, (f"torchrun: {name}: {len(codes)} of {nproc} workers of this node left by themselves "
                          f"(exit codes {sorted(set(codes)) or 'none'}); the others were stopped")


def ignore_late_signals() -> None:
    """torchrun is done; a repeated signal (srun terminating the step after the first one) must not
    kill it now and turn the exit code it is about to return into 128 + signal."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    exit_dir = Path(tempfile.mkdtemp(prefix="layerskip-exit-"))
    os.environ[EXIT_DIR_ENV] = str(exit_dir)  # the workers inherit it
    try:
        run(args)
        return 0
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        code = first.exitcode if first.exitcode > 0 else 128 - first.exitcode
        if code == 75:
            print(f"torchrun: workers exited {describe(code)}", file=sys.stderr, flush=True)
        else:
            print(err.format_msg(), file=sys.stderr, flush=True)
        return code
    except SignalException as err:
        nproc = int(str(args.nproc_per_node)) if str(args.nproc_per_node).isdigit() else None
        code, line = exit_code_after_signal(int(err.sigval), recorded_codes(exit_dir), nproc)
        print(line, file=sys.stderr, flush=True)
        return code
    finally:
        ignore_late_signals()
        shutil.rmtree(exit_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
