"""Where metrics rows go: metrics.jsonl, Weights & Biases, TensorBoard, the console. Each is a sink,
and no sink can stop the run.

A sink that raises (W&B's service process killed by Slurm's step-wide SIGTERM -> ConnectionResetError
on the next log call; a full disk under metrics.jsonl; a closed terminal -> EIO on the console) is
reported once on stderr and switched off for the rest of the run; training, its checkpoints and its
exit code go on as if the sink were not there. KeyboardInterrupt and SystemExit still pass.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable


def silence_console() -> None:
    """Point stdout and stderr at /dev/null (the terminal is gone: every later write, and Python's
    final flush at exit, would fail and turn exit code 75 into 120)."""
    with open(os.devnull, "w") as null:
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(null.fileno(), stream.fileno())
            except (OSError, ValueError, AttributeError):
                pass


def safe_print(line: str, file=None) -> bool:
    """print(line) that never raises: on a dead console (EIO, EPIPE) it silences the console and
    returns False."""
    try:
        print(line, file=file or sys.stdout, flush=True)
        return True
    except (OSError, ValueError):
        silence_console()
        return False


class Sink:
    """One destination of metrics rows. `write(record, scalars)` gets the row and its numeric
    fields flattened to "kind/key/sub" names; `close()` ends it; `abandon()` frees what it can
    after it failed (must not raise)."""

    name = "sink"

    def write(self, record: dict[str, Any], scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        pass


class JsonlSink(Sink):
    name = "metrics.jsonl"

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record, scalars):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()

    def abandon(self):
        try:
            self.file.close()
        except OSError:
            pass


class WandbSink(Sink):
    name = "W&B"

    def __init__(self, run, run_dir: Path, eval_media: Callable):
        self.run, self.run_dir, self.eval_media = run, run_dir, eval_media

    def write(self, record, scalars):
        self.run.log(scalars, step=record.get("step"))
        if record.get("kind") == "eval":  # per-exit wandb.Table + figure (pretrain/metrics/wandb_eval.py)
            self.eval_media(self.run, record, self.run_dir)

    def close(self):
        self.run.finish()

    def abandon(self):
        """Tear down W&B's side so that its exit hook does not print a traceback at exit."""
        import wandb

        try:
            wandb.teardown()
        except Exception:  # the service is gone; nothing left to free
            pass


class TensorBoardSink(Sink):
    """Scalars under <run_dir>/tensorboard (`tensorboard --logdir runs/`), one tag per numeric
    field ("train/loss", "train/exit_loss/3", "eval/exit_2/agreement", ...)."""

    name = "TensorBoard"

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, record, scalars):
        step = record.get("step")
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class ConsoleSink(Sink):
    """The console: the progress bar (with its ETA) or plain lines. Rows reach it only as the
    console lines the loop passes to `log`/`write`."""

    name = "console"

    def __init__(self, bar):
        self.bar = bar

    def write(self, record, scalars):
        pass

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, steps: int, postfix: str | None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def abandon(self):
        silence_console()


class Sinks:
    """The run's sinks, each guarded: the first error of a sink is reported (one line on stderr)
    and the sink is dropped; `failed` names the dropped ones."""

    def __init__(self, sinks: list[Sink], report: Callable[[str], Any] | None = None):
        self.sinks = list(sinks)
        self.failed: list[str] = []
        self.report = report or (lambda line: safe_print(line, sys.stderr))

    def open(self, name: str, factory: Callable[[], Sink]) -> None:
        """Add the sink `factory()` builds; one that cannot start is reported and left out."""
        try:
            self.sinks.append(factory())
        except Exception as err:  # noqa: BLE001 - e.g. W&B online without network: the run goes on
            self.failed.append(name)
            self.report(f"warning: could not start logging to {name} ({type(err).__name__}: {err}); the run "
                        f"goes on without it")

    def guarded(self, sink: Sink, action: Callable[[], Any]) -> None:
        if sink not in self.sinks:
            return
        try:
            action()
        except Exception as err:  # noqa: BLE001 - whatever a sink raises, the run goes on
            self.drop(sink, err)

    def drop(self, sink: Sink, err: BaseException) -> None:
        self.sinks.remove(sink)
        self.failed.append(sink.name)
        self.report(f"warning: logging to {sink.name} failed ({type(err).__name__}: {err}); {sink.name} is "
                    f"off for the rest of this run (training and checkpoints go on)")
        try:
            sink.abandon()
        except Exception:  # noqa: BLE001
            pass

    def write(self, record: dict[str, Any], scalars: dict[str, float]) -> None:
        for sink in list(self.sinks):
            self.guarded(sink, lambda: sink.write(record, scalars))

    def close(self) -> None:
        for sink in list(self.sinks):
            self.guarded(sink, sink.close)
        self.sinks.clear()
