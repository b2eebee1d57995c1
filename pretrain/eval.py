"""Per-exit evaluation of a trained model:

    python -m pretrain.eval --checkpoint runs/demo [--data-dir DIR] [--batches N] [--out eval.json] [--plot [PNG]]

Prints per exit the held-out loss, perplexity, top-1 agreement with the final layer and the
expected self-speculative speedup, then decodes a few held-out prompts at the best (E, γ) and
shows measured next to predicted acceptance; writes the same as JSON (default: <run_dir>/eval.json).
--plot also draws the per-exit figure (loss and agreement per exit; default <run_dir>/plots/per_exit.png;
needs matplotlib, the `plot` extra).

With --tasks: downstream tasks per exit and decoding strategy through lm-evaluation-harness instead
(python -m pretrain.eval --checkpoint runs/demo --tasks arc_easy --exits 2,4,all; see
pretrain/downstream/cli.py and `python -m pretrain.eval --tasks x --help`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from pretrain.checkpoint.inference import resolve_checkpoint
from pretrain.model_loading import load_model
from pretrain.data.dataset import PackedDataset
from pretrain.data.sources import validation_sets
from pretrain.config import EvalConfig
from pretrain.device import select_device
from pretrain.evaluation.early_exit_eval import format_eval_table
from pretrain.evaluation.evaluate import evaluate


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--tasks" or a.startswith("--tasks=") for a in argv):
        from pretrain.downstream.cli import main as downstream_main

        return downstream_main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step_N")
    parser.add_argument("--data-dir", help="prepared data (default: the run's data.dir, or each of its "
                                           "data.sources, reported per source and overall)")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-draft-len", type=int, default=8)
    parser.add_argument("--decode-prompts", type=int, default=4,
                        help="held-out prompts decoded at the best (E, γ); 0 skips")
    parser.add_argument("--decode-new-tokens", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="JSON output (default: <run_dir>/eval.json)")
    parser.add_argument("--plot", nargs="?", const="", metavar="PNG",
                        help="write the per-exit figure (default: <run_dir>/plots/per_exit.png)")
    args = parser.parse_args(argv)

    try:
        ckpt = resolve_checkpoint(args.checkpoint)
        if args.plot is not None:  # fail before the evaluation, not after it
            import matplotlib  # noqa: F401
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: --plot needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    run_cfg = OmegaConf.load(ckpt / "config.yaml")
    device = select_device(args.device)
    model, _ = load_model(ckpt, device=device)
    val = PackedDataset(args.data_dir, "val") if args.data_dir else validation_sets(run_cfg.data)
    cfg = EvalConfig(batches=args.batches, batch_size=args.batch_size, max_draft_len=args.max_draft_len,
                     decode_prompts=args.decode_prompts, decode_new_tokens=args.decode_new_tokens)
    with torch.no_grad():
        result = evaluate(model, val, device, cfg)
    result["checkpoint"] = str(ckpt)
    out = Path(args.out) if args.out else ckpt.parent.parent / "eval.json"
    out.write_text(json.dumps(result, indent=2))
    print(format_eval_table(result))
    print(f"wrote {out}")
    if args.plot is not None:
        from pretrain.evaluation.plots import per_exit_figure

        png = Path(args.plot) if args.plot else ckpt.parent.parent / "plots" / "per_exit.png"
        print(f"wrote {per_exit_figure(result, png, title=f'per-exit evaluation: {ckpt}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
