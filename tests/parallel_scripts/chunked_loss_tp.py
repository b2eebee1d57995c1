"""The chunked early-exit loss under torchrun (gloo, CPU).

    torchrun --nproc-per-node 2 tests/parallel_scripts/chunked_loss_tp.py CHUNK [layout ...]

1. Tensor parallel over all ranks, the head alone: the vocabulary-parallel chunked loss of a
   TP-sharded model (sequence-sharded hidden states, vocabulary-sharded output weight; untied and
   tied) against the same loss and gradients computed in one process on whole tensors with
   F.cross_entropy (loss, and gradients w.r.t. the hidden states, norm weight, output weight).
2. Each layout (equality.py's syntax) trained with layerskip.early_exit.loss_chunk_tokens=CHUNK
   against the single-process trainer's plain path, through equality.run_layout.
"""
from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

import equality
from common import fresh_model, max_rel, report, tiny_config
from pretrain.layerskip.early_exit_loss import IGNORE_INDEX, early_exit_loss
from parallel.mesh import init_process_group, teardown_parallel
from parallel.tensor_parallel import apply_tensor_parallel


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def head_check(chunk: int, tie: bool) -> dict:
    """Loss and gradients of the TP chunked loss vs one process's whole-tensor computation."""
    cfg = tiny_config(tie=tie)
    tp, rank = dist.get_world_size(), dist.get_rank()
    B, S, D, V = 2, 16, cfg.model.dim, cfg.model.vocab_size
    g = torch.Generator().manual_seed(7)
    hiddens = {1: torch.randn(B, S, D, generator=g), 3: torch.randn(B, S, D, generator=g)}
    targets = torch.randint(0, V, (B, S), generator=g)
    targets[0, :3] = IGNORE_INDEX
    weights = {1: 0.3, 3: 0.7}
    step_tokens = 40

    ref = fresh_model(cfg)  # independent: whole logits, F.cross_entropy, one process
    ref_h = {l: h.clone().requires_grad_() for l, h in hiddens.items()}
    ref_loss = sum(w * F.cross_entropy(ref.exit_logits(ref_h[l]).flatten(0, 1), targets.flatten(),
                                       reduction="sum", ignore_index=IGNORE_INDEX) / step_tokens
                   for l, w in weights.items())
    ref_loss.backward()

    model = fresh_model(cfg)
    mesh = dist.device_mesh.init_device_mesh("cpu", (tp,))
    apply_tensor_parallel(model, mesh)
    per = S // tp  # sequence-parallel: each rank holds S / tp positions
    local_h = {l: h[:, rank * per:(rank + 1) * per].clone().requires_grad_() for l, h in hiddens.items()}
    loss, per_exit = early_exit_loss(model.exit_logits, local_h, targets, weights, step_tokens,
                                     chunk_tokens=chunk)
    loss.backward()
    grads = {"norm": (_full(model.norm.weight.grad.redistribute(placements=model.norm.weight.placements)),
                      ref.norm.weight.grad),
             "output": (_full(model.output.weight.grad), ref.output.weight.grad)}
    if tie:
        grads["embedding"] = (_full(model.tok_embeddings.weight.grad), ref.tok_embeddings.weight.grad)
    for l in weights:
        grads[f"h{l}"] = (local_h[l].grad, ref_h[l].grad[:, rank * per:(rank + 1) * per])
    grad_rel = {k: float((a - b).abs().max() / b.abs().max()) for k, (a, b) in grads.items()}
    exit_ref = {l: F.cross_entropy(ref.exit_logits(hiddens[l]).flatten(0, 1), targets.flatten(), reduction="sum",
                                   ignore_index=IGNORE_INDEX).item() / step_tokens for l in weights}
    return {"check": f"head tp={tp} tie={int(tie)} chunk={chunk}", "loss_rel": max_rel(loss.item(), ref_loss.item()),
            "exit_rel": max(max_rel(per_exit[l].item(), exit_ref[l]) for l in weights),
            "grad_rel": max(grad_rel.values()), "grad_rel_each": grad_rel}


def main(chunk: int, layouts: list[str]) -> None:
    init_process_group(torch.device("cpu"))
    for tie in (False, True):
        out = head_check(chunk, tie)
        if dist.get_rank() == 0:
            report(out)

    def chunked_config(**kwargs):
        cfg = tiny_config(**kwargs)
        cfg.layerskip.early_exit.loss_chunk_tokens = chunk  # the reference run (train_step) stays plain
        return cfg

    equality.tiny_config = chunked_config
    references: dict = {}
    for spec in layouts:
        out = equality.run_layout(spec, references)
        if dist.get_rank() == 0:
            report(out)
    teardown_parallel()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
