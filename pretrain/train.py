"""Train: python -m pretrain.train [preset=demo|from_scratch|continual] [key=value ...]"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pretrain.config import ConfigError, to_run_config


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pretrain.trainer.loop import train

    from pretrain.operations.exit_codes import CheckpointWriteError, OperationsExit

    try:
        train(to_run_config(cfg))
    except ConfigError as err:  # raised before any work is done, and names the key
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except (OperationsExit, CheckpointWriteError) as err:  # requeue (75), non-finite stop, disk full, run dir in use: one line
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        sys.exit(err.code)


if __name__ == "__main__":
    main()
