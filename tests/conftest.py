"""Shared test fixtures and builders: the tiny model (one builder), synthetic batches, a tiny run
config and the one-process trainer around them."""
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from parallel.dims import ParallelDims  # noqa: E402
from pretrain.config import RunConfig  # noqa: E402
from pretrain.model import LayerSkipTransformer, ModelConfig  # noqa: E402

TINY_SHAPE = dict(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def tiny_model_config(**shape) -> ModelConfig:
    return ModelConfig(**{**TINY_SHAPE, **shape})


def build_tiny_model(seed: int = 0, **shape) -> LayerSkipTransformer:
    torch.manual_seed(seed)
    return LayerSkipTransformer(tiny_model_config(**shape))


def make_batch(n: int = 8, t: int = 12, vocab: int = 97, seed: int = 0, first_id: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens; targets are the next tokens; global sample ids first_id..first_id+n-1."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n, t + 1), generator=g)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:], "sample_ids": torch.arange(first_id, first_id + n)}


def tiny_run_config(model: ModelConfig, *, batch: int = 4, micro_batch: int = 2, seq_len: int = 12,
                    lr: float = 1e-2, dtype: str = "float32", **train) -> RunConfig:
    """A one-process run of `model`: no warm-up, clipping at 1, the given batch split."""
    cfg = RunConfig(model=model)
    tr = cfg.train
    tr.global_batch_size, tr.micro_batch_size, tr.seq_len, tr.dtype, tr.device = batch, micro_batch, seq_len, dtype, "cpu"
    for key, value in train.items():
        setattr(tr, key, value)
    cfg.optim.lr, cfg.optim.warmup_steps = lr, 0
    return cfg


def one_process_trainer(cfg: RunConfig, model: LayerSkipTransformer):
    from pretrain.trainer.trainer import Trainer

    trainer = Trainer(cfg, ParallelDims(), model)
    trainer.optimizer.set_learning_rate(cfg.optim.lr)
    return trainer


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
