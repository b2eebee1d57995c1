"""The sizing table of bench/plan_validation.py --part table: pretrain.plan for four model shapes on
8 / 64 / 512 H100-80GB, with LayerSkip's exit losses (rotational curriculum, period 4, the worst step)
and without them (the final exit alone), and at 64 GPUs with the chunked exit loss, beside the public
figures that exist.

Each row simulates a model of 8 and 16 blocks (plan.layers=8) and extrapolates to the real depth
(pretrain/plan/extrapolate.py); two rows check that extrapolation: the 8B shape's 32 blocks simulated in
full, and the 70B shape from 12/24 blocks. Rows already in the partial file (a run cut short) are reused.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

LLAMA3_8B = ["model.vocab_size=128256", "model.dim=4096", "model.n_layers=32", "model.n_heads=32", "model.n_kv_heads=8",
             "model.ffn_dim=14336", "model.max_seq_len=8192", "model.rope_theta=500000.0"]
LLAMA3_70B = ["model.vocab_size=128256", "model.dim=8192", "model.n_layers=80", "model.n_heads=64",
              "model.n_kv_heads=8", "model.ffn_dim=28672", "model.max_seq_len=8192", "model.rope_theta=500000.0"]
# (name, model overrides, seq_len, sequences per data-parallel rank, tensor parallel, blocks simulated K:
# the rows extrapolate from K and 2K). K = 2 misplaced the peak (the head's logits outweigh two
# blocks, so the peak's phase moves from 2 to 4 blocks): 20% low for the 8B shape, 2x off at 70B.
MODELS = [("llama_1b", ["model=llama_1b", "model.vocab_size=128256"], 4096, 2, 1, 8),
          ("llama2_7b", ["model=llama2_7b", "model.vocab_size=32000"], 4096, 2, 1, 8),
          ("Llama-3-8B shape", LLAMA3_8B, 8192, 2, 1, 8), ("70B (Llama-3-70B shape)", LLAMA3_70B, 8192, 4, 8, 8)]
WORLDS = (8, 64, 512)
CHUNK = 4096
# Published figures (torchtitan docs/performance.md, commit eaea6f6, H100 96 GB HBM2e at 500 W, bf16 unless noted)
PUBLIC = {("Llama-3-8B shape", 8): "torchtitan: Llama 3.1 8B, FSDP 8, local batch 2, seq 8192, selective AC: "
                                    "82.4 GiB, 5,762 TPS/GPU (77.0 GiB, 6,667 with torch.compile); 33-39% MFU",
          ("Llama-3-8B shape", 64): "torchtitan (128 GPUs, same setting): 67.0 GiB, 5,605 TPS/GPU",
          ("70B (Llama-3-70B shape)", 64): "torchtitan (256 GPUs, FSDP 32 x TP 8, local batch 16, full AC, "
                                           "Float8 + compile): 71.9 GiB, 829 TPS/GPU"}


def overrides(model: list[str], seq: int, local: int, tp: int, world: int, chunk: int = 0) -> list[str]:
    dp = world // tp
    return [*model, "train.dtype=bfloat16", f"train.seq_len={seq}", f"train.global_batch_size={dp * local}",
            f"train.micro_batch_size={local}", "train.activation_checkpointing=true", f"parallel.tp={tp}",
            f"parallel.dp_shard={dp}", "layerskip=from_scratch", f"layerskip.early_exit.loss_chunk_tokens={chunk}"]


def row_name(name: str, n_layers: int, layers: int, default_layers: int, chunk: int) -> str:
    """The row's name; a depth check (not the model's usual K) says what it simulated."""
    depth = ("" if layers == default_layers else f" ({n_layers} simulated)" if not layers
             else f" (from {layers}/{2 * layers} blocks)")
    return name + depth + (f", chunked {chunk}" if chunk else "")


def simulate_row(name, model, seq, local, tp, default_layers, world, layers, chunk) -> dict:
    from pretrain.config import check_layout, compose_run_config
    from pretrain.plan.__main__ import plan_report
    from pretrain.plan.devices import DEVICES
    from pretrain.plan.estimate import predict_throughput

    h100, started = DEVICES["h100-80gb"], time.perf_counter()
    cfg, _ = compose_run_config(overrides(model, seq, local, tp, world, chunk))
    rep = plan_report(cfg, world, h100, 0.10, 0.40, exit_cost=True, layers=layers)
    r = max(rep["ranks"], key=lambda x: x["peak"])
    plain = predict_throughput(cfg, check_layout(cfg, world), 1, h100, 0.40)
    return {"model": row_name(name, cfg.model.n_layers, layers, default_layers, chunk), "world": world, "layout": rep["layout"],
            "peak_with_exits": r["peak"], "exit_logits": r["exit_logits"],
            "peak_without_exits": r["peak"] - r["exit_logits"], "exits_on": rep["exits_on"], "fits": rep["fits"],
            "usable_bytes": rep["usable_bytes"], "fits_without_exits": r["peak"] - r["exit_logits"] <= rep["usable_bytes"],
            "tokens_per_s_per_device": rep["throughput"]["tokens_per_s"] / world,
            "tokens_per_s_per_device_without_exits": plain.tokens_per_s / world, "seq_len": seq, "local_batch": local,
            "simulated_layers": [layers, 2 * layers] if layers else "all", "public": PUBLIC.get((name, world), ""),
            "seconds": time.perf_counter() - started}


def with_analytic_fields(row: dict, run_overrides: list[str]) -> dict:
    """A reused row completed with what needs no simulation (the plain step's tokens/s, fits)."""
    from pretrain.config import check_layout, compose_run_config
    from pretrain.plan.devices import DEVICES
    from pretrain.plan.estimate import predict_throughput

    h100 = DEVICES["h100-80gb"]
    cfg, _ = compose_run_config(run_overrides)
    usable = int(h100.memory_bytes * 0.9)
    plain = predict_throughput(cfg, check_layout(cfg, row["world"]), 1, h100, 0.40)
    return {**row, "usable_bytes": usable, "fits_without_exits": row["peak_without_exits"] <= usable,
            "tokens_per_s_per_device_without_exits": plain.tokens_per_s / row["world"]}


def table_part(partial: Path | None = None) -> tuple[dict, str]:
    from pretrain.config import compose_run_config

    done = {}
    if partial is not None and partial.is_file():
        done = {(r["model"], r["world"]): r for r in json.loads(partial.read_text())}
    # every model on every world; chunked at 64; then the extrapolation checked: the 8B shape's 32
    # blocks simulated in full, the 70B shape from 12/24 blocks (llama_1b's 8/16 are its full depth)
    jobs = ([(m, w, m[5], 0) for m in MODELS for w in WORLDS] + [(m, 64, m[5], CHUNK) for m in MODELS]
            + [(MODELS[2], 64, 0, 0), (MODELS[3], 64, 12, 0)])
    rows = []
    for (name, model, seq, local, tp, default_layers), world, layers, chunk in jobs:
        n_layers = compose_run_config(overrides(model, seq, local, tp, world, chunk))[0].model.n_layers
        key = (row_name(name, n_layers, layers, default_layers, chunk), world)
        row = done.get(key)
        row = simulate_row(name, model, seq, local, tp, default_layers, world, layers, chunk) if row is None else \
            with_analytic_fields(row, overrides(model, seq, local, tp, world, chunk))
        rows.append(row)
        if partial is not None:
            partial.write_text(json.dumps(rows, indent=2))
        print(json.dumps(row), flush=True)
    gib = 2 ** 30
    lines = ["| model | GPUs | layout | seq x batch/rank | peak GiB, final exit only | peak GiB, LayerSkip exits "
             "| exits on | fits 72 GiB (final only / exits) | tokens/s/GPU at MFU 0.40 (final only / exits) "
             "| public figure |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lay = r["layout"]
        mesh = f"FSDP {lay['dp_shard']}" + (f" x TP {lay['tp']}" if lay["tp"] > 1 else "") + ", AC"
        lines.append(f"| {r['model']} | {r['world']} | {mesh} | {r['seq_len']} x {r['local_batch']} | "
                     f"{r['peak_without_exits'] / gib:.1f} | {r['peak_with_exits'] / gib:.1f} | {r['exits_on']} | "
                     f"{'yes' if r['fits_without_exits'] else 'NO'} / {'yes' if r['fits'] else 'NO'} | "
                     f"{r['tokens_per_s_per_device_without_exits']:,.0f} / {r['tokens_per_s_per_device']:,.0f} | "
                     f"{r['public']} |")
    return {"rows": rows}, "\n".join(lines) + "\n\n" + NOTES


NOTES = """Notes.

- Peak: the largest total of live tensor bytes on the simulated rank (rank 0; TP and FSDP ranks hold the
  same) during the worst-case step - layer dropout off, the rotational curriculum's step with the most exits
  on (L/4 + the final one) - optimizer state present. It excludes the CUDA context, NCCL buffers and the
  allocator's caching: "fits" is peak <= 72 GiB (80 GiB less plan.memory_margin 10%). bf16 autocast with
  float32 weights, gradients and AdamW states (16 bytes a parameter, sharded by FSDP); AC = the trainer's
  full per-block activation checkpointing; the plain exit-loss path unless "chunked" (loss_chunk_tokens=4096).
- Each row simulated 8- and 16-block models and extrapolated to the real depth (plan.layers=8; for
  llama_1b that is its full depth). Checks: the 8B shape's full 32-block simulation gives 46.3 / 111.9 GiB
  against 44.9 / 110.6 extrapolated (-3% / -1%); the 70B shape from 12/24 blocks gives the same bytes as
  from 8/16. The previous table used plan.layers=2 and was wrong by up to 20% (8B shape, final exit only:
  37.2 GiB) and 2x (70B): with two blocks the head's logits outweigh the blocks, so the step's peak falls
  in another phase at 2 blocks than at 4 and the line through them misses.
- LayerSkip's exit losses on the plain path dominate at large vocabularies: each early exit keeps its
  [tokens, vocab] logits until backward (Llama-3-8B shape, 2 x 8192 tokens, vocabulary 128,256: about 8 GiB an
  exit; 8 early exits take the rank from 45 to 111 GiB at 64 GPUs). The chunked exit loss removes almost all
  of it (39 GiB): at 8B and above, train LayerSkip with layerskip.early_exit.loss_chunk_tokens set.
- Under tensor parallelism the chunked loss helps far less: 70B at FSDP 8 x TP 8 costs 2.6 GiB an early exit
  on the plain path (its logits are vocabulary-sharded) and still 2.1 GiB chunked, because the chunked path
  keeps each exit's input gradient dx [tokens, dim] in float32 for the whole sequence (the exit's input is
  gathered from sequence parallelism): 4 x 8192 tokens x 8192 x 4 bytes = 1 GiB an exit, plus that input.
  With 20 early exits on, 70B at 64 GPUs needs 98.5 GiB plain and 71.6 chunked (just under 72). Not fixed
  here: keeping dx reduce-scattered (1/tp of it) or in bf16.
- Throughput is the FLOPs at plan.mfu = 0.40 (pretrain/plan/estimate.py): the exit heads are matmuls of
  dim x vocabulary per token, so the worst step with 9 exits on runs at 3,902 instead of 5,194 tokens/s/GPU
  for the 8B shape (the rotational curriculum's average step has fewer exits on).
- Public figures: torchtitan docs/performance.md (commit eaea6f6) - Llama 3.1 8B on 8 H100 (96 GB) with
  FSDP, local batch 2, seq 8192, selective AC: 82.4 GiB (77.0 with torch.compile) and 5,762 TPS/GPU
  (6,667 compiled), 33-39% MFU; 67.0 GiB and 5,605 TPS/GPU on 128 GPUs; Llama 3.1 70B on 256 GPUs
  (FSDP 32 x TP 8, local batch 16, full AC, Float8): 71.9 GiB, 829 TPS/GPU. Their memory is the allocator's
  (reserved) peak with selective AC (more activations kept than this trainer's full per-block AC) and no
  early exits, so the 8B comparison is one of order, not a like-for-like check: 54 GiB here at 8 GPUs (final
  exit only, full AC) against 82 GiB there; 5,194 predicted tokens/s/GPU at MFU 0.40 against their 5,762 at
  33-39% MFU. No Megatron-LM figure was compared (none taken in this session).
- The 70B rows use FSDP x TP 8. On the CPU validation (bench/results/plan_validation.md) TP 2 and FSDP 2 x
  TP 2 are within 1% of a real run; no GPU has measured a 70B step yet (make gpu-check measures one GPU).
"""
