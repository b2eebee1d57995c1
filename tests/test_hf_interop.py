"""Hugging Face Llama interop: logits equal transformers' LlamaForCausalLM in both directions."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pretrain.hf_interop import HFConfigError, load_hf_checkpoint, save_hf_checkpoint
from pretrain.model import LayerSkipTransformer, ModelConfig

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}


def hf_model(tied=False, rope=None):
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied)
    if rope:
        kwargs["rope_parameters"] = rope
    else:
        kwargs["rope_theta"] = 10000.0
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("tied, rope", [(False, None), (True, None), (False, LLAMA3_ROPE)],
                         ids=["untied", "tied", "llama3-rope"])
def test_import_matches_transformers(tmp_path, tied, rope):
    hf = hf_model(tied, rope)
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    ours, tokenizer = load_hf_checkpoint(tmp_path)
    assert tokenizer == str(tmp_path / "tokenizer.json")
    assert ours.cfg.tie_embeddings == tied
    tokens = torch.randint(0, 256, (2, 100))  # beyond original_max_position_embeddings=32
    with torch.no_grad():
        expected = hf(input_ids=tokens, output_hidden_states=True)
        torch.testing.assert_close(ours.logits(tokens), expected.logits, atol=2e-5, rtol=1e-4)
        # exit 2 through the shared head = lm_head(norm(hidden after 2 blocks))
        exit2 = hf.lm_head(hf.model.norm(expected.hidden_states[2]))
        torch.testing.assert_close(ours.logits(tokens, exit_layer=2), exit2, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers(tmp_path, tied):
    cfg = ModelConfig(vocab_size=200, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=128,
                      max_seq_len=64, tie_embeddings=tied)
    torch.manual_seed(1)
    ours = LayerSkipTransformer(cfg).eval()
    save_hf_checkpoint(ours, tmp_path / "hf", eos_token_id=0)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 200, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, ours.logits(tokens), atol=2e-5, rtol=1e-4)
    back, _ = load_hf_checkpoint(tmp_path / "hf")
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def test_sharded_export_round_trips(tmp_path):
    cfg = ModelConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=64, max_seq_len=16)
    ours = LayerSkipTransformer(cfg)
    save_hf_checkpoint(ours, tmp_path / "hf", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back, _ = load_hf_checkpoint(tmp_path / "hf")
    tokens = torch.randint(0, 100, (1, 8))
    torch.testing.assert_close(back.logits(tokens), ours.logits(tokens))


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_checkpoint(tmp_path / "empty")
    hf = hf_model()
    hf.config.attention_bias = True
    hf.config.save_pretrained(tmp_path / "bias")
    with pytest.raises(HFConfigError, match="attention_bias"):
        load_hf_checkpoint(tmp_path / "bias")
