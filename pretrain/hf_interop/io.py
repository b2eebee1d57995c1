"""Read and write Hugging Face Llama directories: config.json + safetensors (+ tokenizer files).

    model, tokenizer_json = load_hf_checkpoint("/path/to/llama")
    save_hf_checkpoint(model, "exported/llama-hf", tokenizer_file=tokenizer_json, eos_token_id=2)
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.hf_interop.convert import (expected_parameter_names, from_hf_name, hf_config_from_model_config,
                                         model_config_from_hf, to_hf_name)
from pretrain.checkpoint.layout import process_rank
from pretrain.files import fsync_path
from pretrain.model import LayerSkipTransformer
from parallel.parallelize import canonical_parameter_name

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without distributed support
    DTensor = None

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10 ** 9  # "5GB", transformers' default
# Module wrappers that insert a level into parameter names (activation checkpointing, torch.compile).
_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------------------------
# loading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files holding the weights: those the index names, else the single file
    (or every *.safetensors file in the directory)."""
    index_file = path / INDEX
    if index_file.is_file():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_file} has no weight_map")
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"weight file {f} named in {index_file} is missing")
        return files
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("pytorch_model*.bin")):
        raise FileNotFoundError(f"{path} holds only PyTorch .bin weights; convert them to safetensors "
                                f"({SINGLE}) first")
    raise FileNotFoundError(f"{path} has no weights: expected {SINGLE} or {INDEX} with its shards")


def _name_list(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" … ({len(names) - limit} more)" if len(names) > limit else "")


def load_hf_checkpoint(path: str | Path, *, dtype: torch.dtype = torch.float32,
                       device: str | torch.device = "cpu") -> tuple[LayerSkipTransformer, str | None]:
    """(our model holding the checkpoint's weights, path of its tokenizer.json or None).

    Reads config.json and the safetensors weights (one file, or shards listed by
    model.safetensors.index.json). Strict: missing, unknown or wrongly shaped tensors raise
    ValueError listing them. The model is built on the meta device and the tensors, converted to
    `dtype` on `device` one at a time, are assigned to it, so no second copy is made. The model is
    returned in training mode (call .eval() for inference)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Hugging Face checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a Hugging Face model directory)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} is missing: {path} is not a Hugging Face model directory")
    cfg = model_config_from_hf(_read_json(config_file))
    files = _weight_files(path)

    with torch.device("meta"):
        model = LayerSkipTransformer(cfg)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    expected = set(expected_parameter_names(cfg))
    loaded: dict[str, torch.Tensor] = {}
    unknown, bad_shape, duplicate = [], [], []
    misshapen: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                try:
                    ours = from_hf_name(key)
                except KeyError:
                    unknown.append(f"{key} ({f.name})")
                    continue
                if ours is None or (cfg.tie_embeddings and ours == "output.weight"):
                    continue  # recomputed buffer; or lm_head of a tied model (the embedding)
                if ours not in expected:
                    unknown.append(f"{key} ({f.name})")
                    continue
                if ours in loaded or ours in misshapen:
                    duplicate.append(key)
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                if shape != shapes[ours]:
                    bad_shape.append(f"{key} {shape} (config.json implies {shapes[ours]})")
                    misshapen.add(ours)
                    continue
                loaded[ours] = handle.get_tensor(key).to(device=device, dtype=dtype)
    missing = [to_hf_name(n) for n in expected_parameter_names(cfg) if n not in loaded and n not in misshapen]
    problems = [f"{what}: {_name_list(sorted(names))}" for what, names in
                (("missing", missing), ("unexpected", unknown), ("wrong shape", bad_shape),
                 ("in more than one file", duplicate)) if names]
    if problems:
        raise ValueError(f"{path}: the weights do not match config.json: " + "; ".join(problems))

    model.load_state_dict(loaded, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    # RoPE tables are non-persistent buffers, still on meta: computed on the target device, in the
    # model's dtype as model.to(dtype) would have cast them.
    model.init_rope_buffers(device=device, dtype=dtype)
    tokenizer = path / "tokenizer.json"
    return model, (str(tokenizer) if tokenizer.is_file() else None)


# --------------------------------------------------------------------------------------------
# saving


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def _gather(model: torch.nn.Module, dtype: torch.dtype | None
            ) -> tuple[dict[str, torch.Tensor], bool, torch.device | None]:
    """(HF-named full CPU tensors — on rank 0 only, empty elsewhere —, whether any parameter was a
    DTensor, the device of the sharded tensors). DTensors are gathered with full_tensor(), a
    collective, in the same order on every rank."""
    cfg = model.cfg
    state = {canonical_parameter_name(k): v for k, v in model.state_dict().items()}
    wanted = expected_parameter_names(cfg)
    missing = [n for n in wanted if n not in state]
    if missing:
        raise ValueError(f"the model lacks parameters {_name_list(missing)} (a pipeline stage holds only "
                         "some blocks: consolidate the model first, e.g. parallel.consolidate.consolidated_model)")
    keep = process_rank() == 0
    sharded = any(_is_dtensor(state[n]) for n in wanted)
    mesh_device = None
    out: dict[str, torch.Tensor] = {}
    for name in wanted:  # a fixed order: the collectives must match across ranks
        tensor = state[name]
        if _is_dtensor(tensor):
            mesh_device = tensor.device
            tensor = tensor.full_tensor()
        if keep:
            tensor = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype)
            out[to_hf_name(name)] = tensor.contiguous()
        del tensor
    return out, sharded, mesh_device


def save_hf_checkpoint(model: LayerSkipTransformer, out_dir: str | Path, *, tokenizer_file: str | Path | None = None,
                       eos_token_id: int | list[int] | None = None, bos_token_id: int | None = None,
                       dtype: torch.dtype | None = None,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write `model` as a Hugging Face LlamaForCausalLM directory: config.json,
    generation_config.json, model.safetensors (or shards of at most `max_shard_bytes` plus
    model.safetensors.index.json) and, with `tokenizer_file`, tokenizer.json (with its
    tokenizer_config.json, or a minimal one naming the bos/eos tokens).

    `dtype`: of the written weights (default: the model's). Atomic: everything is written into a
    temporary directory next to `out_dir`, which replaces `out_dir` only once complete.

    Distributed: when the parameters are DTensors (FSDP / tensor parallel) every rank must call
    this; the shards are gathered, rank 0 writes, and all ranks return once the directory is in
    place (an error on rank 0 is raised on every rank). With plain tensors under an initialised
    process group only rank 0 writes and other ranks return at once without communicating (so it
    may be called on rank 0 alone, e.g. with a consolidated model)."""
    out_dir = Path(out_dir)
    model = getattr(model, "_orig_mod", model)  # torch.compile'd whole model
    tensors, sharded, mesh_device = _gather(model, dtype)
    if process_rank() != 0:
        if sharded:
            _sync_outcome(None, mesh_device)
        return out_dir
    error: BaseException | None = None
    try:
        _write_directory(model, tensors, out_dir, tokenizer_file=tokenizer_file, eos_token_id=eos_token_id,
                         bos_token_id=bos_token_id, max_shard_bytes=max_shard_bytes)
    except BaseException as err:  # noqa: BLE001 - re-raised below, after telling the other ranks
        error = err
    if sharded and dist.is_available() and dist.is_initialized():
        _sync_outcome(error, mesh_device)
    if error is not None:
        raise error
    return out_dir


def _sync_outcome(error: BaseException | None, device: torch.device | None) -> None:
    """Rank 0 tells every rank whether the write succeeded (a broadcast on a device the default
    process group's backend serves: CUDA for NCCL, else CPU)."""
    backend = str(dist.get_backend())
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    elif "gloo" in backend or device is None:
        device = torch.device("cpu")
    flag = torch.tensor([0 if error is None else 1], device=device)
    dist.broadcast(flag, src=0)
    if process_rank() != 0 and int(flag.item()):
        raise RuntimeError("rank 0 failed to write the Hugging Face checkpoint (see its error)")


def _write_directory(model: LayerSkipTransformer, tensors: dict[str, torch.Tensor], out_dir: Path, *,
                     tokenizer_file: str | Path | None, eos_token_id: int | list[int] | None,
                     bos_token_id: int | None, max_shard_bytes: int) -> None:
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    out_dir = out_dir.resolve()  # "." or "x/.." have no usable name for the sibling temp directory
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer_file} does not exist")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        dtype = tensors["model.embed_tokens.weight"].dtype
        written = _write_shards(tensors, tmp, max_shard_bytes)
        config = hf_config_from_model_config(model.cfg, dtype=dtype, bos_token_id=bos_token_id,
                                             eos_token_id=eos_token_id)
        written.append(_write_json(tmp / "config.json", config))
        generation = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id))
                      if v is not None}
        written.append(_write_json(tmp / "generation_config.json", generation))
        if tokenizer_file is not None:
            written += _write_tokenizer(Path(tokenizer_file), tmp, model.cfg.max_seq_len, bos_token_id,
                                        eos_token_id)
        for f in written:
            fsync_path(f)
        _replace_directory(tmp, out_dir, tag)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_json(path: Path, payload: Any) -> Path:
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _write_shards(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when the tensors exceed
    max_shard_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE), metadata=meta)
        return [out / SINGLE]
    written, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
        written.append(out / fname)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    written.append(_write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return written


def copy_tokenizer_files(tokenizer_file: str | Path, out: Path) -> list[Path]:
    """tokenizer.json and the tokenizer_config.json / special_tokens_map.json next to it (the
    config names the eos token) copied into `out`."""
    tokenizer_file = Path(tokenizer_file)
    written = [Path(shutil.copyfile(tokenizer_file, out / "tokenizer.json"))]
    for side in _TOKENIZER_SIDE_FILES:
        src = tokenizer_file.with_name(side)
        if src.is_file():
            written.append(Path(shutil.copyfile(src, out / side)))
    return written


def _write_tokenizer(tokenizer_file: Path, out: Path, max_len: int, bos_token_id: int | None,
                     eos_token_id: int | list[int] | None) -> list[Path]:
    """tokenizer.json, plus the tokenizer_config.json / special_tokens_map.json found next to it;
    without a tokenizer_config.json, a minimal one naming the bos/eos tokens so that
    transformers' AutoTokenizer knows them."""
    written = copy_tokenizer_files(tokenizer_file, out)
    if (out / "tokenizer_config.json").exists():
        return written
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len}
    first_eos = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
    names = _token_names(tokenizer_file, {"bos_token": bos_token_id, "eos_token": first_eos})
    config.update(names)
    written.append(_write_json(out / "tokenizer_config.json", config))
    return written


def _token_names(tokenizer_file: Path, ids: dict[str, int | None]) -> dict[str, str]:
    wanted = {k: v for k, v in ids.items() if isinstance(v, int)}
    if not wanted:
        return {}
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # the library raises a bare Exception on a bad file
        raise ValueError(f"{tokenizer_file} is not a Hugging Face tokenizers tokenizer.json: {err}") from None
    names = {}
    for key, token_id in wanted.items():
        token = tokenizer.id_to_token(token_id)
        if token is None:
            raise ValueError(f"{key}_id={token_id} is not an id of {tokenizer_file}")
        names[key] = token
    return names


def _replace_directory(tmp: Path, out_dir: Path, tag: str) -> None:
    """Move the complete `tmp` to `out_dir`; an existing `out_dir` is moved aside first and
    deleted only after the new one is in place."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{tag}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    try:
        fsync_path(out_dir.parent)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
