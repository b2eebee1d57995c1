"""`make demo`: python -m pretrain.demo [override ...] — train preset=demo, evaluate every exit, say
what to try next. It works every time it is typed, and says first which of these it does:

- new:      no checkpoint in the run directory (runs/demo): train from scratch;
- resume:   the demo's checkpoints, its final evaluation not written yet (Ctrl-C, a crash, a killed
            evaluation): continue from the newest checkpoint (checkpoint.resume=auto);
- restart:  a finished demo (eval.json holds the final step): start over in the same directory with
            checkpoint.resume=none checkpoint.overwrite=true, which replaces what the demo wrote
            there (checkpoints, eval.json, metrics.jsonl); any other file in it stays;
- refuse:   checkpoints of a run the demo did not start (hydra/overrides.yaml records other
            overrides, e.g. `pretrain.train preset=demo train.steps=5000`): nothing is touched,
            exit 2 with one line saying how to go on.

"The demo started it" means: the overrides recorded in the run directory are this command's (the
keys that only say where one invocation stops or how it resumes are left out of the comparison).
The trainer prints the per-exit table once at the end; the last line is one summary: steps, time,
run directory and the `pretrain.generate` command to try next.
"""
from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pretrain.config import ConfigError, compose_run_config
from pretrain.operations.exit_codes import EXIT_REQUEUE
from pretrain.checkpoint.layout import list_checkpoints
from pretrain.trainer.loop import final_eval_done

DEMO = ["preset=demo"]
# keys that say how one invocation resumes or where it stops, not which run it is
PER_INVOCATION = ("checkpoint.resume=", "checkpoint.overwrite=", "train.stop_at_step=", "train.time_limit_s=")
RESTART = ["checkpoint.resume=none", "checkpoint.overwrite=true"]


@dataclass
class DemoPlan:
    action: str          # new | resume | restart | refuse
    step: int            # the newest checkpoint's step (0 when none)
    message: str         # the line printed before anything runs


def run_identity(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith(PER_INVOCATION)]


def recorded_overrides(run_dir: Path) -> list[str] | None:
    try:
        recorded = yaml.safe_load((run_dir / "hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    return [str(o) for o in recorded] if isinstance(recorded, list) else None


def plan_demo(run_dir: Path, overrides: list[str], steps: int) -> DemoPlan:
    """What `make demo` does with the run directory as it is (pure: reads, never writes)."""
    found = list_checkpoints(run_dir)   # oldest first
    if not found:
        return DemoPlan("new", 0, f"demo: a new run in {run_dir} ({steps} steps)")
    step = found[-1][0]
    recorded = recorded_overrides(run_dir)
    if recorded is None or run_identity(recorded) != run_identity(overrides):
        how = (f"resume it with `{python_command()} -m pretrain.train {shlex.join(recorded)}`, or move it away and "
               f"run `make demo` again" if recorded else "its overrides are not recorded; move it away and run "
               "`make demo` again")
        return DemoPlan("refuse", step, f"demo: {run_dir} holds checkpoints of a run the demo did not start; "
                        f"left as it is: {how}")
    if final_eval_done(run_dir, steps):
        return DemoPlan("restart", step, f"demo: {run_dir} holds a finished demo ({steps} steps); starting over "
                        f"(its checkpoints, eval.json and metrics.jsonl are replaced, other files stay)")
    return DemoPlan("resume", step, f"demo: resuming the interrupted demo in {run_dir} from step {step} of {steps}")


def python_command() -> str:
    """How to call this interpreter from the current directory (.venv/bin/python after make setup)."""
    exe = Path(sys.executable).absolute()  # not resolved: .venv/bin/python may be a link
    try:
        return str(exe.relative_to(Path.cwd().absolute()))
    except ValueError:
        return "python"


def newest_step(run_dir: Path) -> int:
    found = list_checkpoints(run_dir)
    return found[-1][0] if found else 0


def summary_line(run_dir: Path, first: int, last: int, steps: int, seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    generate = (f"{python_command()} -m pretrain.generate --checkpoint {shlex.quote(str(run_dir))} "
                f"--prompt 'def main(' --max-new-tokens 64")
    done = "done" if last >= steps else f"paused (`make demo` continues from step {last})"
    return (f"demo {done}: steps {first}->{last} of {steps} in {minutes}m{secs:02d}s, run dir {run_dir}; "
            f"try: {generate}")


def main(argv: list[str] | None = None) -> None:
    extra = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in extra):
        print(__doc__)
        return
    overrides = [*DEMO, *extra]
    try:
        cfg = compose_run_config(overrides)[0]
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    run_dir, steps = Path(cfg.run_dir), cfg.train.steps
    plan = plan_demo(run_dir, overrides, steps)
    print(plan.message, flush=True)
    if plan.action == "refuse":
        sys.exit(2)
    from pretrain.train import main as train_main

    started = time.perf_counter()
    try:
        train_main(overrides + (RESTART if plan.action == "restart" else []))
    except SystemExit as leave:
        if leave.code == EXIT_REQUEUE:  # a signal (Ctrl-C) or the time limit: a checkpoint was written
            print(f"demo stopped at step {newest_step(run_dir)} of {steps}: type `make demo` again to resume",
                  file=sys.stderr)
        raise
    except KeyboardInterrupt:  # before the trainer handles signals (start-up): nothing to resume yet
        print("demo interrupted during start-up: type `make demo` again", file=sys.stderr)
        sys.exit(130)
    first, last = (0 if plan.action in ("new", "restart") else plan.step), newest_step(run_dir)
    print(summary_line(run_dir, first, last, steps, time.perf_counter() - started), flush=True)


if __name__ == "__main__":
    main()
