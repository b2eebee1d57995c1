"""Per-exit evaluation of a trained model:

    python -m pretrain.eval --checkpoint runs/demo [--data-dir DIR] [--batches N] [--out eval.json] [--plot [PNG]]

Prints per exit the held-out loss, perplexity, top-1 agreement with the final layer and the
expected self-speculative speedup, then decodes a few held-out prompts at the best (E, γ) and
shows measured next to predicted acceptance; writes the same as JSON (default: <run_dir>/eval.json).
--plot also draws the per-exit figure (loss and agreement per exit; default <run_dir>/plots/per_exit.png;
needs matplotlib, the `plot` extra)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from pretrain.checkpoint.inference import model_config_of_checkpoint
from pretrain.evaluation.eval_inputs import EvalInputError, eval_target, validation_data
from pretrain.model_loading import load_model
from pretrain.config import EvalConfig
from pretrain.device import select_device
from pretrain.evaluation.early_exit_eval import format_eval_table
from pretrain.evaluation.evaluate import evaluate


def main(argv: list[str] | None = None) -> int:
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
        target = eval_target(args.checkpoint)
        ckpt = target.checkpoint
        if args.plot is not None:  # fail before the evaluation, not after it
            import matplotlib  # noqa: F401
        val = validation_data(target, args.data_dir, model_config_of_checkpoint(ckpt).vocab_size)
    except EvalInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: --plot needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    print(f"evaluating {target.describe()}", flush=True)
    device = select_device(args.device)
    model, _ = load_model(ckpt, device=device)
    cfg = EvalConfig(batches=args.batches, batch_size=args.batch_size, max_draft_len=args.max_draft_len,
                     decode_prompts=args.decode_prompts, decode_new_tokens=args.decode_new_tokens)
    with torch.no_grad():
        result = evaluate(model, val, device, cfg)
    result["checkpoint"], result["checkpoint_step"] = str(ckpt), target.step
    out = Path(args.out) if args.out else ckpt.parent.parent / "eval.json"
    out.write_text(json.dumps(result, indent=2))
    print(format_eval_table(result))
    print(f"wrote {out}")
    if args.plot is not None:
        from pretrain.evaluation.plots import per_exit_figure, per_exit_title

        png = Path(args.plot) if args.plot else ckpt.parent.parent / "plots" / "per_exit.png"
        print(f"wrote {per_exit_figure(result, png, title=per_exit_title(target.run_dir.name, target.step))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
