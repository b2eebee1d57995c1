"""Process-group initialisation (the one place that does it), the run's device mesh, and leaving.

The degrees are checked (pretrain.config.check_layout) before `setup_parallel` runs, so nothing
collective happens for an impossible layout.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from pretrain.device import distributed_backend
from parallel.dims import ParallelDims


def launched_world_size() -> int:
    """Processes in this job, as the launcher (torchrun / Slurm via torchrun) announces them."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_process_group(device: torch.device, timeout_s: float = 600.0) -> None:
    """Create the default process group once, with the back-end that fits the device."""
    if dist.is_initialized():
        return
    kwargs = {"device_id": device} if device.type != "cpu" else {}
    dist.init_process_group(backend=distributed_backend(device), timeout=timedelta(seconds=timeout_s),
                            **kwargs)


def setup_parallel(dims: ParallelDims, timeout_s: float = 600.0) -> bool:
    """For more than one process: create the process group, unless one exists, and the mesh.
    Returns whether this call created the process group."""
    if not dims.distributed:
        return False
    created = not dist.is_initialized()
    init_process_group(dims.device, timeout_s)
    dims.build_mesh()
    return created


def teardown_parallel(wait_for_peers: bool = True) -> None:
    """Leave the process group. After a success, once every rank is done (the barrier): otherwise a
    rank could tear down while a peer's last collective is still in flight, and gloo aborts the
    process at exit. After a failure, at once: peers may be stuck in a collective this rank never
    joins, and a barrier could wait on them for the whole process-group timeout."""
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
