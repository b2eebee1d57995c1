"""Generate text with a LayerSkip model:

    python -m pretrain.generate --checkpoint runs/demo --prompt "def main(" [--strategy auto] [--exit-layer 2]
    python -m pretrain.generate --checkpoint runs/demo --prompt "def main(" --strategy self_speculative \\
        --exit-layer 2 --draft-len 4 [--adaptive-draft] [--dynamic-exit] \\
        [--temperature 0.8 --top-p 0.9 --seed 1] [--measure-speedup] [--compile reduce-overhead] \\
        [--measure-costs] [--stop $'\\n\\n']

--checkpoint: a run directory (its newest checkpoint), a checkpoints/step_N directory, or a Hugging
Face Llama directory (config.json + safetensors + tokenizer.json). Prompts come from --prompt
(repeatable) and/or --prompts-file (JSONL: {"prompt": ...}, {"text": ...} or a bare string per
line). Without --exit-layer / --draft-len, the best (E, γ) of the run's eval.json is used when
there is one, else E = L/4 and γ = 4. Prints each completion, then one JSON object with the
statistics (with --measure-speedup also autoregressive decoding of the same prompts and the ratio).
--strategy auto (the default) drafts at E only when the costs measured here at the batch's size and
the exit's agreement with the full model it reads (on the prompt, on rounds and on a few plain
steps) predict that drafting pays, and decodes autoregressively otherwise
(pretrain/decoding/auto_strategy.py); the JSON says what it chose and why ("chosen_strategy",
"auto": measured costs, observed agreement, predicted speedups, every change of mind).
With --dynamic-exit --measure-costs, a block and the shared head are timed here on 1..max_draft_len+1
positions first, and (E, γ) are chosen by the speedup those costs predict rather than by layer
counts (see schedules/speedup.py); the costs are reported.

Tensor parallel: launched by torchrun with N processes, every process loads the checkpoint, the
model is sharded N ways (heads, ffn and vocabulary split; activations and logits replicated) and
decoded with the same code; rank 0 prints.
    torchrun --nproc-per-node 2 -m pretrain.generate --checkpoint runs/demo --prompt "def main("
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.decoding import STRATEGIES, DecodeOptions, DecodeStats, SamplingConfig, StopStrings, generate
from pretrain.decoding.compiled import COMPILE_MODES
from pretrain.decoding.report import decode_settings, explain as explain_report
from pretrain.model_loading import load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--prompt", action="append", help="repeatable")
    ap.add_argument("--prompts-file", help="JSONL, one prompt per line")
    ap.add_argument("--strategy", default="auto", help=f"one of {', '.join(STRATEGIES)}")
    ap.add_argument("--exit-layer", type=int, help="E: draft (or early-exit) with blocks before E")
    ap.add_argument("--draft-len", type=int, help="γ: draft tokens per round (the cap with --adaptive-draft)")
    ap.add_argument("--adaptive-draft", action="store_true", help="stop drafting below a self-tuning confidence")
    ap.add_argument("--target-acceptance", type=float, default=0.8, help="what --adaptive-draft tunes toward")
    ap.add_argument("--dynamic-exit", action="store_true", help="choose E and γ online from per-exit acceptance")
    ap.add_argument("--max-draft-len", type=int, default=8, help="γ range searched by --dynamic-exit and auto")
    ap.add_argument("--min-speedup", type=float, default=1.05,
                    help="auto: draft only when the predicted speedup over autoregressive exceeds this")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--measure-speedup", action="store_true",
                    help="also decode autoregressively and report the ratio")
    ap.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's end-of-text token")
    ap.add_argument("--stop", action="append", metavar="STRING",
                    help="repeatable: a completion ends with the token that completes this string (kept in the "
                         "printed text); in bash, --stop $'\\n\\n' for a blank line")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--compile", choices=COMPILE_MODES,
                    help="torch.compile the blocks for draft and verify (reduce-overhead: CUDA graphs on CUDA)")
    ap.add_argument("--measure-costs", action="store_true",
                    help="with --dynamic-exit: time a block and the head here and choose (E, γ) by those costs")
    args = ap.parse_args(argv)
    if args.measure_costs and not args.dynamic_exit:
        ap.error("--measure-costs steers --dynamic-exit: add --dynamic-exit (strategy auto measures its own costs)")
    if args.batch_size < 1:
        ap.error(f"--batch-size={args.batch_size} must be >= 1")
    return args


def check_numbers(args: argparse.Namespace) -> None:
    """The strategy and numeric flags, before anything is loaded: a value given is used as given or refused."""
    if args.strategy not in STRATEGIES:
        raise ValueError(f"--strategy={args.strategy} is not one of {', '.join(STRATEGIES)}")
    if (args.adaptive_draft or args.dynamic_exit) and args.strategy != "self_speculative":
        raise ValueError(f"--adaptive-draft and --dynamic-exit need --strategy self_speculative (not {args.strategy})")
    if not 0 < args.min_speedup < math.inf:
        raise ValueError(f"--min-speedup={args.min_speedup} must be a finite number > 0")
    for flag, value, least in (("--exit-layer", args.exit_layer, 1), ("--draft-len", args.draft_len, 1),
                               ("--max-draft-len", args.max_draft_len, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--top-k", args.top_k, 0)):
        if value is not None and value < least:
            raise ValueError(f"{flag}={value} must be >= {least}")
    if not 0 <= args.temperature < math.inf:   # also nan
        raise ValueError(f"--temperature={args.temperature} must be a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:                 # also nan
        raise ValueError(f"--top-p={args.top_p} must be in (0, 1]")
    if not 0 < args.target_acceptance < 1:
        raise ValueError(f"--target-acceptance={args.target_acceptance} must be in (0, 1)")
    if args.stop is not None and not all(args.stop):
        raise ValueError(f"--stop needs a non-empty string, got {args.stop!r}")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{args.prompts_file}:{lineno}: not JSON ({err})") from None
                text = record.get("prompt", record.get("text")) if isinstance(record, dict) else record
                if not isinstance(text, str):
                    raise ValueError(f"{args.prompts_file}:{lineno}: needs a string, or an object with a "
                                     "string 'prompt' or 'text' field")
                prompts.append(text)
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    return prompts


def best_from_eval(checkpoint: str, n_layers: int) -> dict:
    """The best (exit_layer, draft_len) the run's evaluation found, if that evaluation is sound:
    finite throughout, and an exit 1..n_layers-1 with a draft length >= 1. A bad eval.json is named
    on stderr and not used."""
    from pretrain.operations.nonfinite import finite_tree

    path = Path(checkpoint)
    for candidate in (path / "eval.json", path.parent.parent / "eval.json"):
        if candidate.is_file():
            try:
                result = json.loads(candidate.read_text())
                best = result.get("best", {})
            except (ValueError, AttributeError):
                best, result = None, None
            sound = isinstance(best, dict) and finite_tree(result) and \
                isinstance(best.get("exit_layer"), int) and 1 <= best["exit_layer"] < n_layers and \
                isinstance(best.get("draft_len"), int) and best["draft_len"] >= 1
            if not sound and best != {}:
                print(f"warning: {candidate} is not a sound evaluation (non-finite values or no valid best "
                      f"exit/draft length); not using its (E, γ)", file=sys.stderr)
                return {}
            return best
    return {}


def end_of_text(tokenizer, tokenizer_path: str) -> int | None:
    try:
        from pretrain.data.tokenizer import eos_token_id

        return eos_token_id(tokenizer, tokenizer_path)
    except (ImportError, ValueError):
        return None


def decode_all(model, prompt_ids: list[list[int]], opts: DecodeOptions, batch_size: int
               ) -> tuple[list[list[int]], DecodeStats]:
    outputs, total = [], DecodeStats()
    for i in range(0, len(prompt_ids), batch_size):
        out, stats = generate(model, prompt_ids[i:i + batch_size], opts)
        outputs += out
        total.merge(stats)
    return outputs, total


def measure_against_autoregressive(model, prompt_ids, opts: DecodeOptions, batch_size: int, outputs,
                                   stats: DecodeStats) -> dict:
    base_opts = DecodeOptions(strategy="autoregressive", max_new_tokens=opts.max_new_tokens,
                              sampling=opts.sampling, eos_id=opts.eos_id, stop=opts.stop, seed=opts.seed)
    generate(model, prompt_ids[:1], base_opts, max_new_tokens=2)   # warm-up
    base_out, base = decode_all(model, prompt_ids, base_opts, batch_size)
    fast, slow = stats.summary(), base.summary()
    report = {"autoregressive_tokens_per_s": slow["tokens_per_s"], "autoregressive_wall_s": slow["wall_s"],
              "speedup": (fast["tokens_per_s"] / slow["tokens_per_s"]
                          if fast["tokens_per_s"] and slow["tokens_per_s"] else None),
              "layer_evals_ratio": slow["layer_evals_per_token"] / fast["layer_evals_per_token"]}
    if opts.sampling.greedy:
        report["identical_to_autoregressive"] = base_out == outputs
    return report


def shard_over_launched_processes(model: torch.nn.Module, device: torch.device) -> bool:
    """Under torchrun (WORLD_SIZE > 1): tensor-parallel over all processes. True on the rank that prints."""
    from parallel.mesh import init_process_group, launched_world_size

    world = launched_world_size()
    if world == 1:
        return True
    from torch.distributed.device_mesh import init_device_mesh

    from pretrain.config import check_tensor_parallel_widths
    from parallel.tensor_parallel import apply_tensor_parallel_for_decoding

    check_tensor_parallel_widths(model.cfg, world, tp_key="WORLD_SIZE (tensor-parallel decoding)")
    init_process_group(device)
    apply_tensor_parallel_for_decoding(model, init_device_mesh(device.type, (world,), mesh_dim_names=("tp",)))
    return dist.get_rank() == 0


def measured_costs(model: torch.nn.Module, opts: DecodeOptions):
    """Block and head costs timed on this process (compiled first if asked, so the timing is of the
    blocks that will decode); under tensor parallelism rank 0's, so every rank chooses alike."""
    from pretrain.decoding.compiled import compile_blocks_for_decoding
    from pretrain.decoding.cost_model import measure_decode_costs

    if opts.compile is not None:
        compile_blocks_for_decoding(model, opts.compile, opts.compile_backend)
    positions = max(opts.draft_len, opts.max_draft_len) + 1   # the γ range the dynamic exit searches, + 1
    costs = [measure_decode_costs(model, positions)]
    if dist.is_initialized():
        dist.broadcast_object_list(costs, src=0)
    return costs[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from parallel.mesh import local_rank
    from pretrain.device import select_device

    try:
        check_numbers(args)
        prompts = read_prompts(args)
        device = select_device(args.device, local_rank())
        model, tokenizer_path = load_model(args.checkpoint, device=device)   # in eval mode
        printing = shard_over_launched_processes(model, device)
        if tokenizer_path is None:
            raise FileNotFoundError(f"{args.checkpoint} has no tokenizer.json next to it")
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        best = best_from_eval(args.checkpoint, model.cfg.n_layers)
        opts = DecodeOptions(
            strategy=args.strategy, max_new_tokens=args.max_new_tokens,
            exit_layer=args.exit_layer if args.exit_layer is not None else best.get("exit_layer"),
            draft_len=args.draft_len if args.draft_len is not None else best.get("draft_len") or 4,
            sampling=SamplingConfig(args.temperature, args.top_k, args.top_p),
            eos_id=None if args.no_eos else end_of_text(tokenizer, tokenizer_path), seed=args.seed,
            adaptive_draft=args.adaptive_draft, target_acceptance=args.target_acceptance,
            dynamic_exit=args.dynamic_exit, max_draft_len=args.max_draft_len, compile=args.compile,
            min_speedup=args.min_speedup)
        if args.stop:
            opts.stop = StopStrings.of(args.stop, lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                                       tokenizer.decode)
        if args.measure_costs:
            opts.costs = measured_costs(model, opts)
        prompt_ids = [tokenizer.encode(p).ids for p in prompts]
        if args.measure_speedup:
            generate(model, prompt_ids[:1], opts, max_new_tokens=2)  # warm-up
        outputs, stats = decode_all(model, prompt_ids, opts, args.batch_size)
        exit_layer = opts.exit_layer if opts.exit_layer is not None else max(1, model.cfg.n_layers // 4)
        report = {**decode_settings(opts.strategy, exit_layer, opts.draft_len, opts.adaptive_draft, opts.dynamic_exit),
                  "num_layers": model.cfg.n_layers, "prompts": len(prompts), **stats.summary()}
        if stats.auto:
            chosen = {a["chosen"] for a in stats.auto}
            report["chosen_strategy"] = chosen.pop() if len(chosen) == 1 else "mixed"
            report["reason"] = stats.auto[-1]["reason"]
        if opts.costs is not None:
            report["decode_costs"] = {"block_s": list(opts.costs.block), "head_s": list(opts.costs.head),
                                      "step_s": opts.costs.step}
        if args.measure_speedup:
            report.update(measure_against_autoregressive(model, prompt_ids, opts, args.batch_size, outputs, stats))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not printing:
        return 0
    for i, (ids, out) in enumerate(zip(prompt_ids, outputs)):
        print(f"--- completion {i}\n{tokenizer.decode(ids + out)}")
    print(explain_report(report), file=sys.stderr)  # what the acceptance figures mean; stdout ends with the JSON
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    from parallel.mesh import teardown_parallel

    torch.set_grad_enabled(False)
    code = main()
    teardown_parallel(wait_for_peers=code == 0)    # the process group a torchrun launch created
    sys.exit(code)
