"""The parallel layout is checked before any process group exists: a pure function that names the
offending key. Also the stage split and the FLOP count used for MFU."""
import pytest

from parallel.stage import stage_layer_ranges, stages_of_rank
from pretrain.config import ConfigError, RunConfig, check_layout


def cfg(**parallel) -> RunConfig:
    c = RunConfig()
    c.model.n_layers, c.model.n_heads, c.model.n_kv_heads, c.model.dim = 8, 8, 4, 256
    c.model.ffn_dim, c.model.vocab_size = 704, 8192
    c.train.global_batch_size, c.train.micro_batch_size, c.train.seq_len = 16, 2, 256
    for k, v in parallel.items():
        setattr(c.parallel, k, v)
    return c


@pytest.mark.parametrize("parallel, world, key", [
    ({"tp": 2}, 4, "world size 4"),
    ({"dp_shard": 2, "pp": 2}, 2, "dp_replicate·dp_shard·tp·pp = 4"),
    ({"tp": 3}, 3, "model.n_heads"),
    ({"tp": 8}, 8, "model.n_kv_heads"),
    ({"pp": 3}, 3, "model.n_layers"),
    ({"pp": 2, "virtual_stages": 3, "pp_schedule": "Interleaved1F1B"}, 2, "model.n_layers"),
    ({"pp": 4, "microbatches": 2}, 4, "parallel.microbatches"),
    ({"pp": 2, "pp_schedule": "Interleaved1F1B", "virtual_stages": 2, "microbatches": 1}, 2, "parallel.microbatches"),
    ({"pp": 2, "pp_schedule": "ZeroBubbleMagic"}, 2, "parallel.pp_schedule"),
    ({"pp": 2, "virtual_stages": 2}, 2, "parallel.virtual_stages"),
    ({"pp": 2, "pp_schedule": "Interleaved1F1B"}, 2, "parallel.virtual_stages"),
    ({"virtual_stages": 2}, 1, "parallel.virtual_stages"),
    ({"pp": 2, "microbatches": 3}, 2, "parallel.microbatches"),
    ({"dp_shard": 3}, 3, "train.global_batch_size"),
])
def test_impossible_layouts_name_the_key(parallel, world, key):
    with pytest.raises(ConfigError, match=key.replace("·", ".")):
        check_layout(cfg(**parallel), world)


def test_widths_and_sequence_must_divide_by_tp():
    c = cfg(tp=2)
    c.model.ffn_dim = 705
    with pytest.raises(ConfigError, match="model.ffn_dim=705.*parallel.tp=2"):
        check_layout(c, 2)
    c = cfg(tp=2)
    c.model.vocab_size = 8191
    with pytest.raises(ConfigError, match="model.vocab_size"):
        check_layout(c, 2)
    c = cfg(tp=2)
    c.train.seq_len = 255
    c.model.max_seq_len = 512
    with pytest.raises(ConfigError, match="train.seq_len"):
        check_layout(c, 2)
    c = cfg(tp=2, pp=2)
    c.train.compile = True                     # compiled blocks at every layout (tests/test_compile_layouts.py)
    assert check_layout(c, 4).tp == 2


def test_valid_layouts_resolve():
    lay = check_layout(cfg(pp=2, tp=2, dp_shard=2, pp_schedule="interleaved1f1b", virtual_stages=2), 8)
    assert lay.pp_schedule == "Interleaved1F1B" and lay.num_stages == 4 and lay.dp == 2
    assert lay.microbatches == 16 // 2 // 2  # per-rank batch / micro_batch_size
    assert check_layout(cfg(pp=2, microbatches=2), 2).microbatches == 2
    assert check_layout(cfg(pp=4, pp_schedule="GPipe", microbatches=2), 4).microbatches == 2  # GPipe: any
    assert check_layout(cfg(dp_replicate=2, dp_shard=2), 4).world_size == 4
    assert not check_layout(cfg(), 1).distributed


def test_stage_split_is_contiguous_and_looped_over_ranks():
    assert stage_layer_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert stages_of_rank(1, pp=2, virtual_stages=2) == [1, 3]
    with pytest.raises(ValueError):
        stage_layer_ranges(8, 3)


def test_step_flops_count_only_work_done():
    from pretrain.metrics.flops import block_flops_per_token, head_flops_per_token, mfu, step_flops
    from pretrain.model import ModelConfig

    m = ModelConfig(vocab_size=100, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=16)
    # q,o: 8x8 each; k,v: 8x4 each; MLP: 3 x 8x16 -> 576 weights; 6 x 576 + 12·T·H·Dh
    assert block_flops_per_token(m, seq_len=10) == 6 * 576 + 12 * 10 * 2 * 4
    assert head_flops_per_token(m) == 6 * 8 * 100
    full = step_flops(m, 10, block_rows=4 * 2, head_rows=4 * 2)   # batch 4, both exits on
    dropped = step_flops(m, 10, block_rows=5, head_rows=4 * 1)    # 3 block-rows skipped, one exit
    assert full - dropped == 10 * (3 * block_flops_per_token(m, 10) + 4 * head_flops_per_token(m))
    assert mfu(2e12, 1.0, 1e12, devices=4) == 0.5 and mfu(1.0, 1.0, 0.0, 1) is None
