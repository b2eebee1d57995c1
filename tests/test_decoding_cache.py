"""The KVQ cache: per-row lengths and masks for ragged rows, cropping after rejections, the
exit-query cache, and the cache contents after self-speculative rounds (including switching E)
against a fresh prefill of the committed tokens."""
import pytest
import torch
import torch.nn.functional as F
from builders import PROMPTS, make_model, reference_greedy

from pretrain.decoding import ExitQueryCache, SamplingConfig, StaticKVCache
from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.self_speculative import speculative_round
from pretrain.decoding.sequences import Sequences
from pretrain.decoding.stats import DecodeStats
from pretrain.decoding.stepwise import prefill

pytestmark = pytest.mark.usefixtures("one_thread")


def attend(cache, layer, q, k, v):
    k_all, v_all, mask = cache.update(layer, k, v)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)


def test_ragged_writes_crop_and_rewrite_match_causal_attention():
    """Right-padded prefill, cropped per row; drafts of which rows keep different numbers; the next
    tokens then attend exactly to each row's true sequence."""
    torch.manual_seed(0)
    B, H, D = 3, 2, 8
    true_k, true_v, true_q = (torch.randn(B, H, 12, D) for _ in range(3))
    prompt, accepted = [5, 2, 4], [1, 0, 3]

    def with_garbage(x, start, keep, width):
        """Rows' true values at [start, start+keep), noise elsewhere in the `width` new slots."""
        out = torch.randn(B, H, width, D)
        for b in range(B):
            out[b, :, :keep[b]] = x[b, :, start[b]:start[b] + keep[b]]
        return out

    cache = StaticKVCache([0, 1], B, 16, H, D, dtype=torch.float32, device="cpu")
    cache.update(0, with_garbage(true_k, [0] * B, prompt, 5), with_garbage(true_v, [0] * B, prompt, 5))
    cache.crop(torch.tensor(prompt), layers=[0])
    assert cache.lengths[0].tolist() == prompt and cache.lengths[1].tolist() == [0, 0, 0]
    assert cache.positions(0, 2).tolist() == [[5, 6], [2, 3], [4, 5]]
    cache.update(0, with_garbage(true_k, prompt, accepted, 3), with_garbage(true_v, prompt, accepted, 3))
    lengths = [p + a for p, a in zip(prompt, accepted)]
    cache.crop(torch.tensor(lengths), layers=[0])

    def rows(x):
        return torch.stack([x[b, :, n:n + 2] for b, n in enumerate(lengths)])

    out = attend(cache, 0, rows(true_q), rows(true_k), rows(true_v))
    for b, n in enumerate(lengths):
        expected = F.scaled_dot_product_attention(true_q[b:b + 1, :, :n + 2], true_k[b:b + 1, :, :n + 2],
                                                  true_v[b:b + 1, :, :n + 2], is_causal=True)[:, :, n:]
        torch.testing.assert_close(out[b:b + 1], expected)
    assert cache.lengths[0].tolist() == [n + 2 for n in lengths]


def test_mask_is_causal_per_row_and_shared_across_layers():
    cache = StaticKVCache(range(3), 2, 10, 1, 4, dtype=torch.float32, device="cpu")
    for layer in range(3):
        cache.update(layer, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    cache.crop(torch.tensor([4, 1]))
    masks = [cache.update(layer, torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4))[2] for layer in range(3)]
    assert masks[0] is masks[1] is masks[2]  # built once per forward
    assert masks[0].shape == (2, 1, 2, 6)
    assert masks[0][0, 0].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert masks[0][1, 0].tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]


def test_crop_and_capacity_errors():
    cache = StaticKVCache([0], 2, 4, 1, 4, dtype=torch.float32, device="cpu")
    cache.update(0, torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4))
    with pytest.raises(ValueError, match="longer than stored"):
        cache.crop(torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="one length per row"):
        cache.crop(torch.tensor([1]))
    with pytest.raises(ValueError, match="cache slots"):
        cache.update(0, torch.zeros(2, 1, 2, 4), torch.zeros(2, 1, 2, 4))


def test_exit_query_cache():
    eq = ExitQueryCache(2, 3, 4, dtype=torch.float32, device="cpu")
    a, b = torch.randn(2, 1, 4), torch.randn(2, 2, 4)
    eq.append(a)
    eq.append(b)
    torch.testing.assert_close(eq.states(), torch.cat([a, b], 1))
    with pytest.raises(ValueError, match="holds 3"):
        eq.append(a)
    eq.crop(1)
    torch.testing.assert_close(eq.states(), a)
    eq.crop(0)
    assert eq.states().shape == (2, 0, 4)


def fresh_kv(model, tokens):
    """Per layer, (k, v) [Hkv, T, Dh] of a single-row prefill of `tokens` in a fresh cache."""
    cache = StaticKVCache.for_model(model, 1, len(tokens))
    with torch.no_grad():
        model.run_layers(model.tok_embeddings(torch.tensor([tokens])), positions=cache.positions(0, len(tokens)),
                         cache=cache)
    return {l: (cache.k[l][0], cache.v[l][0]) for l in cache.layers}


@torch.no_grad()
def test_cache_after_rounds_equals_fresh_prefill_of_committed_tokens():
    """Rows accept different numbers of drafts; after every round each layer holds exactly the KV of
    the committed tokens but the last, also when E moves up and down between rounds."""
    model = make_model()
    L = model.cfg.n_layers
    stats = DecodeStats()
    seqs = Sequences(PROMPTS, max_new_tokens=30, eos_id=None, spare=5, device="cpu")
    runner = BlockRunner(model, StaticKVCache.for_model(model, seqs.batch, seqs.capacity), stats)
    queries = ExitQueryCache(seqs.batch, 5, model.cfg.dim, dtype=torch.float32, device="cpu")
    greedy = SamplingConfig()
    prefill(runner, seqs, L, greedy, None)
    per_row_counts = set()
    for exit_layer, gamma in [(2, 4), (4, 3), (1, 4), (3, 2), (5, 4), (2, 4)]:
        before = seqs.length.clone()
        speculative_round(runner, seqs, queries, exit_layer, gamma, greedy, None)
        per_row_counts.add(tuple((seqs.length - before).tolist()))
        assert queries.count == 0
        for l in range(L):
            assert runner.cache.lengths[l].tolist() == (seqs.length - 1).tolist()
        for b in range(seqs.batch):
            n = int(seqs.length[b]) - 1
            reference = fresh_kv(model, seqs.tokens[b, :n].tolist())
            for l in range(L):
                torch.testing.assert_close(runner.cache.k[l][b, :, :n], reference[l][0], atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(runner.cache.v[l][b, :, :n], reference[l][1], atol=1e-5, rtol=1e-4)
    assert any(len(set(c)) > 1 for c in per_row_counts)  # rows took different numbers of tokens
    assert stats.rejections > 0 and stats.accepted > 0
    assert seqs.outputs() == [reference_greedy(model, p, 30)[:len(o)] for p, o in zip(PROMPTS, seqs.outputs())]
