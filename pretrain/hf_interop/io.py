"""Read and write Hugging Face Llama directories: config.json + safetensors (+ tokenizer.json)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from pretrain.hf_interop.convert import (hf_config_from_model_config, model_config_from_hf,
                                         state_dict_from_hf, state_dict_to_hf)
from pretrain.model import LayerSkipTransformer

INDEX = "model.safetensors.index.json"


def _weight_files(path: Path) -> list[Path]:
    if (path / INDEX).is_file():
        index = json.loads((path / INDEX).read_text())
        files = sorted({path / f for f in index["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors weights")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weight file {f} named in {path / INDEX} is missing")
    return files


def load_hf_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> tuple[LayerSkipTransformer, str | None]:
    """(our model with the weights, tokenizer.json path or None). Missing or unexpected
    tensors are an error that lists them."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing")
    cfg = model_config_from_hf(json.loads(config_file.read_text()))
    hf_state: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        hf_state.update(load_file(str(f)))
    state = state_dict_from_hf(hf_state, cfg.tie_embeddings)
    with torch.device("meta"):
        model = LayerSkipTransformer(cfg)
    model = model.to_empty(device=device)
    model.init_rope_buffers()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "output.weight")]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match config.json: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    tokenizer = path / "tokenizer.json"
    return model.to(dtype=dtype), (str(tokenizer) if tokenizer.is_file() else None)


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU tensors (DTensor parameters are gathered)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        out[name] = tensor.detach().to("cpu")
    return out


def save_hf_checkpoint(model: LayerSkipTransformer, out_dir: str | Path, *, tokenizer_file: str | None = None,
                       bos_token_id: int | None = None, eos_token_id: int | None = None,
                       dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2 ** 30) -> Path:
    """Write an HF Llama directory atomically (temp dir renamed into place). All ranks call it
    when parameters are sharded; rank 0 writes."""
    out_dir = Path(out_dir)
    state = _full_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
        return out_dir
    cfg = model.cfg
    dtype = dtype or next(iter(state.values())).dtype
    hf_state = {k: v.to(dtype).contiguous() for k, v in state_dict_to_hf(state, cfg.tie_embeddings).items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_shards(hf_state, tmp, max_shard_bytes)
    config = hf_config_from_model_config(cfg, dtype=dtype, bos_token_id=bos_token_id, eos_token_id=eos_token_id)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if tokenizer_file:
        shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def _write_shards(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
