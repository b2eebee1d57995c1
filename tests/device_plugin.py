"""Tests that can run on an accelerator: the `device` fixture and the `device` marker.

A test that takes the `device` fixture builds its tensors and models there, and is marked
`device` automatically (nothing else marks it). The device comes from the environment:

    LAYERSKIP_TEST_DEVICE=cpu   (default: unset means the CPU, so `make test` is unchanged)
    LAYERSKIP_TEST_DEVICE=auto  (the local accelerator when there is one, else the CPU)
    LAYERSKIP_TEST_DEVICE=<accelerator name>  (an error at the first such test if it is missing)

`make gpu-check` runs `pytest -m device` with the accelerator named (bench/gpu_check.py). The
device is resolved by pretrain.device.select_device, the one place that names back-ends.
"""
from __future__ import annotations

import os

import pytest
import torch

from pretrain.device import select_device

DEVICE_ENV = "LAYERSKIP_TEST_DEVICE"
MARKER = "device"


def chosen_device() -> torch.device:
    """The device the `device`-marked tests run on (CPU unless LAYERSKIP_TEST_DEVICE names another)."""
    return select_device(os.environ.get(DEVICE_ENV, "cpu") or "cpu")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: runs on the device named by {DEVICE_ENV} (default cpu); "
                                       "make gpu-check runs these on the accelerator")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if MARKER in getattr(item, "fixturenames", ()):
            item.add_marker(MARKER)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Session-wide, so module-scoped fixtures (a model built once) can use it too."""
    return chosen_device()
