"""The parallel degrees of a run and everything derived from them: products, pipeline stages,
the device mesh, and this rank's coordinates and process groups.

The mesh has the dimensions (pp, dp_replicate, dp_shard, tp), in that order, keeping only those of
size > 1; with one process there is no mesh and every coordinate is 0. The degrees are checked
against the model and the job (pretrain.config.check_layout) before a ParallelDims is made.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")
# Schedules with one stage per rank, and those that loop over `virtual_stages` per rank.
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B",)
SCHEDULES = SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES


@dataclass
class ParallelConfig:
    """The degrees as a run configures them (its `parallel` keys)."""
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    pp_schedule: str = "1F1B"      # GPipe, 1F1B or Interleaved1F1B
    microbatches: int = 0          # pipeline micro-batches per step and data-parallel rank; 0 = per-rank
                                   # batch / train.micro_batch_size
    virtual_stages: int = 1        # pipeline stages held by each pp rank
    fsdp_reduce_every_micro_batch: bool = True   # FSDP/HSDP without pipelining: reduce-scatter each
                                   # micro-batch's gradients (sharded accumulation); false: once a step,
                                   # accumulating unsharded float32 gradients (less traffic, far more memory)


@dataclass
class ParallelDims(ParallelConfig):
    """The degrees as resolved (pretrain.config.check_layout), the device, and this rank's view."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: DeviceMesh | None = None
    _groups: dict = field(default_factory=dict, repr=False)

    # ---- degrees
    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def build_mesh(self) -> None:
        """Create the device mesh (the default process group must exist when world_size > 1)."""
        sizes = {n: getattr(self, n) for n in MESH_DIMS}
        names = tuple(n for n in MESH_DIMS if sizes[n] > 1)
        if names:
            self.mesh = init_device_mesh(self.device.type, tuple(sizes[n] for n in names), mesh_dim_names=names)

    # ---- this rank
    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _has(self, name: str) -> bool:
        return self.mesh is not None and name in (self.mesh.mesh_dim_names or ())

    def _coordinate(self, name: str) -> int:
        return self.mesh.get_local_rank(name) if self._has(name) else 0

    @property
    def dp_rank(self) -> int:
        return self._coordinate("dp_replicate") * self.dp_shard + self._coordinate("dp_shard")

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """What FSDP shards over: (dp_replicate, dp_shard) as HSDP, or the one present."""
        present = tuple(n for n in ("dp_replicate", "dp_shard") if self._has(n))
        if not present:
            return None
        return self.mesh[present if len(present) > 1 else present[0]]

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        if "dp" not in self._groups:
            mesh = self.dp_mesh
            self._groups["dp"] = (None if mesh is None else mesh.get_group() if mesh.ndim == 1
                                  else mesh._flatten("dp").get_group())
        return self._groups["dp"]

    @property
    def tp_mesh(self) -> DeviceMesh | None:
        return self.mesh["tp"] if self._has("tp") else None

    @property
    def tp_rank(self) -> int:
        return self._coordinate("tp")

    @property
    def pp_rank(self) -> int:
        return self._coordinate("pp")

    @property
    def pp_group(self) -> dist.ProcessGroup | None:
        return self.mesh.get_group("pp") if self._has("pp") else None


def canonical_schedule(name: str) -> str | None:
    """The schedule's canonical spelling (case-insensitive match), or None when unknown."""
    return {s.lower(): s for s in SCHEDULES}.get(name.lower())
