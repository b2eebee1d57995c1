"""Generate text with a LayerSkip model:

    python -m pretrain.generate --checkpoint runs/demo --prompt "def main(" --strategy self_speculative \\
        --exit-layer 2 --draft-len 4 [--adaptive-draft] [--dynamic-exit] [--temperature 0.8 --top-p 0.9] \\
        [--measure-speedup]

--checkpoint is a run directory, a checkpoints/step_N directory, or a Hugging Face Llama directory.
Prompts come from --prompt (repeatable) or --prompts-file (JSONL with a "prompt" or "text" field).
Prints each completion, then one JSON object with the statistics (and the speedup over
autoregressive decoding of the same prompts with --measure-speedup).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from pretrain.decoding import STRATEGIES, DecodeOptions, SamplingConfig, generate


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    record = json.loads(line)
                    text = record.get("prompt", record.get("text")) if isinstance(record, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{args.prompts_file}:{lineno}: needs a string 'prompt' or 'text' field")
                    prompts.append(text)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    return prompts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", action="append")
    ap.add_argument("--prompts-file")
    ap.add_argument("--strategy", choices=STRATEGIES, default="self_speculative")
    ap.add_argument("--exit-layer", type=int, help="E (default: from the run's eval.json best, else L/4)")
    ap.add_argument("--draft-len", type=int, help="γ (default: from eval.json best, else 4)")
    ap.add_argument("--adaptive-draft", action="store_true")
    ap.add_argument("--target-acceptance", type=float, default=0.8)
    ap.add_argument("--dynamic-exit", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--measure-speedup", action="store_true")
    ap.add_argument("--device", default="auto")
    return ap.parse_args(argv)


def best_from_eval(checkpoint: str) -> dict:
    from pathlib import Path
    for candidate in (Path(checkpoint) / "eval.json", Path(checkpoint).parent.parent / "eval.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()).get("best", {})
    return {}


def decode_all(model, prompt_ids: list[list[int]], opts: DecodeOptions, batch_size: int):
    outputs, stats = [], []
    for i in range(0, len(prompt_ids), batch_size):
        out, st = generate(model, prompt_ids[i:i + batch_size], opts)
        outputs += out
        stats.append(st)
    total = stats[0]
    for st in stats[1:]:
        for field in ("generated", "prefill_tokens", "drafted", "accepted", "rejections", "rounds", "layer_evals",
                      "position_layer_evals", "prefill_layer_evals", "head_evals", "wall_s"):
            setattr(total, field, getattr(total, field) + getattr(st, field))
        total.exit_layers += st.exit_layers
        total.draft_lens += st.draft_lens
    return outputs, total


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pretrain.checkpoint.inference import load_model
    from pretrain.data.tokenizer import eos_token_id, load_tokenizer
    from pretrain.device import select_device

    try:
        prompts = read_prompts(args)
        model, tokenizer_path = load_model(args.checkpoint, device=select_device(args.device))
        if tokenizer_path is None:
            raise ValueError(f"{args.checkpoint} has no tokenizer.json next to it")
        tokenizer = load_tokenizer(tokenizer_path)
        best = best_from_eval(args.checkpoint)
        opts = DecodeOptions(
            strategy=args.strategy, max_new_tokens=args.max_new_tokens,
            exit_layer=args.exit_layer or best.get("exit_layer"), draft_len=args.draft_len or best.get("draft_len", 4),
            sampling=SamplingConfig(args.temperature, args.top_k, args.top_p), eos_id=eos_token_id(tokenizer),
            seed=args.seed, adaptive_draft=args.adaptive_draft, target_acceptance=args.target_acceptance,
            dynamic_exit=args.dynamic_exit)
        prompt_ids = [tokenizer.encode(p).ids for p in prompts]
        outputs, stats = decode_all(model, prompt_ids, opts, args.batch_size)
        report = {"strategy": opts.strategy, "exit_layer": opts.exit_layer, "draft_len": opts.draft_len,
                  "num_layers": model.cfg.n_layers, **stats.summary()}
        if args.measure_speedup:
            base_opts = DecodeOptions(strategy="autoregressive", max_new_tokens=args.max_new_tokens,
                                      sampling=opts.sampling, eos_id=opts.eos_id, seed=args.seed)
            base_out, base = decode_all(model, prompt_ids, base_opts, args.batch_size)
            report["autoregressive_tokens_per_s"] = base.summary()["tokens_per_s"]
            report["speedup"] = report["tokens_per_s"] / base.summary()["tokens_per_s"]
            if opts.sampling.greedy:
                report["identical_to_autoregressive"] = base_out == outputs
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for prompt, out in zip(prompts, outputs):
        print(f"--- {prompt!r}\n{prompt}{tokenizer.decode(out)}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
