"""The lm-evaluation-harness model `layerskip`: our checkpoints and HF Llama directories at any exit,
generating with any decoding strategy.

    lm_eval --model layerskip --model_args checkpoint=runs/demo,exit_layer=4 --tasks ...
    (through `python -m pretrain.lm_eval_cli`, which registers the name first)

model_args: checkpoint (or pretrained): a run directory, a checkpoint or an HF Llama directory;
exit_layer E (default L): log-likelihoods and greedy generation at exit E (blocks 1..E, then the
shared exit head); strategy: autoregressive | early_exit | self_speculative | adaptive | dynamic,
optionally as 'name:E:γ' (see pretrain.downstream.strategies; for the speculative ones E is the draft
exit and log-likelihoods are the full model's); draft_len γ; batch_size; device; dtype;
max_gen_toks (default 256); truncate (default False: a request longer than the model's positions is
an error; True: cut the context on the left as the harness's HF backend does); seed.

Log-likelihoods of all `exits` of a sweep come from one forward and are shared through `cache`,
so evaluating a task at every exit costs about one evaluation."""
from __future__ import annotations

import json

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string

from pretrain.decoding import DecodeStats, SamplingConfig, StopStrings, generate
from pretrain.device import select_device
from pretrain.downstream.scoring import score_batch
from pretrain.downstream.source import ModelSource
from pretrain.downstream.strategies import Strategy, parse_strategy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RequestTooLong(ValueError):
    """A request needs more positions than the model has (and truncation was not asked for)."""


def strategy_from_args(strategy: str | None, exit_layer: int | None, draft_len: int | None,
                       num_layers: int) -> Strategy:
    """model_args -> Strategy: no strategy means exit E (early_exit:E; E = L is autoregressive)."""
    if strategy is None:
        return parse_strategy(f"early_exit:{exit_layer or num_layers}", num_layers)
    if ":" in strategy or strategy == "autoregressive":
        if strategy == "autoregressive" and exit_layer not in (None, num_layers):
            raise ValueError(f"strategy=autoregressive decodes with all {num_layers} layers; for exit "
                             f"{exit_layer} use strategy=early_exit")
        return parse_strategy(strategy, num_layers)
    parts = [strategy] + ([str(exit_layer)] if exit_layer is not None else []) + \
        ([str(draft_len)] if draft_len is not None and exit_layer is not None else [])
    return parse_strategy(":".join(parts), num_layers)


@register_model("layerskip")
class LayerSkipLM(TemplateLM):
    def __init__(self, checkpoint: str | None = None, pretrained: str | None = None, exit_layer: int | None = None,
                 strategy: str | None = None, draft_len: int | None = None, batch_size: int | str = 8,
                 device: str | None = "auto", dtype: str = "float32", max_gen_toks: int = 256,
                 truncate: bool = False, seed: int = 0, max_batch_size: int | None = None,
                 source: ModelSource | None = None, exits: list[int] | None = None, cache: dict | None = None):
        super().__init__()
        if source is None:
            path = checkpoint or pretrained
            if not path:
                raise ValueError("model_args need checkpoint=<run dir, checkpoint or HF Llama dir>")
            if dtype not in DTYPES:
                raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
            source = ModelSource.open(path, select_device(device or "auto"), DTYPES[dtype])
        self.source = source
        L = source.num_layers
        self.strategy = strategy_from_args(strategy, exit_layer, draft_len, L)
        self.exit_layer = self.strategy.scoring_exit(L)
        self.sweep = sorted(set(exits or ()) | {self.exit_layer})
        if self.sweep[0] < 1 or self.sweep[-1] > L:
            raise ValueError(f"exits {self.sweep} must be in 1..{L}")
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self._max_gen_toks, self.truncate, self.seed = int(max_gen_toks), bool(truncate), int(seed)
        self.cache = {} if cache is None else cache   # (exit, input, targets) -> (ll, greedy)
        self.decode_stats = DecodeStats()
        self.truncated = 0   # requests whose context was cut (truncate=True)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "LayerSkipLM":
        """model_args win over the harness's own flags (--batch_size, --device); the harness's default
        device (an accelerator on any machine) falls back to 'auto' where there is none."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        if "device" in extra:
            try:
                select_device(str(extra["device"]).split(":")[0])
            except (ValueError, RuntimeError):
                extra["device"] = "auto"
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LayerSkipLM":
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- what the harness asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.source.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.source.prefix_id

    @property
    def max_length(self) -> int:
        return self.source.cfg.max_seq_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self.source.device

    @property
    def tokenizer_name(self) -> str:
        return self.source.tokenizer_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.source.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False).ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.source.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # --- log-likelihoods
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._task_names = [r.task_name for r in requests]
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = []
        for i, (_, context, continuation) in enumerate(requests):
            pairs.append(self._fit(list(context) + list(continuation), len(continuation), i))
        return self._scores(pairs)

    def _fit(self, whole: list[int], n_cont: int, index: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(input, targets) of one request, refused or (truncate) cut on the left when it needs more
        than max_length positions (the input is the sequence without its last token)."""
        room = self.max_length
        if len(whole) - 1 > room:
            task = getattr(self, "_task_names", [None] * (index + 1))[index]
            if not self.truncate or n_cont > room:
                raise RequestTooLong(
                    f"task {task or '?'}: a request needs {len(whole) - 1} positions ({n_cont} continuation "
                    f"tokens), the model has {room} (model.max_seq_len)" +
                    ("" if n_cont > room else "; pass truncate=True (--truncate) to cut contexts on the left"))
            whole = whole[-(room + 1):]
            self.truncated += 1
        return tuple(whole[:-1]), tuple(whole[-n_cont:])

    def _scores(self, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[tuple[float, bool]]:
        """Scores at self.exit_layer; missing ones computed for every exit of the sweep at once."""
        missing = sorted({p for p in pairs if (self.exit_layer, *p) not in self.cache}, key=lambda p: -len(p[0]))
        for i in range(0, len(missing), self.batch_size):
            chunk = missing[i:i + self.batch_size]
            scores = score_batch(self.source.model, [p[0] for p in chunk], [p[1] for p in chunk], self.sweep)
            for exit_layer, values in scores.items():
                for p, value in zip(chunk, values):
                    self.cache[(exit_layer, *p)] = value
        return [self.cache[(self.exit_layer, *p)] for p in pairs]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity tasks: disjoint windows of max_length tokens, each after one token of context
        (the prefix token for the first), summed per document."""
        counts, pairs = [], []
        for (string,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            counts.append(len(windows))
            pairs += [(tuple((ctx + cont)[:-1]), tuple(cont)) for ctx, cont in windows]
        scores, out, start = self._scores(pairs), [], 0
        for n in counts:
            out.append(sum(ll for ll, _ in scores[start:start + n]))
            start += n
        return out

    # --- generation
    def _generation_plan(self, requests) -> list[tuple[dict, list[str], int, list[tuple[int, list[int]]]]]:
        """Requests grouped by generation kwargs: (sampling kwargs, stop strings, max new tokens,
        [(request index, prompt tokens)]); every prompt checked against the model's positions."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        plan = []
        for indices in groups.values():
            first = requests[indices[0]]
            kwargs = normalize_gen_kwargs(dict(first.args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_new + 1      # prompt + max_new - 1 positions are run
            if room < 1:
                raise RequestTooLong(f"task {first.task_name}: max_gen_toks={max_new} new tokens do not fit the "
                                     f"model's {self.max_length} positions (model.max_seq_len)")
            prompts = []
            for i in indices:
                tokens = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                if len(tokens) > room:
                    if not self.truncate:
                        raise RequestTooLong(
                            f"task {requests[i].task_name}: a prompt of {len(tokens)} tokens + max_gen_toks={max_new} "
                            f"needs {len(tokens) + max_new - 1} positions, the model has {self.max_length} "
                            "(model.max_seq_len); pass truncate=True (--truncate) to cut prompts on the left")
                    tokens = tokens[-room:]
                    self.truncated += 1
                prompts.append((i, tokens))
            plan.append((kwargs, until, max_new, prompts))
        return plan

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        plan = self._generation_plan(requests)   # every request checked before the model is loaded
        out: list[str | None] = [None] * len(requests)
        for kwargs, until, max_new, prompts in plan:
            sampling = SamplingConfig(float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                                      int(kwargs.get("top_k", 0) or 0), float(kwargs.get("top_p", 1.0) or 1.0))
            opts = self.strategy.options(max_new, sampling, self.eot_token_id, self.seed)
            if until:    # rows end at a stop string, not max_gen_toks later (the text is cut below anyway)
                opts.stop = StopStrings.of(until, lambda s: self.tok_encode(s, add_special_tokens=False),
                                           self.tok_decode)
            prompts = sorted(prompts, key=lambda p: -len(p[1]))
            for b in range(0, len(prompts), self.batch_size):
                chunk = prompts[b:b + self.batch_size]
                tokens, stats = generate(self.source.model, [p for _, p in chunk], opts)
                self.decode_stats.merge(stats)
                for (i, _), new in zip(chunk, tokens):
                    out[i] = postprocess_generated_text(self.tok_decode(new), until, None)
        return out
