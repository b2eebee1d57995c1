"""Train: python -m pretrain.train [preset=demo|from_scratch|continual] [group=option] [key=value ...]

Overrides are Hydra's (conf/config.yaml lists the groups; every key of pretrain/config.py's
dataclasses can be set). `--cfg job` (or `--print-config`; `--resolve` resolves ${...}) prints the
composed configuration and exits; a misspelt key gets the closest one ("did you mean"). A bad value
exits with code 2 and one line naming the key, before any work is done or anything is written to
the run directory.
"""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

from pretrain.cli_overrides import parse_command_line
from pretrain.config import ConfigError, compose_run_config


def main(argv: list[str] | None = None) -> None:
    overrides = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return
    try:  # --cfg job / --print-config [--resolve]: the composed configuration, then exit
        line = parse_command_line(overrides)
        overrides = line.overrides
        if line.print_config:
            print(OmegaConf.to_yaml(compose_run_config(overrides)[1], resolve=line.resolve), end="")
            return
    except (ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    from pretrain.trainer.loop import train

    from pretrain.operations.exit_codes import CheckpointError, OperationsExit
    from pretrain.metrics.sinks import safe_print
    from pretrain.operations.launcher import record_exit_code  # for launch/torchrun.sh's exit code

    try:
        cfg, composed = compose_run_config(overrides)
        # Hydra's record of the run, written into the run directory once every check has passed
        record = {"hydra/overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(list(overrides))),
                  "hydra/config.yaml": OmegaConf.to_yaml(composed)}
        train(cfg, record)
        record_exit_code(0)
    except ConfigError as err:  # raised before any work is done, and names the key
        safe_print(f"config error: {err}", sys.stderr)
        record_exit_code(2)
        sys.exit(2)
    except (OperationsExit, CheckpointError) as err:  # requeue (75), non-finite stop, disk full, run/checkpoint dir in use: one line
        safe_print(f"{type(err).__name__}: {err}", sys.stderr)
        record_exit_code(err.code)
        sys.exit(err.code)


if __name__ == "__main__":
    main()
