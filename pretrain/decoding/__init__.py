"""Decoding for LayerSkip models: autoregressive, early exit and self-speculative (KVQ cache)."""
from pretrain.decoding.generation import STRATEGIES, DecodeOptions, generate, make_options
from pretrain.decoding.kv_cache import ExitQueryCache, StaticKVCache
from pretrain.decoding.sampling import SamplingConfig
from pretrain.decoding.stats import DecodeStats
from pretrain.decoding.stop_strings import StopStrings

__all__ = ["STRATEGIES", "DecodeOptions", "DecodeStats", "ExitQueryCache", "SamplingConfig", "StaticKVCache",
           "StopStrings", "generate", "make_options"]
