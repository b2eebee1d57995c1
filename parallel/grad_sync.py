"""Gradient finalisation after the backward pass, before the optimizer step (in the spirit of
Megatron's finalize_model_grads), and the global gradient norm.

Under pipeline parallelism every stage holds a replica of the exit head (final norm + output
projection) and adds the gradient of its own exits to it; with tied embeddings the first stage's
output projection IS its embedding. Each reduction below sums one kind of replica over the
pipeline group, so that every replica holds the gradient of the single model and the replicas
(updated by identical optimizers from identical values) stay identical. Replicas on one rank
(virtual stages) are summed locally first. Data-parallel reductions are FSDP's; tensor-parallel
ones DTensor's.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _full_grad(p: nn.Parameter) -> torch.Tensor:
    """p's gradient with p's own placements (a sequence-parallel norm's gradient may still be a
    pending Partial sum over tp ranks); zeros when it has none."""
    g = p.grad
    if g is None:
        return torch.zeros_like(p)
    if isinstance(g, DTensor) and g.placements != p.placements:
        g = g.redistribute(g.device_mesh, p.placements)
    return g


def _sum_replica_grads(params: Sequence[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """Set every param's grad to the sum of all replicas' grads on all ranks of `group`.
    All params are replicas of one weight with identical sharding; missing grads count as 0."""
    params = list({id(p): p for p in params}.values())
    if not params:
        return
    total = None
    for p in params:
        g = _local(_full_grad(p))
        total = g.clone() if total is None else total.add_(g)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    for p in params:
        if isinstance(p, DTensor):
            p.grad = DTensor.from_local(total.clone(), p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())
        else:
            p.grad = total.clone()


def is_tied_replica(part: nn.Module) -> bool:
    """A stage without the embedding whose model ties output projection and embedding."""
    return part.cfg.tie_embeddings and "tok_embeddings" not in part._modules


def reduce_exit_head_grads(parts: Sequence[nn.Module], pp_group: dist.ProcessGroup | None) -> None:
    """Final norm, and the output projection when it is not tied: one replica per stage, each
    holding the gradient of its stage's exits; afterwards each holds their sum."""
    _sum_replica_grads([p.norm.weight for p in parts], pp_group)
    if not parts[0].cfg.tie_embeddings:
        _sum_replica_grads([p.output.weight for p in parts], pp_group)


def reduce_tied_embedding_grads(parts: Sequence[nn.Module], pp_group: dist.ProcessGroup | None) -> None:
    """Tied embeddings: the first stage's embedding (= its output projection) and the output
    projections of all other stages are one weight; sum the embedding gradient and every
    stage's exit-head gradient into each of them."""
    if parts[0].cfg.tie_embeddings:
        _sum_replica_grads([p.output.weight for p in parts], pp_group)


def materialize_missing_grads(part: nn.Module) -> None:
    """Give parameters that received no gradient (a block every row skipped) a zero gradient, as
    a sharded run that runs the block on a dummy row does; keeps AdamW's updates and state
    identical across parallel layouts."""
    for p in part.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


@torch.no_grad()
def finalize_gradients(parts: Sequence[nn.Module], pp_group: dist.ProcessGroup | None) -> None:
    """After the backward pass, before clipping: every parameter has a gradient, and every exit
    head replica (and tied embedding) holds the gradient of the single model."""
    for part in parts:
        materialize_missing_grads(part)
    if pp_group is not None:
        reduce_exit_head_grads(parts, pp_group)
        reduce_tied_embedding_grads(parts, pp_group)


def owned_parameters(part: nn.Module) -> Iterable[nn.Parameter]:
    """The parameters this stage counts in the global gradient norm: every parameter once over
    the pipeline - head replicas belong to the last stage, a tied embedding to the first."""
    replicas = set()
    if not part.is_last_stage:
        replicas.add(id(part.norm.weight))
        if not part.cfg.tie_embeddings:
            replicas.add(id(part.output.weight))
    if is_tied_replica(part):
        replicas.add(id(part.output.weight))
    return [p for p in part.parameters() if id(p) not in replicas]


def _norm(grads: list[torch.Tensor]) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.float()


def clip_grad_norm_global(parts: Sequence[nn.Module], max_norm: float,
                          pp_group: dist.ProcessGroup | None) -> float:
    """The global L2 norm of all gradients (all ranks, all stages, each weight once); clips every
    gradient (replicas included) by it when max_norm > 0. Returns the norm before clipping."""
    owned = [p.grad for part in parts for p in owned_parameters(part) if p.grad is not None]
    dtensors = [g for g in owned if hasattr(g, "full_tensor")]
    plain = [g for g in owned if not hasattr(g, "full_tensor")]
    device = owned[0].device if owned else torch.device("cpu")
    norms = [_norm(group) for group in (dtensors, plain) if group] or [torch.zeros((), device=device)]
    norm = torch.linalg.vector_norm(torch.stack(norms))   # one group: exactly its norm
    if pp_group is not None:
        total_sq = norm ** 2
        dist.all_reduce(total_sq, group=pp_group)
        norm = total_sq.sqrt()
    if max_norm > 0:
        params = [p for part in parts for p in part.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return float(norm)


def check_replicas_identical(parts: Sequence[nn.Module], pp_group: dist.ProcessGroup | None) -> float:
    """Largest difference, over the pipeline group, between head replicas (and a tied
    embedding) and the copy on the first stage; 0.0 when they are identical. For tests."""
    worst = 0.0
    for name in ("norm.weight", "output.weight"):
        local = [_local(dict(p.named_parameters(remove_duplicate=False))[name].detach()) for p in parts]
        ref = local[0].clone()
        if pp_group is not None:
            dist.broadcast(ref, group_src=0, group=pp_group)
        worst = max(worst, max(float((t - ref).abs().max()) for t in local))
    return worst
