from pretrain.checkpoint.store import (find_latest_checkpoint, load_checkpoint, save_checkpoint)
from pretrain.checkpoint.inference import load_model

__all__ = ["find_latest_checkpoint", "load_checkpoint", "save_checkpoint", "load_model"]
