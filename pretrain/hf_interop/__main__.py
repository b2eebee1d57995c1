"""Convert between our checkpoints and Hugging Face Llama directories.

    python -m pretrain.hf_interop export --checkpoint runs/demo --out exported/demo-hf
    python -m pretrain.hf_interop export --hf-in /path/to/llama --out /tmp/llama-copy   (round trip)
    python -m pretrain.hf_interop import --hf /path/to/llama --out runs/imported

--checkpoint takes a run directory, one of its checkpoints, or an HF directory. An imported run
holds the weights as checkpoint step 0; training can also start from the HF directory directly
with checkpoint.init_from=/path/to/llama.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.hf_interop.io import copy_tokenizer_files, load_hf_checkpoint, save_hf_checkpoint
from pretrain.model import LayerSkipTransformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pretrain.hf_interop", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="our run/checkpoint (or an HF dir) -> HF Llama directory")
    src = exp.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="our run directory or checkpoint (an HF directory also works)")
    src.add_argument("--hf-in", help="an HF Llama directory (re-export: a round trip through our model)")
    exp.add_argument("--out", required=True, help="HF directory to write (replaced atomically if it exists)")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="dtype of the written weights (default: float32, or the source's for --hf-in)")
    exp.add_argument("--max-shard-size", type=int, default=None, metavar="BYTES",
                     help="split model.safetensors into shards of at most BYTES (default 5e9)")
    imp = sub.add_parser("import", help="HF Llama directory -> our run directory with checkpoint step 0")
    imp.add_argument("--hf", required=True, help="an HF Llama directory")
    imp.add_argument("--out", required=True, help="run directory to create")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            return export_cli(args)
        return import_cli(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------
# export


def _hf_special_ids(hf_dir: Path) -> tuple[int | None, int | list[int] | None, str | None]:
    """(bos, eos, dtype name) of an HF directory; generation_config.json's ids take precedence
    over config.json's."""
    bos = eos = dtype = None
    for name in ("config.json", "generation_config.json"):  # the later file wins
        f = hf_dir / name
        if f.is_file():
            data = json.loads(f.read_text())
            bos = data.get("bos_token_id", bos)
            eos = data.get("eos_token_id", eos)
            dtype = dtype or data.get("dtype") or data.get("torch_dtype")
    return bos, eos, dtype


def _tokenizer_ids(tokenizer: str | None) -> tuple[int | None, int | None]:
    """(bos, eos) of one of our tokenizer.json files: eos as training uses it; no bos."""
    if not tokenizer:
        return None, None
    from pretrain.data.tokenizer import eos_token_id, load_tokenizer

    try:
        return None, eos_token_id(load_tokenizer(tokenizer), tokenizer)
    except ValueError as err:  # no recognisable end-of-text token: export without one
        print(f"warning: {err}; the export names no eos_token_id", file=sys.stderr)
        return None, None


def export_cli(args: argparse.Namespace) -> int:
    """`export`: load the source (an HF directory for --hf-in; for --checkpoint our run, checkpoint
    or an HF directory, see pretrain.checkpoint.inference.load_model) and write an HF directory at
    args.out."""
    if args.hf_in:
        source = args.hf_in
        model, tokenizer = load_hf_checkpoint(source)
        bos, eos, src_dtype = _hf_special_ids(Path(source))
    else:
        from pretrain.model_loading import load_model

        source = args.checkpoint
        model, tokenizer = load_model(source)
        src_dtype = None
        bos, eos = _tokenizer_ids(tokenizer)
    dtype = DTYPES.get(args.dtype or src_dtype or "float32", torch.float32)
    kwargs = {} if args.max_shard_size is None else {"max_shard_bytes": args.max_shard_size}
    out = save_hf_checkpoint(model, args.out, tokenizer_file=tokenizer, bos_token_id=bos, eos_token_id=eos,
                             dtype=dtype, **kwargs)
    print(json.dumps({"exported": str(out), "source": str(source), "dtype": str(dtype).removeprefix("torch.")}))
    return 0


# --------------------------------------------------------------------------------------------
# import


def write_run(model: LayerSkipTransformer, tokenizer: str | None, source: str, out: str) -> Path:
    """Our run directory at `out` with the model as checkpoint step 0 (and its tokenizer.json)."""
    from omegaconf import OmegaConf

    from pretrain.checkpoint.store import save_checkpoint
    from pretrain.config import RunConfig

    cfg = RunConfig(model=model.cfg, name=Path(out).name, run_dir=out)
    Path(out).mkdir(parents=True, exist_ok=True)
    if tokenizer:
        copy_tokenizer_files(tokenizer, Path(out))  # tokenizer_config.json names the eos token
    return save_checkpoint(Path(out), 0, model, None, {"data": None, "source": str(source)},
                           OmegaConf.to_yaml(OmegaConf.structured(cfg)), keep=1)


def import_cli(args: argparse.Namespace) -> int:
    """`import`: HF directory args.hf -> our run directory args.out (checkpoint step 0)."""
    model, tokenizer = load_hf_checkpoint(args.hf)
    path = write_run(model, tokenizer, args.hf, args.out)
    print(json.dumps({"checkpoint": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
