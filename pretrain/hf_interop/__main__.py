"""Convert between our checkpoints and Hugging Face Llama directories.

    python -m pretrain.hf_interop export --checkpoint runs/demo --out exported/demo-hf
    python -m pretrain.hf_interop import --hf /path/to/llama --out runs/imported   (then train with
        checkpoint.init_from=/path/to/llama directly, or evaluate/decode the imported checkpoint)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.checkpoint.inference import load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="our run/checkpoint (or an HF dir) -> HF Llama directory")
    exp.add_argument("--checkpoint", required=True)
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    imp = sub.add_parser("import", help="HF Llama directory -> our checkpoint (step 0)")
    imp.add_argument("--hf", required=True)
    imp.add_argument("--out", required=True, help="run directory to create")
    args = ap.parse_args(argv)
    try:
        if args.command == "export":
            return export(args.checkpoint, args.out, getattr(torch, args.dtype))
        return import_hf(args.hf, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def export(checkpoint: str, out: str, dtype: torch.dtype) -> int:
    from pretrain.data.tokenizer import eos_token_id, load_tokenizer
    from pretrain.hf_interop.io import save_hf_checkpoint

    model, tokenizer = load_model(checkpoint)
    eos = eos_token_id(load_tokenizer(tokenizer)) if tokenizer else None
    save_hf_checkpoint(model, out, tokenizer_file=tokenizer, eos_token_id=eos, dtype=dtype)
    print(f"wrote {out}")
    return 0


def import_hf(hf_dir: str, out: str) -> int:
    import shutil

    from omegaconf import OmegaConf

    from pretrain.checkpoint.store import save_checkpoint
    from pretrain.config import RunConfig

    model, tokenizer = load_model(hf_dir)
    cfg = RunConfig(model=model.cfg, name=Path(out).name, run_dir=out)
    Path(out).mkdir(parents=True, exist_ok=True)
    if tokenizer:
        shutil.copyfile(tokenizer, Path(out) / "tokenizer.json")
    path = save_checkpoint(Path(out), 0, model, None, {"data": None, "source": str(hf_dir)},
                           OmegaConf.to_yaml(OmegaConf.structured(cfg)), keep=1)
    print(json.dumps({"checkpoint": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
