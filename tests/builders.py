"""What the tests build, shared by test modules and the parallel scripts (importable, unlike
conftest.py: pytest loads each folder's conftest under the one module name `conftest`): the tiny
model (one builder), synthetic batches, a tiny run config, the one-process trainer around them,
and the decoding test model with its independent greedy reference."""
import torch

from parallel.dims import ParallelDims
from pretrain.config import RunConfig
from pretrain.model import LayerSkipTransformer, ModelConfig

TINY_SHAPE = dict(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def tiny_model_config(**shape) -> ModelConfig:
    return ModelConfig(**{**TINY_SHAPE, **shape})


def build_tiny_model(seed: int = 0, **shape) -> LayerSkipTransformer:
    torch.manual_seed(seed)
    return LayerSkipTransformer(tiny_model_config(**shape))


def make_batch(n: int = 8, t: int = 12, vocab: int = 97, seed: int = 0, first_id: int = 0,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Random tokens; targets are the next tokens; global sample ids first_id..first_id+n-1."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n, t + 1), generator=g).to(device)
    return {"tokens": seq[:, :-1], "targets": seq[:, 1:],
            "sample_ids": torch.arange(first_id, first_id + n, device=device)}


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
        ids = torch.tensor([tokens], device=model.tok_embeddings.weight.device)
        nxt = int(model.logits(ids, exit_layer=exit_layer)[0, -1].argmax())
        tokens.append(nxt)
        if nxt == eos:
            break
    return tokens[len(prompt):]


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42, 43]]
NEW = 16
