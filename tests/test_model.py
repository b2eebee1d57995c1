"""The decoder and its shared exit head, checked against independent computations."""
import math

import pytest
import torch
import torch.nn.functional as F

from builders import build_tiny_model
from pretrain.model import LayerSkipTransformer, ModelConfig


def reference_forward(model: LayerSkipTransformer, tokens: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Textbook Llama forward written out longhand (explicit causal softmax, repeated KV heads,
    RoPE from its definition): logits after `n_blocks` blocks through the shared head."""
    cfg = model.cfg
    b, t = tokens.shape
    hd = cfg.head_dim
    pos = torch.arange(t, dtype=torch.float64)
    freqs = torch.tensor([cfg.rope_theta ** (-2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    ang = pos[:, None] * freqs[None, :]
    cos, sin = ang.cos().float().to(tokens.device), ang.sin().float().to(tokens.device)

    def rope(x):  # x [b, t, h, hd], rotate pairs (i, i + hd/2)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = model.tok_embeddings.weight[tokens]
    for i in range(n_blocks):
        blk = model.layers[str(i)]
        a = rms(x, blk.attention_norm.weight)
        q = rope((a @ blk.attention.wq.weight.T).view(b, t, cfg.n_heads, hd))
        k = rope((a @ blk.attention.wk.weight.T).view(b, t, cfg.n_kv_heads, hd))
        v = (a @ blk.attention.wv.weight.T).view(b, t, cfg.n_kv_heads, hd)
        rep = cfg.n_heads // cfg.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=tokens.device).triu(1), float("-inf"))
        att = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, t, -1)
        x = x + att @ blk.attention.wo.weight.T
        m = rms(x, blk.ffn_norm.weight)
        f = F.silu(m @ blk.feed_forward.w1.weight.T) * (m @ blk.feed_forward.w3.weight.T)
        x = x + f @ blk.feed_forward.w2.weight.T
    return rms(x, model.norm.weight) @ model.output.weight.T


@pytest.mark.parametrize("exit_layer", [1, 2, 3, 4])
def test_exit_logits_match_reference(tiny_model, exit_layer, device):
    tiny_model.to(device)
    tokens = torch.randint(0, tiny_model.cfg.vocab_size, (2, 11), device=device)
    with torch.no_grad():
        ours = tiny_model.logits(tokens, exit_layer=exit_layer)
        ref = reference_forward(tiny_model, tokens, exit_layer)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)


def test_forward_returns_requested_exits_and_final(tiny_model, device):
    tiny_model.to(device)
    tokens = torch.randint(0, 97, (3, 8), device=device)
    with torch.no_grad():
        hiddens = tiny_model(tokens, exits=[1, 3])
        assert sorted(hiddens) == [1, 3, 4]
        for layer in (1, 3, 4):
            torch.testing.assert_close(tiny_model.exit_logits(hiddens[layer]),
                                       tiny_model.logits(tokens, exit_layer=layer))


def test_exit_head_is_shared(tiny_model, device):
    """One norm + output projection for every exit: gradients of all exits land on it."""
    tiny_model.to(device)
    tokens = torch.randint(0, 97, (2, 8), device=device)
    hiddens = tiny_model(tokens, exits=[1])
    tiny_model.exit_logits(hiddens[1]).sum().backward()
    assert tiny_model.output.weight.grad is not None
    assert tiny_model.layers["3"].attention.wq.weight.grad is None  # exit 1 never reaches block 3


def test_tied_embeddings_share_storage():
    model = build_tiny_model(vocab_size=50, n_layers=2, n_kv_heads=4, max_seq_len=16, tie_embeddings=True)
    cfg = model.cfg
    assert model.output.weight is model.tok_embeddings.weight
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


def test_param_count_untied(tiny_model):
    assert sum(p.numel() for p in tiny_model.parameters()) == tiny_model.cfg.num_params()


def test_bad_shapes_name_the_key():
    with pytest.raises(ValueError, match="model.n_kv_heads"):
        ModelConfig(n_heads=8, n_kv_heads=3).validate()
    with pytest.raises(ValueError, match="model.n_heads"):
        ModelConfig(dim=100, n_heads=8).validate()
    model = build_tiny_model(vocab_size=50, n_layers=2, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="exit layer 3 outside 1..2"):
        model.logits(torch.zeros(1, 4, dtype=torch.long), exit_layer=3)
