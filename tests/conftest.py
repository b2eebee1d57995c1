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


# ---- decoding: a model whose early exits often (not always) agree with the last layer

def make_model(vocab=64, layers=6, weak_from=2, scale=0.5, seed=0, embed_scale=2.0, **shape):
    """Random model whose blocks from `weak_from` on barely change the residual stream, so early
    exits often (not always) agree with the final layer: both acceptance and rejection happen."""
    model = build_tiny_model(seed, **{"vocab_size": vocab, "dim": 64, "n_layers": layers, "ffn_dim": 128,
                                        "max_seq_len": 128, **shape}).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(embed_scale)  # sharper logits: no near-ties
        for i in range(weak_from, layers):
            model.layers[str(i)].attention.wo.weight.mul_(scale)
            model.layers[str(i)].feed_forward.w2.weight.mul_(scale)
    return model


@torch.no_grad()
def reference_greedy(model, prompt, n, eos=None, exit_layer=None):
    """Independent of pretrain.decoding: no cache, the whole forward recomputed for every token."""
    tokens = list(prompt)
    for _ in range(n):
        nxt = int(model.logits(torch.tensor([tokens]), exit_layer=exit_layer)[0, -1].argmax())
        tokens.append(nxt)
        if nxt == eos:
            break
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and several threads on a busy 2-core machine slow
    down by 10-50x (workers spinning for cores they do not get)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42, 43]]
NEW = 16


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def expected(model):
    return [reference_greedy(model, p, NEW) for p in PROMPTS]
