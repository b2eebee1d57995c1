"""Decoding: greedy self-speculative output equals full-model greedy decoding exactly; sampling
keeps the full model's distribution; batches with ragged prompts; adaptive options."""
import math

import pytest
import torch

from pretrain.decoding import DecodeOptions, SamplingConfig, generate
from pretrain.model import LayerSkipTransformer, ModelConfig


def make_model(vocab=64, layers=6, weak_from=2, scale=0.5, seed=0, embed_scale=2.0):
    """Random model whose blocks from `weak_from` on barely change the residual stream, so early
    exits often (not always) agree with the final layer: both acceptance and rejection happen."""
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, dim=64, n_layers=layers, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=128)
    model = LayerSkipTransformer(cfg).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(embed_scale)  # sharper logits: fewer near-ties
        for i in range(weak_from, layers):
            model.layers[str(i)].attention.wo.weight.mul_(scale)
            model.layers[str(i)].feed_forward.w2.weight.mul_(scale)
    return model


@torch.no_grad()
def reference_greedy(model, prompt, n, eos=None):
    """No cache: recompute the full forward for every new token."""
    tokens = list(prompt)
    for _ in range(n):
        nxt = int(model.logits(torch.tensor([tokens]))[0, -1].argmax())
        tokens.append(nxt)
        if nxt == eos:
            break
    return tokens[len(prompt):]


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42, 43]]


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def expected(model):
    return [reference_greedy(model, p, 16) for p in PROMPTS]


@pytest.mark.parametrize("exit_layer", [1, 2, 3, 4, 5])
def test_greedy_self_speculative_is_exact(model, expected, exit_layer):
    drafted = accepted = 0
    for gamma in (1, 2, 3, 4):
        out, stats = generate(model, PROMPTS, DecodeOptions(exit_layer=exit_layer, draft_len=gamma,
                                                            max_new_tokens=16))
        assert out == expected, (exit_layer, gamma)
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0 < accepted < drafted  # both acceptance and rejection (cache cropping) exercised


def test_ragged_batch_equals_rows_alone(model):
    opts = DecodeOptions(exit_layer=2, draft_len=3, max_new_tokens=12)
    batched, _ = generate(model, PROMPTS, opts)
    assert batched == [generate(model, [p], opts)[0][0] for p in PROMPTS]


def test_autoregressive_and_early_exit(model, expected):
    out, stats = generate(model, PROMPTS, DecodeOptions(strategy="autoregressive", max_new_tokens=16))
    assert out == expected
    assert stats.summary()["layer_evals_per_token"] == model.cfg.n_layers
    early, stats = generate(model, PROMPTS[:1], DecodeOptions(strategy="early_exit", exit_layer=2,
                                                              max_new_tokens=10))
    tokens = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(10):
            tokens.append(int(model.logits(torch.tensor([tokens]), exit_layer=2)[0, -1].argmax()))
    assert early[0] == tokens[len(PROMPTS[0]):]
    assert stats.summary()["layer_evals_per_token"] == 2


def test_eos_stops_each_row(model, expected):
    eos = expected[1][4]
    out, _ = generate(model, PROMPTS, DecodeOptions(exit_layer=2, draft_len=4, max_new_tokens=16, eos_id=eos))
    assert out == [reference_greedy(model, p, 16, eos=eos) for p in PROMPTS]
    assert out[1][-1] == eos and len(out[1]) <= 5


def test_high_acceptance_saves_layer_evaluations():
    strong_exit = make_model(scale=0.01, embed_scale=20)
    out, stats = generate(strong_exit, PROMPTS, DecodeOptions(exit_layer=2, draft_len=4, max_new_tokens=24))
    summary = stats.summary()
    assert summary["acceptance"] > 0.8
    assert summary["layer_evals_per_token"] < 0.6 * strong_exit.cfg.n_layers
    assert summary["tokens_per_round"] > 2.5
    assert out == [reference_greedy(strong_exit, p, 24) for p in PROMPTS]


def test_adaptive_and_dynamic_options_stay_exact(model, expected):
    exits, draft_lens = set(), set()
    for opts in (DecodeOptions(exit_layer=3, draft_len=6, max_new_tokens=16, adaptive_draft=True,
                               draft_threshold=0.6, target_acceptance=0.9),
                 DecodeOptions(exit_layer=4, draft_len=2, max_new_tokens=16, dynamic_exit=True, max_draft_len=5),
                 DecodeOptions(exit_layer=1, draft_len=3, max_new_tokens=16, dynamic_exit=True,
                               adaptive_draft=True)):
        out, stats = generate(model, PROMPTS, opts)
        assert out == expected
        exits |= set(stats.exit_layers)
        draft_lens |= set(stats.draft_lens)
    assert len(exits) > 2       # the dynamic exit moved E
    assert len(draft_lens) > 2  # the adaptive length varied γ


def test_dynamic_exit_moves_toward_cheap_accurate_exit():
    strong_exit = make_model(scale=0.01, embed_scale=20)  # exit 2 is nearly the full model
    _, stats = generate(strong_exit, [[1, 2, 3]] * 2, DecodeOptions(exit_layer=5, draft_len=2, max_new_tokens=40,
                                                                    dynamic_exit=True))
    assert stats.exit_layers[0] == 5 and stats.exit_layers[-1] <= 3


def test_bad_options(model):
    with pytest.raises(ValueError, match="exit_layer=6"):
        generate(model, PROMPTS, DecodeOptions(exit_layer=6))
    with pytest.raises(ValueError, match="unknown strategy"):
        generate(model, PROMPTS, DecodeOptions(strategy="beam"))
    with pytest.raises(ValueError, match="positions"):
        generate(model, PROMPTS, DecodeOptions(max_new_tokens=500))


# ---- sampling: distribution of the first two generated tokens --------------------------------

def processed_probs(logits, temperature, top_k, top_p):
    """Written independently of pretrain.decoding.sampling, as the usual pipeline: keep the k most
    likely tokens, renormalise, keep the most likely ones until their mass reaches top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = sorted(range(len(probs)), key=lambda i: -float(probs[i]))
    if top_k:
        order = order[:top_k]
    total = sum(float(probs[i]) for i in order)
    keep, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        keep.append(i)
        mass += float(probs[i]) / total
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


def exact_two_token_distribution(model, prompt, sampling):
    with torch.no_grad():
        first = processed_probs(model.logits(torch.tensor([prompt]))[0, -1], sampling.temperature,
                                sampling.top_k, sampling.top_p)
        table = torch.zeros(len(first), len(first), dtype=torch.float64)
        for t1 in range(len(first)):
            if first[t1] > 0:
                second = processed_probs(model.logits(torch.tensor([prompt + [t1]]))[0, -1],
                                         sampling.temperature, sampling.top_k, sampling.top_p)
                table[t1] = first[t1] * second
    return table.flatten()


def chi_square_p_value(counts, probs):
    """Pearson chi-square, pooling outcomes with expected count < 5."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0),
                                      SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)],
                         ids=["plain", "topk-topp"])
def test_sampling_matches_full_model_distribution(sampling):
    torch.manual_seed(3)  # exits 1 and 4 differ by ~0.15 in total variation on this prompt
    model = LayerSkipTransformer(ModelConfig(vocab_size=8, dim=64, n_layers=4, n_heads=4, n_kv_heads=2,
                                             ffn_dim=128, max_seq_len=32, init_std=0.1)).eval()
    prompt = [1, 2]
    probs = exact_two_token_distribution(model, prompt, sampling)
    counts = torch.zeros(64, dtype=torch.float64)
    drafted = accepted = 0
    for seed in range(3):
        out, stats = generate(model, [prompt] * 1000, DecodeOptions(exit_layer=1, draft_len=2, max_new_tokens=2,
                                                                    sampling=sampling, seed=seed))
        for row in out:
            counts[row[0] * 8 + row[1]] += 1
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    assert 0 < accepted < drafted
    assert chi_square_p_value(counts, probs) > 1e-3
    # the test has power: sampling from the early exit alone is detected as a different distribution
    lossy = torch.zeros(64, dtype=torch.float64)
    out, _ = generate(model, [prompt] * 3000, DecodeOptions(strategy="early_exit", exit_layer=1, max_new_tokens=2,
                                                            sampling=sampling))
    for row in out:
        lossy[row[0] * 8 + row[1]] += 1
    assert chi_square_p_value(lossy, probs) < 1e-3
