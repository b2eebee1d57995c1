"""Process-group initialisation (the one place that does it) and the run's DeviceMesh.

The mesh has the dimensions (pp, dp_replicate, dp_shard, tp), in that order, keeping only those
of size > 1; `ParallelContext` answers the questions the trainer asks of it (data-parallel rank
and group, pipeline rank and group, the sub-meshes FSDP and tensor parallelism shard over).
The layout is checked (`check_layout`) before the process group is created.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pretrain.config import RunConfig
from pretrain.device import distributed_backend, select_device
from parallel.layout import Layout, check_layout

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


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


@dataclass
class ParallelContext:
    layout: Layout
    device: torch.device
    mesh: DeviceMesh | None = None
    _groups: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def has(self, name: str) -> bool:
        return self.mesh is not None and name in (self.mesh.mesh_dim_names or ())

    def sub(self, *names: str) -> DeviceMesh | None:
        """The sub-mesh over those of `names` that the mesh has (None when it has none)."""
        present = tuple(n for n in names if self.has(n))
        if not present:
            return None
        return self.mesh[present if len(present) > 1 else present[0]]

    def _coordinate(self, name: str) -> int:
        return self.mesh.get_local_rank(name) if self.has(name) else 0

    # ---- data parallel: both dp dimensions together
    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def dp_rank(self) -> int:
        return self._coordinate("dp_replicate") * self.layout.dp_shard + self._coordinate("dp_shard")

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """What FSDP shards over: (dp_replicate, dp_shard) as HSDP, or the one present."""
        return self.sub("dp_replicate", "dp_shard")

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        if "dp" not in self._groups:
            mesh = self.dp_mesh
            if mesh is None:
                self._groups["dp"] = None
            elif mesh.ndim == 1:
                self._groups["dp"] = mesh.get_group()
            else:
                self._groups["dp"] = mesh._flatten("dp").get_group()
        return self._groups["dp"]

    # ---- tensor and pipeline parallel
    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return self.sub("tp")

    @property
    def tp_rank(self) -> int:
        return self._coordinate("tp")

    @property
    def pp_rank(self) -> int:
        return self._coordinate("pp")

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("pp") if self.has("pp") else None


def build_mesh(layout: Layout, device: torch.device) -> DeviceMesh | None:
    sizes = {"pp": layout.pp, "dp_replicate": layout.dp_replicate, "dp_shard": layout.dp_shard,
             "tp": layout.tp}
    names = tuple(n for n in MESH_DIMS if sizes[n] > 1)
    if not names:
        return None
    return init_device_mesh(device.type, tuple(sizes[n] for n in names), mesh_dim_names=names)


def setup_parallel(cfg: RunConfig, world_size: int | None = None) -> tuple[ParallelContext, bool]:
    """Check the layout against the launched world size, then (for more than one process)
    create the process group, unless one exists, and the mesh. Nothing collective happens
    before the check. Returns the context and whether this call created the process group."""
    world_size = launched_world_size() if world_size is None else world_size
    layout = check_layout(cfg, world_size)
    device = select_device(cfg.train.device, local_rank())
    if world_size == 1:
        return ParallelContext(layout=layout, device=device), False
    created = not dist.is_initialized()
    init_process_group(device, cfg.train.collective_timeout_s)
    return ParallelContext(layout=layout, device=device, mesh=build_mesh(layout, device)), created


def teardown_parallel(wait_for_peers: bool = True) -> None:
    """Leave the process group. After a success, once every rank is done (the barrier): otherwise a
    rank could tear down while a peer's last collective is still in flight, and gloo aborts the
    process at exit. After a failure, at once: peers may be stuck in a collective this rank never
    joins, and a barrier could wait on them for the whole process-group timeout."""
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()
