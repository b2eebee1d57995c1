"""A cluster of N devices inside this one CPU process: torch's fake process group (backend "fake":
every collective returns at once, data untouched) at a chosen rank, and FakeTensorMode (tensors
with shapes, dtypes and devices but no storage), as torchtitan's scripts/estimate/estimation.py
does. What the real training step needs from data is supplied here:

  * scalars read from tensors (token counts, gradient norms, losses: aten._local_scalar_dense) are
    answered with 1 - none of them changes a tensor's size; a boolean mask selects everything;
  * a DeviceMesh computes its rank layout on real tensors (fake mode would make it data-dependent);
  * Module.to on a fake model is a no-op (the parameters already live on the simulated device).
"""
from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode,
                                          unset_fake_temporarily)
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode


class ScalarsAreOne(TorchDispatchMode):
    """Under FakeTensorMode, reading the value of a tensor that has no data (`.item()`, `float(t)`,
    `int(t)` of a token count, a norm, a loss) gives 1 (True for bool); values FakeTensorMode knows
    (constants torch builds internally, e.g. for shard offsets) are read as they are. A boolean
    mask's nonzero (x[mask]) selects every element: the largest result, the worst case for memory."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        try:
            return func(*args, **(kwargs or {}))
        except DynamicOutputShapeException:
            if func is torch.ops.aten.nonzero.default:
                return _all_selected(args[0])
            if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default):
                indices = [part for i in args[1] for part in (
                    _all_selected(i).unbind(1) if i is not None and i.dtype == torch.bool else (i,))]
                return func(args[0], indices, *args[2:], **(kwargs or {}))
            raise
        except DataDependentOutputException:
            if func is not torch.ops.aten._local_scalar_dense.default:
                raise
            t = args[0]
            return True if t.dtype == torch.bool else 1.0 if t.dtype.is_floating_point else 1


def _outside_fake_mode(fn):
    def wrapped(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)
    return wrapped


def _all_selected(mask: torch.Tensor) -> torch.Tensor:
    """nonzero(mask) as if every element were nonzero: [numel, ndim] indices."""
    return torch.empty((mask.numel(), mask.dim()), dtype=torch.long, device=mask.device)


@contextlib.contextmanager
def _real_mesh_layout() -> Iterator[None]:
    """DeviceMesh's rank-layout tensors (built and searched when FSDP and TP meshes are combined)
    stay real tensors."""
    init, mesh = DeviceMesh.__init__, DeviceMesh.mesh
    DeviceMesh.__init__ = _outside_fake_mode(init)
    DeviceMesh.mesh = property(_outside_fake_mode(mesh.fget))
    try:
        yield
    finally:
        DeviceMesh.__init__, DeviceMesh.mesh = init, mesh


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int) -> Iterator[None]:
    """The default process group of `world_size` fake ranks, this process being `rank`
    (none for a world of one); destroyed on exit."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("pretrain.plan simulates in a process without a process group of its own")
    if world_size > 1:
        dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def fake_tensors() -> Iterator[FakeTensorMode]:
    """FakeTensorMode (real inputs allowed and faked) with the three accommodations above."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _real_mesh_layout(), mode, ScalarsAreOne():
        yield mode


def keep_in_place(model: torch.nn.Module) -> torch.nn.Module:
    """Make `model.to(...)` return the model unchanged (Module.to cannot swap fake parameters);
    deepcopy rebinds the method to the copy."""
    model.to = types.MethodType(lambda self, *args, **kwargs: self, model)
    return model
