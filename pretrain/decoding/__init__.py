from pretrain.decoding.api import STRATEGIES, DecodeOptions, generate
from pretrain.decoding.batch import DecodeStats
from pretrain.decoding.sampling import SamplingConfig

__all__ = ["STRATEGIES", "DecodeOptions", "DecodeStats", "SamplingConfig", "generate"]
