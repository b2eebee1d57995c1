"""What a run is about to do, printed once by rank 0 before the first step (like torchtitan's and
Megatron's start-up banners): a pure function of the checked run and where it starts from.

    run        run directory; a fresh start (random init, seed), continual (checkpoint.init_from) or
               resumed (the checkpoint and its step)
    model      shape; parameters = embedding (V·D, and the output head V·D when untied) + non-embedding
    compute    FLOPs per token, forward + backward (pretrain/metrics/flops.py): L blocks + one head;
               each early exit that is on adds one head
    layout     device, processes, the mesh degrees (pp·dp_replicate·dp_shard·tp), dtype, compile
    batch      global batch in samples and tokens, micro-batches per step
    data       per source: weight, train tokens, tokens this run reads (a mixture: the positions
               pretrain.data.mixture gives it), epochs = read / train tokens
    lr         peak, warmup, decay, floor
    layerskip  p(l,t) = S(t)·D(l)·p_max with the per-layer range; the exit curriculum and the exits
               on at the first step
"""
from __future__ import annotations

from pathlib import Path

from pretrain.config import RunConfig
from pretrain.data.mixture import MixtureSampler
from pretrain.metrics.flops import block_flops_per_token, head_flops_per_token
from pretrain.model.config import ModelConfig
from schedules.exit_loss import candidate_exits, exits_on
from schedules.layer_dropout import layer_dropout_rates


def parameter_counts(m: ModelConfig) -> dict[str, int]:
    """{'embedding', 'head' (0 when tied), 'non_embedding', 'total'} from the shape alone."""
    embedding = m.vocab_size * m.dim
    head = 0 if m.tie_embeddings else embedding
    total = m.num_params()
    return {"embedding": embedding, "head": head, "non_embedding": total - embedding - head, "total": total}


def dense_flops_per_token(m: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of one token through every block and one exit head."""
    return m.n_layers * block_flops_per_token(m, seq_len) + head_flops_per_token(m)


def source_reads(train_data, global_batch: int, steps: int, seed: int = 0) -> list[dict]:
    """Per source: name, weight and share of the stream, train samples and tokens, samples this run
    reads (a mixture: exactly the positions pretrain.data.mixture assigns it), epochs = read / samples."""
    datasets = getattr(train_data, "datasets", [train_data])
    weights = getattr(train_data, "weights", [1.0])
    names = getattr(train_data, "source_names", [Path(train_data.data_dir).name])
    positions = global_batch * steps
    if len(datasets) > 1:
        reads = MixtureSampler([len(d) for d in datasets], weights, global_batch, seed).source_counts(positions)
    else:
        reads = [positions]
    rows = []
    for name, ds, weight, read in zip(names, datasets, weights, reads):
        rows.append({"name": name, "weight": weight, "share": int(read) / max(positions, 1), "samples": len(ds),
                     "tokens": len(ds) * ds.seq_len, "read_tokens": int(read) * ds.seq_len,
                     "epochs": int(read) / max(len(ds), 1)})
    return rows


def _n(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:,.0f}"


def _start(cfg: RunConfig, resumed: Path | None, start_step: int) -> str:
    if resumed is not None:
        return f"resumes from {resumed} at step {start_step} of {cfg.train.steps}"
    if cfg.checkpoint.init_from:
        return (f"starts from the weights of {cfg.checkpoint.init_from} (continual pretraining), "
                f"step 0 of {cfg.train.steps}")
    return f"starts from scratch (random init, seed {cfg.train.seed}), {cfg.train.steps} steps"


def _layerskip(cfg: RunConfig) -> list[str]:
    L, ld, ee, steps = cfg.model.n_layers, cfg.layerskip.layer_dropout, cfg.layerskip.early_exit, cfg.train.steps
    last = layer_dropout_rates(steps - 1, num_layers=L, total_steps=steps, p_max=ld.p_max, depth=ld.depth_scale,
                               time=ld.time_scale)
    first = layer_dropout_rates(0, num_layers=L, total_steps=steps, p_max=ld.p_max, depth=ld.depth_scale,
                                time=ld.time_scale)
    lines = [f"layer dropout: p(l,t) = S(t)·D(l)·p_max, p_max {ld.p_max}, D = {ld.depth_scale}, S = {ld.time_scale}; "
             f"block drop rates {min(first):.2f}..{max(first):.2f} at step 0, {min(last):.2f}..{max(last):.2f} "
             f"at the last step" if ld.p_max > 0 else "layer dropout: off (p_max 0)"]
    if not ee.enabled:
        return lines + [f"early-exit loss: off (exit {L} only)"]
    candidates = candidate_exits(L, ee.exit_layers)
    curriculum = {"none": "every exit every step",
                  "rotational": f"rotational, period {ee.rotation_period}",
                  "gradual": f"gradual: exits switched on from the last toward the first over {ee.gradual_steps} "
                             f"steps"}[ee.curriculum]
    on = exits_on(0, num_layers=L, exit_layers=ee.exit_layers, curriculum=ee.curriculum,
                  rotation_period=ee.rotation_period, gradual_steps=ee.gradual_steps)
    return lines + [f"early-exit loss: exits {', '.join(map(str, candidates))}, e(l) = {ee.importance}, "
                    f"e_scale {ee.e_scale}, curriculum {curriculum}; on at step 0: {', '.join(map(str, on))}"]


def startup_summary(cfg: RunConfig, dims, train_data, resumed: Path | None = None, start_step: int = 0) -> str:
    """The banner (several lines, no trailing newline)."""
    m, tr, op = cfg.model, cfg.train, cfg.optim
    params = parameter_counts(m)
    embed = f"{_n(params['embedding'])} embedding" + (" (tied with the output head)" if m.tie_embeddings
                                                      else f" + {_n(params['head'])} output head")
    flops = dense_flops_per_token(m, tr.seq_len)
    tokens_per_step = tr.global_batch_size * tr.seq_len
    per_rank = tr.global_batch_size // max(dims.dp, 1)
    mesh = " x ".join(f"{name} {getattr(dims, name)}" for name in ("pp", "dp_replicate", "dp_shard", "tp"))
    pipeline = (f", schedule {dims.pp_schedule}, {dims.microbatches} micro-batches, "
                f"{dims.virtual_stages} stage(s) per rank" if dims.pp > 1 else "")
    lines = [
        f"run {cfg.run_dir}: {_start(cfg, resumed, start_step)}",
        f"model: {m.n_layers} layers, dim {m.dim}, {m.n_heads} heads ({m.n_kv_heads} kv), ffn {m.ffn_dim}, "
        f"vocab {m.vocab_size:,}; {_n(params['total'])} parameters = {embed} + "
        f"{_n(params['non_embedding'])} non-embedding",
        f"compute: {_n(flops)}FLOP per token (forward + backward, {m.n_layers} blocks + 1 head; each early exit on "
        f"adds {_n(head_flops_per_token(m))}FLOP); {_n(flops * tokens_per_step * tr.steps)}FLOP for the run at "
        f"full depth",
        f"layout: {dims.device}, {dims.world_size} process(es), mesh {mesh}{pipeline}; {tr.dtype}, "
        f"compile {'on' if tr.compile else 'off'}, "
        f"activation checkpointing {'on' if tr.activation_checkpointing else 'off'}",
        f"batch: {tr.global_batch_size} samples x {tr.seq_len} tokens = {tokens_per_step:,} tokens per step "
        f"({per_rank // tr.micro_batch_size} micro-batch(es) of {tr.micro_batch_size} per data-parallel rank); "
        f"{_n(tokens_per_step * tr.steps)} tokens over {tr.steps} steps",
    ]
    for row in source_reads(train_data, tr.global_batch_size, tr.steps, tr.seed):
        share = f"weight {row['weight']:g} ({100 * row['share']:.1f}% of the stream), " if row["share"] < 1 else ""
        lines.append(f"data {row['name']}: {share}{_n(row['tokens'])} train tokens ({row['samples']:,} samples); "
                     f"this run reads {_n(row['read_tokens'])} = {row['epochs']:.3g} epochs")
    decay = "constant after warm-up" if op.decay == "constant" else \
        f"{op.decay} decay to {op.lr * op.min_lr_ratio:.2e} at the last step"
    lines.append(f"lr: peak {op.lr:.2e}, {op.warmup_steps} warm-up steps, {decay}; AdamW betas ({op.beta1}, "
                 f"{op.beta2}), weight decay {op.weight_decay}")
    lines += _layerskip(cfg)
    return "\n".join(lines)
