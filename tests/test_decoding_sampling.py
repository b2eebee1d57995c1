"""Speculative sampling keeps the full model's distribution: the joint distribution of the first
generated tokens, over many samples, against exact probabilities computed from the full model (a
chi-square test), with a check that the test can tell the early exit's distribution apart."""
import itertools

import pytest
import torch
from builders import build_tiny_model

from pretrain.decoding import SamplingConfig, generate
from pretrain.decoding.sampling import probabilities
from pretrain.model import LayerSkipTransformer

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vocab_model(vocab: int, seed: int = 3) -> LayerSkipTransformer:
    return build_tiny_model(seed, vocab_size=vocab, dim=64, ffn_dim=128, init_std=0.1).eval()


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


@torch.no_grad()
def exact_joint(model, prompt, sampling, k, exit_layer=None):
    """P(first k generated tokens) for every k-tuple, flattened in lexicographic order."""
    V = model.cfg.vocab_size

    def step(prefix):
        logits = model.logits(torch.tensor([prompt + list(prefix)]), exit_layer=exit_layer)[0, -1]
        return processed_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p)

    joint = torch.zeros([V] * k, dtype=torch.float64)
    for prefix in itertools.product(range(V), repeat=k - 1):
        mass = 1.0
        for i in range(k - 1):
            mass *= float(step(prefix[:i])[prefix[i]])
        if mass > 0:
            joint[prefix] = mass * step(prefix)
    return joint.flatten()


def chi_square_p_value(counts, probs):
    """Pearson chi-square, pooling the outcomes with expected count < 5."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def empirical(outputs, k, vocab):
    counts = torch.zeros(vocab ** k, dtype=torch.float64)
    for row in outputs:
        counts[sum(t * vocab ** (k - 1 - i) for i, t in enumerate(row[:k]))] += 1
    return counts


def test_independent_processing_matches_ours():
    torch.manual_seed(0)
    logits = torch.randn(5, 16) * 2
    for cfg in (SamplingConfig(1.0), SamplingConfig(0.7, top_k=4), SamplingConfig(1.3, top_p=0.8),
                SamplingConfig(0.9, top_k=6, top_p=0.7)):
        ours = probabilities(logits, cfg).double()
        theirs = torch.stack([processed_probs(row, cfg.temperature, cfg.top_k, cfg.top_p) for row in logits])
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


CASES = {  # vocab, tokens tested, draft length, samples per seed, options
    "plain": (8, 2, 1, 1500, dict(temperature=1.0)),
    "topk-topp": (8, 2, 2, 1500, dict(temperature=0.8, top_k=5, top_p=0.9)),
    # 3 tokens with γ=1: the second token is an accepted draft or a residual draw, the third the
    # bonus token when the draft was accepted
    "bonus": (4, 3, 1, 1500, dict(temperature=1.0)),
    # rows stop drafting at different lengths in the same round (per-row thresholds τ_b)
    "adaptive-per-row": (4, 3, 3, 1500, dict(temperature=1.0, adaptive_draft=True, draft_threshold=0.45,
                                             target_acceptance=0.6)),
    "adaptive-dynamic": (4, 3, 3, 1500, dict(temperature=1.0, adaptive_draft=True, draft_threshold=0.3,
                                             dynamic_exit=True, probe_every=1, max_draft_len=3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_matches_full_model_distribution(case):
    vocab, k, gamma, n, options = CASES[case]
    model = tiny_vocab_model(vocab)  # exits 1 and 4 differ by ~0.15 in total variation here
    prompt = [1, 2]
    sampling = SamplingConfig(options["temperature"], options.get("top_k", 0), options.get("top_p", 1.0))
    probs = exact_joint(model, prompt, sampling, k)
    counts = torch.zeros_like(probs)
    accepted = rejections = 0
    for seed in range(3):
        out, stats = generate(model, [prompt] * n, strategy="self_speculative", exit_layer=1, draft_len=gamma,
                              max_new_tokens=k + gamma, seed=seed,
                              **options)
        counts += empirical(out, k, vocab)
        accepted, rejections = accepted + stats.accepted, rejections + stats.rejections
    assert accepted > 0 and rejections > 0
    if options.get("adaptive_draft"):
        assert len(set(stats.draft_lens)) > 1 or stats.drafted < stats.rounds * gamma   # rows drafted less than γ
    assert chi_square_p_value(counts, probs) > 1e-3
    # the test has power: sampling from the early exit alone is told apart
    out, _ = generate(model, [prompt] * (3 * n), strategy="early_exit", exit_layer=1, max_new_tokens=k, **options)
    lossy = empirical(out, k, vocab)
    assert chi_square_p_value(lossy, exact_joint(model, prompt, sampling, k, exit_layer=1)) > 1e-3
    assert chi_square_p_value(lossy, probs) < 1e-3
