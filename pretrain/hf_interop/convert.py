"""Hugging Face Llama <-> our model: config.json keys and parameter names.

Both use the rotate-half RoPE layout (HF's `rotate_half`), so every weight maps one to one with
no permutation of the q/k rows. Llama-3 RoPE frequency scaling is carried by ModelConfig's
rope_scaling_* fields, which the model applies when it builds its RoPE tables.
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
_BLOCK_NAMES_FROM_HF = {hf: ours for ours, hf in _BLOCK_NAMES.items()}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_TOP_NAMES_FROM_HF = {hf: ours for ours, hf in _TOP_NAMES.items()}
_OURS_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors some (older) HF checkpoints carry that are not parameters: recomputed, not loaded.
_HF_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# Values LlamaConfig uses for keys a config.json may leave out.
_HF_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "tie_word_embeddings": False, "hidden_act": "silu"}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class HFConfigError(ValueError):
    """A Hugging Face config.json this project cannot represent; the message names the key."""


# --------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _positive_int(hf: dict[str, Any], key: str) -> int:
    value = hf[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HFConfigError(f"config.json {key}={value!r} must be a positive integer")
    return value


def _rope_settings(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, {llama3 scaling fields of ModelConfig} or None), from either layout:
    transformers >= 5 `rope_parameters` {rope_type, rope_theta, ...}, or the older top-level
    `rope_theta` with an optional `rope_scaling` {rope_type | type, ...}."""
    params = hf.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise HFConfigError(f"config.json rope_parameters={params!r} must be an object")
    params = params or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise HFConfigError("config.json rope_parameters holds per-layer-type settings; "
                            "only a single RoPE for all layers is supported")
    theta = params.get("rope_theta", hf.get("rope_theta", _HF_DEFAULTS["rope_theta"]))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise HFConfigError(f"config.json rope_theta={theta!r} must be a positive number")

    legacy = hf.get("rope_scaling")
    if legacy is not None and not isinstance(legacy, dict):
        raise HFConfigError(f"config.json rope_scaling={legacy!r} must be an object or null")
    key, scaling = ("rope_scaling", legacy) if legacy else ("rope_parameters", params)

    partial = scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise HFConfigError(f"config.json partial_rotary_factor={partial!r}: only full rotary "
                            "embeddings (1.0) are supported")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise HFConfigError(f"config.json {key}.rope_type={kind!r} is not supported (only 'default' "
                            "and 'llama3')")
    missing = [k for k in _LLAMA3_KEYS if scaling.get(k) is None]
    if missing:
        raise HFConfigError(f"config.json {key} (rope_type 'llama3') lacks {', '.join(missing)}")
    if scaling.get("attention_factor") not in (None, 1, 1.0):
        raise HFConfigError(f"config.json {key}.attention_factor={scaling['attention_factor']!r}: "
                            "only 1.0 is supported")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    if high <= low:
        raise HFConfigError(f"config.json {key}.high_freq_factor={high} must exceed low_freq_factor={low}")
    if float(scaling["factor"]) <= 0:
        raise HFConfigError(f"config.json {key}.factor={scaling['factor']!r} must be positive")
    return float(theta), {"rope_scaling_factor": float(scaling["factor"]), "rope_low_freq_factor": low,
                          "rope_high_freq_factor": high,
                          "rope_original_max_positions": int(scaling["original_max_position_embeddings"])}


def model_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a LlamaForCausalLM config.json (already parsed). Raises HFConfigError
    naming the config.json key for anything this model cannot reproduce exactly."""
    hf = hf_config
    if not isinstance(hf, dict):
        raise HFConfigError("config.json must hold a JSON object")
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise HFConfigError(f"config.json model_type={model_type!r}: only 'llama' is supported")
    absent = [k for k in _REQUIRED if k not in hf]
    if absent:
        raise HFConfigError(f"config.json lacks {', '.join(absent)}")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise HFConfigError(f"config.json {key}=true: projection biases are not supported")
    act = hf.get("hidden_act", _HF_DEFAULTS["hidden_act"])
    if act != "silu":
        raise HFConfigError(f"config.json hidden_act={act!r}: only 'silu' (SwiGLU) is supported")

    vocab, dim, layers, heads, ffn = (_positive_int(hf, k) for k in _REQUIRED)
    kv_heads = hf.get("num_key_value_heads")
    kv_heads = heads if kv_heads is None else _positive_int(hf, "num_key_value_heads")
    if dim % heads:
        raise HFConfigError(f"config.json num_attention_heads={heads} does not divide hidden_size={dim}")
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != dim // heads:
        raise HFConfigError(f"config.json head_dim={head_dim} differs from hidden_size/num_attention_heads"
                            f"={dim // heads}; a separate head_dim is not supported")
    if (dim // heads) % 2:
        raise HFConfigError(f"config.json hidden_size/num_attention_heads={dim // heads} is odd; RoPE needs "
                            "an even head dimension")
    if heads % kv_heads:
        raise HFConfigError(f"config.json num_key_value_heads={kv_heads} does not divide "
                            f"num_attention_heads={heads}")
    max_pos = hf.get("max_position_embeddings")
    max_pos = _HF_DEFAULTS["max_position_embeddings"] if max_pos is None else _positive_int(
        hf, "max_position_embeddings")
    eps = hf.get("rms_norm_eps", _HF_DEFAULTS["rms_norm_eps"])
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
        raise HFConfigError(f"config.json rms_norm_eps={eps!r} must be a positive number")
    theta, scaling = _rope_settings(hf)
    tied = hf.get("tie_word_embeddings", _HF_DEFAULTS["tie_word_embeddings"])
    cfg = ModelConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads,
                      ffn_dim=ffn, max_seq_len=max_pos, rope_theta=theta, norm_eps=float(eps),
                      tie_embeddings=bool(tied), **(scaling or {}))
    if isinstance(hf.get("initializer_range"), (int, float)) and not isinstance(hf["initializer_range"], bool):
        cfg.init_std = float(hf["initializer_range"])
    cfg.validate(prefix="model (from config.json)")
    return cfg


# --------------------------------------------------------------------------------------------
# ModelConfig -> config.json


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def hf_config_from_model_config(cfg: ModelConfig, *, dtype: torch.dtype = torch.float32,
                                bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                                **extra: Any) -> dict[str, Any]:
    """A LlamaForCausalLM config.json for `cfg`. Readable by transformers 4.x (top-level rope_theta,
    rope_scaling) and 5.x (rope_parameters). `extra` keys (e.g. pad_token_id) are added last and
    override the computed ones."""
    rope_parameters: dict[str, Any] = {"rope_theta": float(cfg.rope_theta), "rope_type": "default"}
    rope_scaling = None
    if cfg.rope_scaling_factor != 1.0:
        rope_scaling = {"rope_type": "llama3", "factor": float(cfg.rope_scaling_factor),
                        "low_freq_factor": float(cfg.rope_low_freq_factor),
                        "high_freq_factor": float(cfg.rope_high_freq_factor),
                        "original_max_position_embeddings": int(cfg.rope_original_max_positions)}
        rope_parameters.update(rope_scaling)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": float(cfg.rope_theta), "rope_scaling": rope_scaling, "rope_parameters": rope_parameters,
        "tie_word_embeddings": bool(cfg.tie_embeddings), "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "initializer_range": cfg.init_std, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "use_cache": True, "torch_dtype": _dtype_name(dtype), "dtype": _dtype_name(dtype),
    }
    config.update(extra)
    return config


# --------------------------------------------------------------------------------------------
# parameter names


def to_hf_name(name: str) -> str:
    """Our parameter name -> the HF Llama tensor name (KeyError when it has none)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _OURS_BLOCK.match(name)
    if not match or match.group(2) not in _BLOCK_NAMES:
        raise KeyError(f"parameter {name!r} has no Hugging Face Llama counterpart")
    return f"model.layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"


def from_hf_name(name: str) -> str | None:
    """HF Llama tensor name -> our parameter name; None for tensors that are not parameters
    (rotary inv_freq buffers); KeyError for anything else."""
    if name in _TOP_NAMES_FROM_HF:
        return _TOP_NAMES_FROM_HF[name]
    if _HF_IGNORED.search(name):
        return None
    match = _HF_BLOCK.match(name)
    if not match or match.group(2) not in _BLOCK_NAMES_FROM_HF:
        raise KeyError(f"tensor {name!r} is not a Llama parameter this model has")
    return f"layers.{match.group(1)}.{_BLOCK_NAMES_FROM_HF[match.group(2)]}"


def expected_parameter_names(cfg: ModelConfig) -> list[str]:
    """Our parameter names for `cfg`, the tied output projection excluded (it is the embedding)."""
    names = ["tok_embeddings.weight"]
    names += [f"layers.{i}.{n}" for i in range(cfg.n_layers) for n in _BLOCK_NAMES]
    names.append("norm.weight")
    if not cfg.tie_embeddings:
        names.append("output.weight")
    return names
