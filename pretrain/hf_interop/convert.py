"""Hugging Face Llama <-> our model: config keys and parameter names.

Both use the rotate-half RoPE layout, so weights map one to one with no permutation.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from pretrain.model import ModelConfig

# ours -> HF, per block
_BLOCK_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_OURS_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class HFConfigError(ValueError):
    """A Hugging Face config.json this project cannot represent; names the key."""


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope scaling dict or None) from old (rope_theta, rope_scaling) or new
    (rope_parameters) config layouts."""
    params = hf.get("rope_parameters") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return float(theta), scaling


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("model_type", "llama") != "llama":
        raise HFConfigError(f"config.json model_type={hf.get('model_type')!r}: only 'llama' is supported")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFConfigError(f"config.json {key}=true: biases are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFConfigError(f"config.json hidden_act={hf['hidden_act']!r}: only 'silu' (SwiGLU) is supported")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, dim // heads):
        raise HFConfigError(f"config.json head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
    theta, scaling = _rope_settings(hf)
    extra: dict[str, Any] = {}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise HFConfigError(f"config.json rope_scaling type {kind!r}: only 'llama3' is supported")
        extra = {"rope_scaling_factor": float(scaling["factor"]),
                 "rope_low_freq_factor": float(scaling["low_freq_factor"]),
                 "rope_high_freq_factor": float(scaling["high_freq_factor"]),
                 "rope_original_max_positions": int(scaling["original_max_position_embeddings"])}
    return ModelConfig(vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"],
                       n_heads=heads, n_kv_heads=hf.get("num_key_value_heads") or heads,
                       ffn_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                       rope_theta=theta, norm_eps=hf.get("rms_norm_eps", 1e-5),
                       tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **extra)


def hf_config_from_model_config(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32,
                                bos_token_id: int | None = None, eos_token_id: int | None = None) -> dict[str, Any]:
    rope: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    if cfg.rope_scaling_factor != 1.0:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_positions)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "rope_scaling": None if rope["rope_type"] == "default" else dict(rope),
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
    }


def to_hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _OURS_BLOCK.match(name)
    if not match or match.group(2) not in _BLOCK_NAMES:
        raise KeyError(f"parameter {name!r} has no Hugging Face Llama counterpart")
    return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"


def from_hf_name(name: str) -> str:
    for ours, hf in _TOP_NAMES.items():
        if name == hf:
            return ours
    match = _HF_BLOCK.match(name)
    inverse = {v: k for k, v in _BLOCK_NAMES.items()}
    if not match or match.group(2) not in inverse:
        raise KeyError(f"checkpoint tensor {name!r} is not a Llama parameter this model has")
    return f"layers.{match.group(1)}.{inverse[match.group(2)]}"


def state_dict_to_hf(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    return {to_hf_name(k): v for k, v in state.items() if not (tied and k == "output.weight")}


def state_dict_from_hf(state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    ours = {from_hf_name(k): v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    if tied:
        ours.pop("output.weight", None)
    return ours
