"""Convert between our checkpoints and Hugging Face Llama directories.

    python -m pretrain.hf_interop export --checkpoint runs/demo --out exported/demo-hf
    python -m pretrain.hf_interop export --hf-in /path/to/llama --out /tmp/llama-copy   (round trip)
    python -m pretrain.hf_interop import --hf /path/to/llama --out runs/imported

--checkpoint takes a run directory, one of its checkpoints, or an HF directory. An imported run
holds the weights as checkpoint step 0; training can also start from the HF directory directly
with checkpoint.init_from=/path/to/llama.

Nothing is lost: --out must be new, empty or (export) an earlier export, else the command refuses
unless --overwrite; --out never names (or contains) the input, even with --overwrite. The output
appears atomically (written beside it, then renamed into place).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
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
    exp.add_argument("--out", required=True, help="HF directory to write (an earlier export there is replaced atomically)")
    exp.add_argument("--overwrite", action="store_true", help="replace --out even if it holds something else")
    exp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="dtype of the written weights (default: float32, or the source's for --hf-in)")
    exp.add_argument("--max-shard-size", type=int, default=None, metavar="BYTES",
                     help="split model.safetensors into shards of at most BYTES (default 5e9)")
    imp = sub.add_parser("import", help="HF Llama directory -> our run directory with checkpoint step 0")
    imp.add_argument("--hf", required=True, help="an HF Llama directory")
    imp.add_argument("--out", required=True, help="run directory to create")
    imp.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            return export_cli(args)
        return import_cli(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------------------------
# output checks (before any work)

# What an export writes: a directory holding only these is an earlier export and may be replaced.
EXPORT_FILES = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def _is_export(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    shards = {n for n in names if n.startswith("model-") and n.endswith(".safetensors")}
    return "config.json" in names and names - shards <= EXPORT_FILES


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies inside b."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_output(out: str, source: str, overwrite: bool, *, replaceable) -> None:
    """Refuse (FileExistsError, one line) an --out that would destroy the input or something that is
    not ours to replace; `replaceable(path)` says what this command may replace without --overwrite."""
    out_path, src = Path(out), Path(source)
    if src.exists() and _inside(src, out_path):
        raise FileExistsError(f"--out {out} would replace the input {source}; choose another --out")
    if out_path.exists() and not out_path.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite and not replaceable(out_path):
        raise FileExistsError(f"--out {out} is not empty and holds something else; choose another --out, "
                              f"or pass --overwrite to replace it")


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
    or an HF directory, see pretrain.model_loading.load_model) and write an HF directory at
    args.out."""
    check_output(args.out, args.hf_in or args.checkpoint, args.overwrite, replaceable=_is_export)
    if args.hf_in:
        source = args.hf_in
        model, tokenizer = load_hf_checkpoint(source)
        bos, eos, src_dtype = _hf_special_ids(Path(source))
    else:
        from pretrain.model_loading import load_model_at

        loaded = load_model_at(args.checkpoint)   # the loader resume uses: checks and fallback
        model, tokenizer = loaded.model, loaded.tokenizer
        source = loaded.checkpoint or args.checkpoint
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


def write_run(model: LayerSkipTransformer, tokenizer: str | None, source: str, out: str,
              final: str | None = None) -> Path:
    """Our run directory at `out` with the model as checkpoint step 0 (and its tokenizer.json);
    `final`: where the directory will be renamed to (recorded in its config)."""
    from omegaconf import OmegaConf

    from pretrain.checkpoint.writer import save_checkpoint
    from pretrain.config import RunConfig

    final = final or out
    cfg = RunConfig(model=model.cfg, name=Path(final).name, run_dir=str(final))
    Path(out).mkdir(parents=True, exist_ok=True)
    if tokenizer:
        copy_tokenizer_files(tokenizer, Path(out))  # tokenizer_config.json names the eos token
    return save_checkpoint(Path(out), 0, model, None, {"data": None, "source": str(source)},
                           OmegaConf.to_yaml(OmegaConf.structured(cfg)), keep=1)


def import_cli(args: argparse.Namespace) -> int:
    """`import`: HF directory args.hf -> our run directory args.out (checkpoint step 0), built
    beside --out and renamed into place."""
    check_output(args.out, args.hf, args.overwrite, replaceable=lambda path: False)
    model, tokenizer = load_hf_checkpoint(args.hf)
    out = Path(args.out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.with_name(f".{out.name}.import-{tag}")
    try:
        write_run(model, tokenizer, args.hf, str(tmp), final=args.out)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.replaced-{tag}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    from pretrain.checkpoint.layout import checkpoint_dir

    m, written = model.cfg, sorted(p.name for p in out.iterdir())
    print(f"imported {args.hf} into {args.out}: {m.n_layers} layers, dim {m.dim}, vocab {m.vocab_size:,}, "
          f"{m.num_params() / 1e6:,.2f}M parameters; wrote {', '.join(written)} (checkpoint step 0"
          f"{', no tokenizer: the HF directory has none' if not tokenizer else ''}). Next: evaluate with "
          f"`python -m pretrain.eval --checkpoint {args.out} --data-dir DIR` (data prepared with --tokenizer "
          f"{args.hf}), or train from it with checkpoint.init_from={args.hf}", file=sys.stderr)
    print(json.dumps({"checkpoint": str(checkpoint_dir(out, 0)), "run_dir": str(out), "files": written,
                      "parameters": m.num_params()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
