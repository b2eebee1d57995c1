"""generate(): one entry point for the strategies.

    tokens, stats = generate(model, prompts, strategy="self_speculative", exit_layer=2, draft_len=4,
                             max_new_tokens=64, temperature=0.8, top_p=0.9, eos_id=0)
    tokens, stats = generate(model, prompts, DecodeOptions(...))      # the same, options as one object
    tokens, stats = generate(model, prompts, exit_layer=2)            # strategy "auto", the default

"auto" (auto_strategy.py) drafts at exit E when the costs measured at this batch size and the
acceptance it observes predict that drafting pays, and decodes autoregressively when not;
stats.auto says what it chose and why. Its costs: `costs` if given, else measured on first use for
this model, batch size and exit (cost_model.decode_costs_at, a few seconds on a CPU) and kept, as
is what its decodes' timings say of them (decode_timings.py).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from pretrain.decoding.adaptive_draft import AdaptiveDraftLength
from pretrain.decoding.auto_strategy import AutoStrategy, decode_auto
from pretrain.decoding.compiled import compile_blocks_for_decoding, decoding_cache_type
from pretrain.decoding.cost_model import decode_costs_at, tensor_parallel
from pretrain.decoding.decode_timings import decode_timings_for
from pretrain.decoding.dynamic_exit import DynamicExit
from pretrain.decoding.runner import BlockRunner
from pretrain.decoding.sampling import SamplingConfig
from pretrain.decoding.self_speculative import decode_self_speculative
from pretrain.decoding.sequences import Sequences
from pretrain.decoding.stats import DecodeStats, Timer
from pretrain.decoding.stepwise import decode_stepwise, prefill
from pretrain.decoding.stop_strings import StopStrings
from schedules.speedup import DecodeCosts

STRATEGIES = ("auto", "autoregressive", "early_exit", "self_speculative")


@dataclass
class DecodeOptions:
    strategy: str = "auto"
    max_new_tokens: int = 64
    exit_layer: int | None = None        # E; default L // 4 (at least 1)
    draft_len: int = 4                   # γ (the cap when adaptive; the start when dynamic)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)   # default greedy
    eos_id: int | None = None
    stop: StopStrings | None = None      # rows also end with the token completing one of these strings
    seed: int = 0
    adaptive_draft: bool = False
    draft_threshold: float = 0.5         # initial τ of the adaptive draft length
    target_acceptance: float = 0.8
    dynamic_exit: bool = False
    max_draft_len: int = 8               # γ range searched by the dynamic exit and by auto
    probe_every: int = 4                 # dynamic exit: rounds between reads of candidate exits
    probe_window: int = 2                # dynamic exit: candidates within E ± window
    costs: DecodeCosts | None = None     # dynamic exit / auto: choose by these costs (auto: measured if None)
    min_speedup: float = 1.05            # auto: draft only when the predicted speedup exceeds this
    auto_timing: bool = True             # auto: correct the costs by this decode's own timings (never
                                         # under tensor parallelism: the ranks' clocks differ)
    compile: str | None = None           # torch.compile the blocks in place: a mode of COMPILE_MODES
    compile_backend: str = "inductor"


def make_options(options: DecodeOptions | None = None, **kwargs) -> DecodeOptions:
    """DecodeOptions from an object and/or keywords; temperature, top_k and top_p are accepted as
    keywords for the sampling configuration."""
    sampling_keys = {k: kwargs.pop(k) for k in ("temperature", "top_k", "top_p") if k in kwargs}
    known = {f.name for f in dataclasses.fields(DecodeOptions)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unknown decoding option(s): {', '.join(unknown)}")
    opts = dataclasses.replace(options or DecodeOptions(), **kwargs)
    if sampling_keys:
        opts.sampling = dataclasses.replace(opts.sampling, **sampling_keys)
    return opts


def _validate(opts: DecodeOptions, num_layers: int) -> int:
    if opts.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {opts.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    exit_layer = opts.exit_layer if opts.exit_layer is not None else max(1, num_layers // 4)
    if opts.strategy != "autoregressive" and not 1 <= exit_layer < num_layers:
        raise ValueError(f"exit_layer={exit_layer} must be in 1..{num_layers - 1} (the model has {num_layers} layers)")
    if opts.draft_len < 1 or opts.max_draft_len < 1:
        raise ValueError(f"draft_len={opts.draft_len} and max_draft_len={opts.max_draft_len} must be >= 1")
    if opts.stop is not None and not isinstance(opts.stop, StopStrings):
        raise TypeError(f"stop must be a StopStrings (pretrain.decoding.stop_strings), got {type(opts.stop).__name__}")
    if opts.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={opts.max_new_tokens} must be >= 1")
    if opts.probe_every < 1 or opts.probe_window < 0:
        raise ValueError(f"probe_every={opts.probe_every} must be >= 1 and probe_window={opts.probe_window} >= 0")
    auto = opts.strategy == "auto"
    if auto and (opts.adaptive_draft or opts.dynamic_exit):
        raise ValueError("strategy auto drafts at a fixed exit with the γ its costs favour: adaptive_draft and "
                         "dynamic_exit need strategy self_speculative")
    if not opts.min_speedup > 0:
        raise ValueError(f"min_speedup={opts.min_speedup} must be > 0")
    if opts.costs is not None:
        if not (opts.dynamic_exit or auto):
            raise ValueError("costs only steer the dynamic exit and strategy auto: set dynamic_exit=True, "
                             "strategy='auto', or leave costs unset")
        if auto and opts.costs.max_positions < opts.max_draft_len + 1:   # auto drafts γ <= max_draft_len
            raise ValueError(f"costs are measured up to {opts.costs.max_positions} positions; strategy auto with "
                             f"max_draft_len={opts.max_draft_len} needs {opts.max_draft_len + 1}")
        longest = max(opts.draft_len, opts.max_draft_len)
        if not auto and opts.costs.max_positions < longest + 1:
            raise ValueError(f"costs are measured up to {opts.costs.max_positions} positions; draft_len="
                             f"{opts.draft_len} and max_draft_len={opts.max_draft_len} need {longest + 1}")
    return exit_layer


def _check_prompts(prompts: list[list[int]], vocab_size: int, opts: DecodeOptions) -> None:
    """Token ids inside the vocabulary (the room for positions is checked in generate)."""
    for i, prompt in enumerate(prompts):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt {i} holds token id {bad}, outside the model's vocabulary 0..{vocab_size - 1}")
    if opts.eos_id is not None and not 0 <= opts.eos_id < vocab_size:
        raise ValueError(f"eos_id={opts.eos_id} is outside the model's vocabulary 0..{vocab_size - 1}")


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], options: DecodeOptions | None = None,
             **kwargs) -> tuple[list[list[int]], DecodeStats]:
    """New tokens per prompt (prompts may differ in length; each row stops at eos_id, included, at
    the token completing a stop string, or after max_new_tokens) and the decoding statistics. Keywords: the fields of DecodeOptions, plus
    temperature / top_k / top_p."""
    opts = make_options(options, **kwargs)
    L = model.cfg.n_layers
    if len(model.layers) != L:
        raise ValueError("decoding needs every block of the model on this process")
    exit_layer = _validate(opts, L)
    device = model.tok_embeddings.weight.device
    was_training = model.training
    model.eval()
    speculative = opts.strategy == "self_speculative"
    gamma_cap = (max(opts.draft_len, opts.max_draft_len if opts.dynamic_exit else 0) if speculative
                 else opts.max_draft_len if opts.strategy == "auto" else 0)
    _check_prompts(prompts, model.cfg.vocab_size, opts)
    seqs = Sequences(prompts, opts.max_new_tokens, opts.eos_id, spare=gamma_cap + 1, device=device, stop=opts.stop)
    # the positions decoding runs: the prompt and every new token but the last (never fed back);
    # drafts past a row's last token are never committed and need no position of their own
    needed = seqs.longest_prompt + opts.max_new_tokens - 1
    if needed > model.cfg.max_seq_len:
        raise ValueError(f"the longest prompt ({seqs.longest_prompt} tokens) + max_new_tokens={opts.max_new_tokens} "
                         f"needs {needed} positions, the model allows {model.cfg.max_seq_len} (model.max_seq_len)")
    if opts.compile is not None:
        compile_blocks_for_decoding(model, opts.compile, opts.compile_backend)
    cache_type = decoding_cache_type(model)
    auto, measuring_s = None, 0.0
    if opts.strategy == "auto":
        start = time.perf_counter()
        costs = opts.costs or decode_costs_at(model, seqs.batch, opts.max_draft_len + 1, exit_layer)
        measuring_s = time.perf_counter() - start
        timed = opts.auto_timing and not tensor_parallel(model)
        auto = AutoStrategy(L, exit_layer, costs, opts.max_draft_len, opts.min_speedup, timed=timed,
                            timings=decode_timings_for(model, costs, seqs.batch, exit_layer, cache_type) if timed else None)
    stats = DecodeStats()
    runner = BlockRunner(model, cache_type.for_model(model, seqs.batch, seqs.capacity), stats)
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    depth = exit_layer if opts.strategy == "early_exit" else L
    try:
        with Timer(stats, device):
            reading = auto is not None and not auto.never_drafts and auto.prompt_bits > 0
            prefill(runner, seqs, depth, opts.sampling, generator, auto.chain if reading else None, exit_layer,
                    -(-auto.prompt_bits // seqs.batch) if reading else 0)
            if speculative:
                adaptive = (AdaptiveDraftLength(opts.draft_threshold, opts.target_acceptance)
                            if opts.adaptive_draft else None)
                dynamic = (DynamicExit(L, exit_layer, opts.draft_len, gamma_cap, probe_every=opts.probe_every,
                                       window=opts.probe_window, costs=opts.costs) if opts.dynamic_exit else None)
                decode_self_speculative(runner, seqs, exit_layer, opts.draft_len, opts.sampling, generator,
                                        adaptive, dynamic, gamma_cap)
            elif auto is not None:
                decode_auto(runner, seqs, auto, opts.sampling, generator)
                stats.auto.append({**auto.report(), "cost_measurement_s": measuring_s})
            else:
                decode_stepwise(runner, seqs, depth, opts.sampling, generator)
    finally:
        model.train(was_training)
    stats.generated -= seqs.tokens_cut
    return seqs.outputs(), stats
