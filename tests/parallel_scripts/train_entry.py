"""Run the real trainer entry (pretrain.trainer.loop.train) under torchrun, once per job given:

    torchrun --nproc-per-node N tests/parallel_scripts/train_entry.py NAME:override,override ...

Each job is the Hydra overrides (comma separated) on top of conf/; rank 0 prints a RESULT line
{"job": NAME, "losses": {step: loss}} per job. One process group serves all jobs of the launch.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from common import ROOT, report
from pretrain.config import to_run_config
from pretrain.trainer.loop import train
from parallel.mesh import init_process_group, teardown_parallel


def main(jobs: list[str]) -> None:
    init_process_group(torch.device("cpu"))
    for job in jobs:
        name, overrides = job.split(":", 1)
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = to_run_config(compose(config_name="config", overrides=overrides.split(",")))
        summary = train(cfg)
        if dist.get_rank() == 0:
            report({"job": name, "losses": summary["losses"]})
    teardown_parallel()


if __name__ == "__main__":
    main(sys.argv[1:])
