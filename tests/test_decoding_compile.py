"""The compile option: blocks compiled in place (dynamic shapes, the KV-cache update left out of
the graphs) decode the same tokens as the eager model. The aot_eager backend traces and runs the
same graphs inductor would compile, without inductor's minutes of C++ compilation on 2 cores."""
import copy

import pytest
import torch

from pretrain.decoding import generate
from torch._dynamo.utils import counters

from pretrain.decoding.compiled import compile_blocks_for_decoding
from builders import make_model

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12]]
SETTINGS = [dict(strategy="autoregressive"), dict(strategy="self_speculative", exit_layer=2, draft_len=3),
            dict(strategy="self_speculative", exit_layer=3, draft_len=1, temperature=0.9, top_p=0.95, seed=5)]


@pytest.fixture(scope="module")
def models():
    torch.set_num_threads(1)
    eager = make_model()
    return eager, copy.deepcopy(eager)


def test_compiled_blocks_decode_the_same_tokens(models):
    eager, compiled = models
    rejected = 0
    counters.clear()
    for i, kwargs in enumerate(SETTINGS):
        expected, expected_stats = generate(eager, PROMPTS, max_new_tokens=16, **kwargs)
        # the first call compiles (through the option); later ones reuse the compiled model
        extra = dict(compile="default", compile_backend="aot_eager") if i == 0 else {}
        got, stats = generate(compiled, PROMPTS, max_new_tokens=16, **kwargs, **extra)
        assert got == expected, kwargs
        assert (stats.accepted, stats.drafted) == (expected_stats.accepted, expected_stats.drafted)
        rejected += stats.drafted - stats.accepted
    assert rejected > 0, "no rejection: cache cropping under compilation not exercised"
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in compiled.layers.values())
    assert compiled._decoding_compile == ("default", "aot_eager")
    # a traced cache update (host bookkeeping) would recompile every step until dynamo gives up and
    # runs eagerly: a few graphs shared by all blocks means the update stayed outside
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 24, graphs


def test_rows_leaving_the_batch_under_compiled_blocks(models):
    """A row ending at its first token and one ending mid-way leave the batch: the compiled blocks
    then run on fewer rows (views of the same static cache storage) and give the eager tokens."""
    eager, compiled = models
    first, _ = generate(eager, PROMPTS, max_new_tokens=16, strategy="self_speculative", exit_layer=2, draft_len=3)
    for eos in (first[2][0], first[0][5]):
        expected, _ = generate(eager, PROMPTS, max_new_tokens=16, strategy="self_speculative", exit_layer=2,
                               draft_len=3, eos_id=eos)
        got, _ = generate(compiled, PROMPTS, max_new_tokens=16, strategy="self_speculative", exit_layer=2,
                          draft_len=3, eos_id=eos,
                          compile="default", compile_backend="aot_eager")
        assert got == expected and min(map(len, got)) < 16


def test_compile_option_errors(models):
    with pytest.raises(ValueError, match="compile='fast'"):
        generate(make_model(), PROMPTS, compile="fast")
    _, compiled = models
    compile_blocks_for_decoding(compiled, "default", "aot_eager")   # same settings: no-op
    with pytest.raises(ValueError, match="already compiled"):
        compile_blocks_for_decoding(compiled, "max-autotune", "inductor")


def test_compiled_cache_masks_the_whole_capacity_like_the_span():
    """Same keys and values as StaticKVCache, padded to the capacity, with the padding masked."""
    from pretrain.decoding.compiled import CompiledRegionKVCache
    from pretrain.decoding.kv_cache import StaticKVCache

    torch.manual_seed(0)
    caches = [cls([0], batch=2, capacity=12, n_kv_heads=1, head_dim=4, dtype=torch.float32, device="cpu")
              for cls in (StaticKVCache, CompiledRegionKVCache)]
    for step, t in enumerate((5, 1, 3, 2)):
        k, v = torch.randn(2, 1, t, 4), torch.randn(2, 1, t, 4)
        (ks, vs, span_mask), (kc, vc, full_mask) = [c.update(0, k, v) for c in caches]
        span = ks.shape[2]
        assert kc.shape[2] == vc.shape[2] == full_mask.shape[-1] == 12
        assert torch.equal(full_mask[..., :span], span_mask) and not full_mask[..., span:].any()
        assert torch.equal(kc[:, :, :span], ks) and torch.equal(vc[:, :, :span], vs)
        if step == 1:                                       # reject a draft in row 1: rows differ
            for c in caches:
                c.crop([6, 4])
