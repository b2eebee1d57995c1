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

from pretrain.evaluation.eval_inputs import EvalInputError, eval_target, validation_data
from pretrain.model_loading import is_hf_dir, load_model_at
from pretrain.config import EvalConfig
from pretrain.device import select_device
from pretrain.evaluation.early_exit_eval import format_eval_table
from pretrain.evaluation.eval_file import destination
from pretrain.evaluation.evaluate import evaluate
from pretrain.data.sources import source_list
from pretrain.downstream.report import with_earlier_downstream
from pretrain.files import write_atomic
from pretrain.operations.nonfinite import finite_tree
from pretrain.trainer.preflight import differing_token_ids, tokenizer_vocabulary


def at_least(least: int):
    """argparse type: an int >= least (a one-line usage error otherwise)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
        return value
    parse.__name__ = f"int >= {least}"
    return parse


def check_data_tokenizer(tokenizer: str | None, data_dir: str | None) -> None:
    """--data-dir is tokenized as the model was trained: the same token ids as the checkpoint's
    tokenizer (its vocabulary size is validation_data's check)."""
    if data_dir and tokenizer:
        theirs = tokenizer_vocabulary(Path(data_dir) / "tokenizer.json")
        ours = tokenizer_vocabulary(Path(tokenizer))
        if theirs is not None and ours is not None and theirs != ours:
            differ = differing_token_ids(ours, theirs)
            raise ValueError(f"--data-dir {data_dir}: its tokenizer differs from the checkpoint's ({tokenizer}) in "
                             f"{differ} token ids; prepare the data with that tokenizer "
                             f"(pretrain.data.prepare --tokenizer {Path(tokenizer).parent})")


def run_data_dirs(run_cfg) -> set[Path]:
    return {Path(d).resolve() for _, d, _ in source_list(run_cfg.data)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--tasks" or a.startswith("--tasks=") for a in argv):
        from pretrain.downstream.cli import main as downstream_main

        return downstream_main(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step_N")
    parser.add_argument("--data-dir", help="prepared data (default: the run's data.dir, or each of its "
                                           "data.sources, reported per source and overall)")
    parser.add_argument("--batches", type=at_least(1), default=16)
    parser.add_argument("--batch-size", type=at_least(1), default=8)
    parser.add_argument("--max-draft-len", type=at_least(1), default=8)
    parser.add_argument("--decode-prompts", type=at_least(0), default=4,
                        help="held-out prompts decoded at the best (E, γ); 0 skips")
    parser.add_argument("--decode-new-tokens", type=at_least(1), default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", help="JSON output (default: <run_dir>/eval.json, kept when the new evaluation "
                                      "is worse-founded: then written beside it)")
    parser.add_argument("--plot", nargs="?", const="", metavar="PNG",
                        help="write the per-exit figure (default: <run_dir>/plots/per_exit.png)")
    args = parser.parse_args(argv)

    device = select_device(args.device)
    try:
        if Path(args.checkpoint).is_file():
            raise EvalInputError(f"--checkpoint {args.checkpoint} is a file; give a run directory or "
                                 f"its checkpoints/step_N directory")
        if args.out and not Path(args.out).resolve().parent.is_dir():
            raise EvalInputError(f"--out {args.out}: the directory {Path(args.out).resolve().parent} does not exist")
        if args.plot is not None:  # fail before the evaluation, not after it
            import matplotlib  # noqa: F401
        if is_hf_dir(args.checkpoint):
            eval_target(args.checkpoint)   # EvalInputError: import it first (the one-line hint)
        # the loader resume uses: checks, fallback to an older checkpoint, damaged ones marked and skipped
        loaded = load_model_at(args.checkpoint, device=device)
        target = eval_target(str(loaded.checkpoint))
        val = validation_data(target, args.data_dir, loaded.model.cfg.vocab_size)
    except (EvalInputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: --plot needs matplotlib: pip install -e '.[plot]'", file=sys.stderr)
        return 2
    print(f"evaluating {target.describe()}", flush=True)
    model, ckpt, tokenizer = loaded.model, loaded.checkpoint, loaded.tokenizer
    run_cfg = OmegaConf.load(ckpt / "config.yaml")
    cfg = EvalConfig(batches=args.batches, batch_size=args.batch_size, max_draft_len=args.max_draft_len,
                     decode_prompts=args.decode_prompts, decode_new_tokens=args.decode_new_tokens)
    try:
        check_data_tokenizer(tokenizer, args.data_dir)   # non-finite weights: the loader refused them
        with torch.no_grad():
            result = evaluate(model, val, device, cfg)
    except (ValueError, FileNotFoundError) as err:  # DataError, ConfigError: one line, nothing written
        print(f"error: {err}", file=sys.stderr)
        return 2
    result["checkpoint"], result["checkpoint_step"] = str(ckpt), target.step
    if args.data_dir and Path(args.data_dir).resolve() not in run_data_dirs(run_cfg):
        result["data"] = [str(Path(args.data_dir).resolve())]
    print(format_eval_table(result))
    if args.out:
        out, note = Path(args.out), None
    else:
        out, note = destination(ckpt.parent.parent / "eval.json", result, finite_tree)
    write_atomic(out, json.dumps(with_earlier_downstream(out, result), indent=2))
    if note:
        print(note)
    print(f"wrote {out}")
    if args.plot is not None:
        from pretrain.evaluation.plots import per_exit_figure, per_exit_title

        png = Path(args.plot) if args.plot else ckpt.parent.parent / "plots" / "per_exit.png"
        print(f"wrote {per_exit_figure(result, png, title=per_exit_title(target.run_dir.name, target.step))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
