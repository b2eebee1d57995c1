"""Shared test fixtures; what they build comes from builders.py."""
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from builders import NEW, PROMPTS, build_tiny_model, make_model, reference_greedy, tiny_model_config  # noqa: E402
from pretrain.model import LayerSkipTransformer, ModelConfig  # noqa: E402

pytest_plugins = ["device_plugin"]  # the `device` fixture and marker (make gpu-check)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_model_config()


@pytest.fixture
def tiny_model() -> LayerSkipTransformer:
    return build_tiny_model()


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """Prepared stdlib data for training runs: 40 files, vocabulary 512, samples of 32 tokens."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("data") / "stdlib"
    subprocess.run([sys.executable, "-m", "pretrain.data.prepare", "--out", str(out), "--max-files", "40",
                    "--vocab-size", "512", "--seq-len", "32"], check=True, capture_output=True, timeout=300)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and several threads on a busy 2-core machine slow
    down by 10-50x (workers spinning for cores they do not get)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(device):
    return make_model().to(device)


@pytest.fixture(scope="module")
def expected(model):
    return [reference_greedy(model, p, NEW) for p in PROMPTS]
