from pretrain.hf_interop.convert import (HFConfigError, hf_config_from_model_config,
                                         model_config_from_hf)
from pretrain.hf_interop.io import load_hf_checkpoint, save_hf_checkpoint

__all__ = ["HFConfigError", "hf_config_from_model_config", "model_config_from_hf",
           "load_hf_checkpoint", "save_hf_checkpoint"]
