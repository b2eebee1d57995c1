"""The one place that names accelerator back-ends; everything else takes a torch.device."""
from __future__ import annotations

import contextlib

import torch

_ACCELERATOR = "cuda"


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' picks the local accelerator when there is one, else the CPU."""
    if name == "auto":
        name = _ACCELERATOR if torch.cuda.is_available() else "cpu"
    if name == _ACCELERATOR:
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={name!r} but no {name} device is available")
        torch.cuda.set_device(local_rank)
        return torch.device(name, local_rank)
    return torch.device(name)


def is_accelerator(device: torch.device) -> bool:
    return device.type == _ACCELERATOR


def device_name(device: torch.device) -> str:
    """A human-readable name: the accelerator's product name, or "CPU"."""
    if is_accelerator(device):
        return torch.cuda.get_device_name(device)
    return "CPU"


def distributed_backend(device: torch.device) -> str:
    return "nccl" if is_accelerator(device) else "gloo"


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for 'bfloat16', a no-op for 'float32'."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock step times are real."""
    if is_accelerator(device):
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process so far: allocated device memory on an accelerator, the peak
    resident set size (RSS) of the process on the CPU."""
    if is_accelerator(device):
        return int(torch.cuda.max_memory_allocated(device))
    try:  # Linux: this program's own peak (getrusage's ru_maxrss survives execve: it would report
        # the peak of whatever process forked this one, e.g. a large launcher)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def fused_adamw_supported(device: torch.device) -> bool:
    return device.type in ("cpu", _ACCELERATOR)


def reset_peak_memory(device: torch.device) -> None:
    """Start the allocator's peak-memory count afresh (accelerators; a no-op on the CPU)."""
    if is_accelerator(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_allocated(device: torch.device) -> int | None:
    """Bytes the caching allocator had allocated at most since the last reset; None on the CPU."""
    return torch.cuda.max_memory_allocated(device) if is_accelerator(device) else None
