"""The start-up summary (issue 20 item 4): parameter counts against a built model, FLOPs per token
against pretrain.metrics.flops' per-step count, per-source reads against the mixture's own stream,
and the banner's content for fresh, resumed and continual starts."""
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import RunConfig
from pretrain.data.dataset import PackedDataset
from pretrain.data.mixture import MixedDataset
from pretrain.metrics.flops import step_flops
from pretrain.model import LayerSkipTransformer, ModelConfig
from pretrain.trainer.summary import dense_flops_per_token, parameter_counts, source_reads, startup_summary
from parallel.dims import ParallelDims


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_counts_match_a_built_model(tied):
    shape = ModelConfig(vocab_size=300, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=tied)
    model = LayerSkipTransformer(shape)
    counts = parameter_counts(shape)
    assert counts["total"] == sum(p.numel() for p in model.parameters())  # shared weights counted once
    assert counts["embedding"] == model.tok_embeddings.weight.numel()
    assert counts["head"] == (0 if tied else model.output.weight.numel())
    assert counts["non_embedding"] == sum(p.numel() for n, p in model.named_parameters()
                                          if not n.startswith(("tok_embeddings", "output.")))


def test_flops_per_token_is_a_full_depth_step_of_one_token():
    shape = ModelConfig(vocab_size=300, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64)
    # one sample: every block row run once, one head
    assert dense_flops_per_token(shape, 16) == pytest.approx(step_flops(shape, 16, block_rows=3, head_rows=1) / 16)


def test_source_reads_are_the_mixture_streams_positions(prepared_data):
    mixed = MixedDataset([PackedDataset(prepared_data), PackedDataset(prepared_data, "val")], [0.7, 0.3], ["a", "b"])
    from pretrain.data.loader import TrainBatches

    batches = TrainBatches(mixed, 8, seed=3, prefetch=0)
    seen = np.zeros(2, dtype=int)
    for step, batch in batches:
        if step == 25:
            break
        seen += np.bincount(mixed.source_of(batch["sample_ids"]).numpy(), minlength=2)
    rows = source_reads(mixed, 8, 25, seed=3)
    assert [r["read_tokens"] // mixed.seq_len for r in rows] == list(seen)
    assert rows[1]["epochs"] == pytest.approx(seen[1] / len(mixed.datasets[1]))
    single = source_reads(PackedDataset(prepared_data), 8, 25)
    assert single[0]["epochs"] == pytest.approx(200 / len(PackedDataset(prepared_data)))


def test_banner_says_where_the_run_starts_and_what_it_runs(prepared_data):
    cfg = RunConfig(model=ModelConfig(vocab_size=512, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64))
    cfg.layerskip.early_exit.curriculum, cfg.layerskip.early_exit.gradual_steps = "gradual", 100
    data = PackedDataset(prepared_data)
    text = startup_summary(cfg, ParallelDims(), data)
    assert "from scratch" in text and f"vocab 512; {parameter_counts(cfg.model)['total'] / 1e3:.2f}k parameters" in text
    assert "gradual" in text and "on at step 0: 4" in text and "p_max 0.1, D = exp, S = exp" in text
    assert f"{cfg.train.global_batch_size * cfg.train.seq_len:,} tokens per step" in text
    assert "mesh pp 1 x dp_replicate 1 x dp_shard 1 x tp 1" in text
    resumed = startup_summary(cfg, ParallelDims(tp=2, dp_shard=2), data, Path("runs/x/checkpoints/step_7"), 7)
    assert "resumes from runs/x/checkpoints/step_7 at step 7" in resumed and "dp_shard 2 x tp 2" in resumed
    cfg.checkpoint.init_from = "/models/llama"
    assert "starts from the weights of /models/llama" in startup_summary(cfg, ParallelDims(), data)
