import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from pretrain.model import LayerSkipTransformer, ModelConfig  # noqa: E402

pytest_plugins = ["device_plugin"]  # the `device` fixture and marker (make gpu-check)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64,
                       max_seq_len=32)


@pytest.fixture
def tiny_model(tiny_cfg) -> LayerSkipTransformer:
    torch.manual_seed(0)
    return LayerSkipTransformer(tiny_cfg)
