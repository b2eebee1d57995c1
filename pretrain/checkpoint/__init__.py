from pretrain.checkpoint.store import find_latest_checkpoint, load_checkpoint, save_checkpoint

__all__ = ["find_latest_checkpoint", "load_checkpoint", "save_checkpoint"]
