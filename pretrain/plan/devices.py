"""The accelerators a plan can be sized for: memory and dense bf16 peak FLOP/s of ONE device.

Memory is the nominal capacity (GiB as the vendor's "GB" figure); part of it is never available to
tensors (CUDA context, NCCL buffers, allocator fragmentation): plan.memory_margin reserves that share.
Peak FLOP/s are the vendors' dense (no sparsity) bf16 tensor-core figures.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    peak_bf16_flops: float

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)


DEVICES = {d.name: d for d in (
    Device("h100-80gb", 80, 989e12),        # H100 SXM5
    Device("h100-pcie-80gb", 80, 756e12),
    Device("h200", 141, 989e12),            # H200 SXM
    Device("a100-80gb", 80, 312e12),
    Device("a100-40gb", 40, 312e12),
    Device("l40s", 48, 362e12),
    Device("b200", 180, 2250e12),
)}


def device_by_name(name: str) -> Device:
    """The table's device; ValueError naming the choices for an unknown name."""
    try:
        return DEVICES[name.lower()]
    except KeyError:
        raise ValueError(f"plan.device={name!r}: unknown device; choose one of {', '.join(DEVICES)}") from None
