from pretrain.model.config import ModelConfig
from pretrain.model.transformer import LayerSkipTransformer

__all__ = ["ModelConfig", "LayerSkipTransformer"]
