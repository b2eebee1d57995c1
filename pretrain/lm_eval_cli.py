"""lm-evaluation-harness's own command line, with the `layerskip` model registered:

    python -m pretrain.lm_eval_cli --model layerskip --model_args checkpoint=runs/demo,exit_layer=4 \\
        --tasks layerskip_tiny_mc --include_path pretrain/downstream/tasks [any other lm_eval flag]

lm-eval 0.4.13 finds models only in its own registry (no entry-point or plugin discovery), so a
plain `lm_eval --model layerskip` cannot see ours; this wrapper registers the name, then runs the
harness's unchanged `lm_eval` command (all its subcommands and flags: run, ls, validate). Errors a
user can fix (a bad model_args value, a missing checkpoint, a request longer than the model) end in one
line and exit code 2."""
from __future__ import annotations

import sys

from pretrain.downstream import register


def main() -> int:
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as err:   # bad model_args, paths, tasks: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
