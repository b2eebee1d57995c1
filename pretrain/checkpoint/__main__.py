"""Look at a run's checkpoints, and vouch for one that cannot be verified:

    python -m pretrain.checkpoint check RUN_DIR|CHECKPOINT    # each checkpoint: ok, or why not
    python -m pretrain.checkpoint trust CHECKPOINT            # write checksums.json for it as it is

A checkpoint without checksums.json (written before checksums existed, or copied without it) is
not loaded by resume, eval, generate or export; `trust` is the explicit override: its files as
they are now become the reference. Exit 0 when every checkpoint checked is sound / the trust was
recorded, 1 when one is not, 2 on bad input."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain.checkpoint.integrity import checkpoint_problem, trust
from pretrain.checkpoint.layout import list_checkpoints
from pretrain.checkpoint.loader import names_one_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.checkpoint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["check", "trust"])
    ap.add_argument("path", type=Path)
    args = ap.parse_args(argv)
    if not args.path.exists():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 2
    if args.command == "trust":
        try:
            print(trust(args.path))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
    found = [args.path] if names_one_checkpoint(args.path) else [p for _, p in list_checkpoints(args.path)]
    if not found:
        print(f"error: {args.path} holds no checkpoint (expected {args.path}/checkpoints/step_*/)", file=sys.stderr)
        return 2
    problems = {path: checkpoint_problem(path) for path in found}
    for path, problem in problems.items():
        print(f"{path}: {problem or 'ok'}")
    return 1 if any(problems.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
