"""Run the real trainer entry (pretrain.trainer.loop.train) under torchrun, once per job given:

    torchrun --nproc-per-node N tests/parallel_scripts/train_entry.py OUT.json NAME:override,override ...

Each job is the Hydra overrides (comma separated) on top of conf/; rank 0 writes
{NAME: {step: loss}} to OUT.json. One process group serves all jobs of the launch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from common import ROOT, report
from pretrain.config import to_run_config
from pretrain.trainer.loop import train
from parallel.mesh import init_process_group


def main(out: str, jobs: list[str]) -> None:
    init_process_group(torch.device("cpu"))
    results = {}
    for job in jobs:
        name, overrides = job.split(":", 1)
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = to_run_config(compose(config_name="config", overrides=overrides.split(",")))
        summary = train(cfg)
        results[name] = summary["losses"]
        if dist.get_rank() == 0:
            report({"job": name, "losses": summary["losses"]})
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()  # no rank leaves while a peer's last collective is in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
