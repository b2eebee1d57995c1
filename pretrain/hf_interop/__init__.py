"""Hugging Face Llama interop: import an HF LlamaForCausalLM directory as our model, export ours as one."""
from pretrain.hf_interop.convert import (HFConfigError, expected_parameter_names, from_hf_name,
                                         hf_config_from_model_config, model_config_from_hf, to_hf_name)
from pretrain.hf_interop.io import load_hf_checkpoint, save_hf_checkpoint

__all__ = ["HFConfigError", "expected_parameter_names", "from_hf_name", "hf_config_from_model_config",
           "model_config_from_hf", "to_hf_name",
           "load_hf_checkpoint", "save_hf_checkpoint"]
