"""The chunked early-exit loss (layerskip.early_exit.loss_chunk_tokens): the same loss and
gradients as whole-logit cross-entropy written out independently, for any chunk size, tied and
untied heads, ignored targets, every curriculum, and under tensor / pipeline / data parallelism
(torchrun, gloo); nothing of [tokens, vocab] size is kept for backward."""
import copy

import pytest
import torch
import torch.nn.functional as F

from parallel_scripts.launch import torchrun
from pretrain.config import ConfigError, RunConfig, validate
from pretrain.layerskip.early_exit_loss import IGNORE_INDEX, early_exit_loss
from pretrain.layerskip.plan import step_plan
from pretrain.model import LayerSkipTransformer, ModelConfig
from builders import one_process_trainer, tiny_run_config

RTOL = 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def batch(n=3, t=13, vocab=97, seed=0, ignored=4):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n, t + 1), generator=g)
    targets = seq[:, 1:].clone()
    targets[0, :ignored] = IGNORE_INDEX
    return seq[:, :-1], targets


def loss_and_grads(model, tokens, targets, weights, step_tokens, chunk):
    """(loss, per-exit losses, grads of hidden states, grads of parameters) through early_exit_loss;
    chunk=None: the independent reference, F.cross_entropy over whole logits per exit."""
    hiddens = model(tokens, exits=weights)
    hiddens = {l: h.detach().requires_grad_() for l, h in hiddens.items()}  # grads w.r.t. hidden states
    if chunk is None:
        per_exit = {l: F.cross_entropy(model.norm(h).matmul(model.output.weight.T).flatten(0, 1), targets.flatten(),
                                       reduction="sum", ignore_index=IGNORE_INDEX) / step_tokens
                    for l, h in hiddens.items()}
        loss = sum(weights[l] * v for l, v in per_exit.items())
    else:
        loss, per_exit = early_exit_loss(model.exit_logits, hiddens, targets, weights, step_tokens, chunk_tokens=chunk)
    loss.backward()
    return (loss.detach(), {l: v.detach() for l, v in per_exit.items()}, {l: h.grad for l, h in hiddens.items()},
            {n: p.grad for n, p in model.named_parameters() if p.grad is not None})


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 39, 1000])  # 39 = all tokens in one chunk; 1000 > tokens
def test_loss_and_gradients_equal_whole_logits_cross_entropy(tiny_cfg, tie, chunk):
    tiny_cfg.tie_embeddings = tie
    torch.manual_seed(0)
    model = LayerSkipTransformer(tiny_cfg)
    tokens, targets = batch()
    weights = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4}
    ref = loss_and_grads(copy.deepcopy(model), tokens, targets, weights, 50, None)
    got = loss_and_grads(copy.deepcopy(model), tokens, targets, weights, 50, chunk)
    assert rel(got[0], ref[0]) < RTOL
    for l in weights:
        assert rel(got[1][l], ref[1][l]) < RTOL
        assert rel(got[2][l], ref[2][l]) < RTOL  # w.r.t. the hidden state of exit l
    head = "tok_embeddings.weight" if tie else "output.weight"  # tied: one parameter, the embedding's name
    assert got[3].keys() == {"norm.weight", head} == ref[3].keys()
    for name in got[3]:
        assert rel(got[3][name], ref[3][name]) < RTOL, name


@pytest.mark.parametrize("curriculum", ["none", "rotational", "gradual"])
def test_training_steps_equal_plain_path_for_every_curriculum(curriculum):
    """The Trainer's steps (2 micro-batches, layer dropout on) with the chunked loss vs plain."""
    m = ModelConfig(vocab_size=61, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=16)
    runs = {}
    for chunk in (0, 7):
        cfg = tiny_run_config(m, batch=4, micro_batch=2, seq_len=12, steps=4)
        ee, ld = cfg.layerskip.early_exit, cfg.layerskip.layer_dropout
        ee.curriculum, ee.rotation_period, ee.gradual_steps, ee.loss_chunk_tokens = curriculum, 3, 3, chunk
        ld.p_max, ld.time_scale = 0.5, "constant"
        torch.manual_seed(1)
        trainer = one_process_trainer(cfg, LayerSkipTransformer(m))
        losses = []
        for step in range(cfg.train.steps):
            tokens, targets = batch(n=4, t=12, vocab=61, seed=step, ignored=0)
            b = {"tokens": tokens, "targets": targets, "sample_ids": torch.arange(4 * step, 4 * step + 4)}
            r = trainer.train_step(step_plan(cfg, step), b)
            losses.append((r.loss, r.exit_losses, r.grad_norm))
        runs[chunk] = losses, trainer.model_parts[0].state_dict()
    for (l0, e0, g0), (l1, e1, g1) in zip(runs[0][0], runs[7][0]):
        assert abs(l1 - l0) / l0 < RTOL and abs(g1 - g0) / g0 < RTOL
        assert e1.keys() == e0.keys() and all(abs(e1[k] - e0[k]) / e0[k] < RTOL for k in e0)
    assert len({tuple(e) for _, e, _ in runs[0][0]}) > 1 or curriculum == "none"  # exits really changed
    for name, value in runs[0][1].items():  # AdamW: weights compared well under lr, as the parallel tests
        torch.testing.assert_close(runs[7][1][name], value, rtol=0, atol=2e-4)


def test_nothing_vocabulary_sized_is_kept_for_backward(tiny_model):
    tokens, targets = batch(n=4, t=16)
    hiddens = tiny_model(tokens, exits=[2, 4])
    N, V = targets.numel(), tiny_model.cfg.vocab_size
    for chunk, expect_whole_logits in ((0, True), (8, False)):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            early_exit_loss(tiny_model.exit_logits, hiddens, targets, {2: 0.5, 4: 0.5}, N, chunk_tokens=chunk)
        assert (max(sizes) >= N * V) == expect_whole_logits, (chunk, max(sizes), N * V)


def test_no_grad_and_bfloat16_autocast(tiny_model):
    tokens, targets = batch()
    weights = {2: 0.5, 4: 0.5}
    with torch.no_grad():
        hiddens = tiny_model(tokens, exits=weights)
        plain, _ = early_exit_loss(tiny_model.exit_logits, hiddens, targets, weights, 40)
        chunked, _ = early_exit_loss(tiny_model.exit_logits, hiddens, targets, weights, 40, chunk_tokens=6)
    assert rel(chunked, plain) < RTOL
    with torch.autocast("cpu", dtype=torch.bfloat16):  # matmuls in bf16 like nn.Linear's: close, not equal
        hiddens = tiny_model(tokens, exits=weights)
        plain, _ = early_exit_loss(tiny_model.exit_logits, hiddens, targets, weights, 40)
        chunked, _ = early_exit_loss(tiny_model.exit_logits, hiddens, targets, weights, 40, chunk_tokens=6)
    assert chunked.dtype == torch.float32 and rel(chunked, plain) < 1e-2


def test_bad_chunk_sizes_are_refused(tiny_model):
    cfg = RunConfig()
    cfg.layerskip.early_exit.loss_chunk_tokens = -1
    with pytest.raises(ConfigError, match="layerskip.early_exit.loss_chunk_tokens=-1"):
        validate(cfg)
    tokens, targets = batch()
    hiddens = tiny_model(tokens, exits=[4])
    with pytest.raises(ValueError, match="chunk_tokens=-2"):
        early_exit_loss(tiny_model.exit_logits, hiddens, targets, {4: 1.0}, 40, chunk_tokens=-2)
    with pytest.raises(TypeError, match="exit_logits"):
        early_exit_loss(lambda h: tiny_model.exit_logits(h), hiddens, targets, {4: 1.0}, 40, chunk_tokens=4)


def test_tensor_pipeline_and_data_parallel_equal_one_process():
    """TP=2 vocabulary-parallel head alone (untied, tied) against whole-tensor cross-entropy, then
    training under TP (tied, activation checkpointing), PP (exits on both stages; interleaved,
    tied) and FSDP against the single-process plain path."""
    results = torchrun(2, "chunked_loss_tp.py", [
        "5", "tp=2,tie=1,ac=1", "pp=2,pp_schedule=1F1B",
        "pp=2,pp_schedule=Interleaved1F1B,virtual_stages=2,tie=1",
        "dp_shard=2,global_batch=2,micro_batch=1,p_max=0.9,steps=4"], timeout=400)
    heads, layouts = results[:2], results[2:]
    assert [r["check"] for r in heads] == ["head tp=2 tie=0 chunk=5", "head tp=2 tie=1 chunk=5"]
    for r in heads:
        assert r["loss_rel"] < RTOL and r["exit_rel"] < RTOL and r["grad_rel"] < RTOL, r
        assert {"norm", "output", "h1", "h3"} <= r["grad_rel_each"].keys(), r
    assert len(layouts) == 4
    for r in layouts:
        assert r["loss_rel"] < RTOL and r["exit_rel"] < RTOL, r
        assert r["param_abs"] < 2e-4 and r["replica_gap"] == 0.0, r  # as test_parallel_equality
        assert min(r["blocks_run_fraction"]) < 1.0, r
