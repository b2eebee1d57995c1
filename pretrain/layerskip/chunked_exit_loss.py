"""The exit head's linear + cross-entropy over token chunks, without [tokens, vocab] logits.

For the exits l on in a call, with normalised hidden states x_l [N, D] (x_l = norm(h_l)), the
output weight W [V, D], targets y and per-exit scales a_l (= w(t,l) / step_tokens):

    total = sum_l a_l · CE_l,   CE_l = sum_{n: y_n valid} ( lse(z_ln) - z_{ln,y_n} ),   z_l = x_l W^T

One autograd function evaluates every exit, C tokens at a time. Per chunk it forms the logits
(float32), their softmax, and at once the gradient of total with respect to them,

    dz = a_l · valid_n · (softmax(z)_n - onehot(y_n)),   dx_l = dz W,   dW += dz^T x_l,

then drops the chunk. Backward only multiplies the stored dx_l [N, D] and dW [V, D] by the
incoming gradient. Memory: one chunk's logits and their softmax (O(C x V), float32) plus one
float32 dW (the size of the head's own gradient) whatever the number of exits and tokens - the
plain path keeps every exit's [N, V] logits and log-softmax until backward. Time: the same three
matmuls per exit as the plain path; recomputing the logits in backward instead (no dW held
between forward and backward) costs a fourth matmul (bench/results/exit_loss_alternatives.md measures both designs and a
torch.compile'd one). Under autocast the matmuls run in the autocast dtype, as
nn.Linear would; softmax, losses and the dW accumulation are float32.

Tensor parallel (W sharded over the vocabulary, as for `loss_parallel`): rank r holds rows
[v0, v0 + V/tp). Per chunk, the row max (all-reduce MAX) and the sums of exponentials and of the
target logit, which lives on one shard (one all-reduce SUM), give lse; dW is local to the shard
and dx is a partial sum over the shards, handed back as a Partial DTensor gradient so that
DTensor reduce-scatters it onto the sequence-sharded activation, as in the plain path.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

IGNORE_INDEX = -100  # targets that carry no loss (re-exported by early_exit_loss)


def _softmax_and_ce(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                    group: dist.ProcessGroup | None) -> torch.Tensor:
    """Turns a float32 logits chunk, columns = vocabulary ids [vocab_start, vocab_start + V_local),
    into its softmax IN PLACE; returns the CE per row over the whole vocabulary. Rows whose target
    is ignored get a finite CE the caller masks out."""
    local = targets - vocab_start
    here = (local >= 0) & (local < logits.shape[1])
    index = local.clamp(0, logits.shape[1] - 1)[:, None]
    if group is None:
        torch.log_softmax(logits, dim=1, out=logits)  # in place: no second [C, V] buffer
        ce = -logits.gather(1, index)[:, 0]
        logits.exp_()
        return ce
    target_logit = logits.gather(1, index)[:, 0] * here
    row_max = logits.amax(dim=1)
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    logits.sub_(row_max[:, None]).exp_()
    sums = torch.stack([logits.sum(dim=1), target_logit])
    dist.all_reduce(sums, group=group)  # one collective for both sums
    logits.div_(sums[0][:, None])
    return row_max + sums[0].log() - sums[1]


class ChunkedExitsCrossEntropy(torch.autograd.Function):
    """(total = sum_l scales[l] · CE_l, per-exit CE sums [k]) for exits xs = (x_1..x_k), each [N, D];
    see the module docstring. Only `total` is differentiable. Arguments: (weight [V_local, D],
    targets [N], scales, chunk, compute_dtype, vocab_start, TP group or None, grad_enabled, *xs)."""

    @staticmethod
    def forward(ctx, weight, targets, scales: Sequence[float], chunk: int, compute_dtype: torch.dtype,
                vocab_start: int, group: dist.ProcessGroup | None, grad_enabled: bool, *xs):
        # needs_input_grad ignores torch.no_grad(): without grad mode, form no gradients at all.
        want_w = grad_enabled and ctx.needs_input_grad[0]
        want_x = [grad_enabled and need for need in ctx.needs_input_grad[8:]]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_xs = [torch.empty_like(x) if want else None for x, want in zip(xs, want_x)]
        w = weight.to(compute_dtype)
        valid = (targets != IGNORE_INDEX).to(torch.float32)
        rows = torch.arange(min(chunk, targets.shape[0]), device=targets.device)
        ce_sums = torch.zeros(len(xs), dtype=torch.float32, device=weight.device)
        # One float32 logits buffer for every chunk and exit (no allocation per chunk).
        buffer = torch.empty(len(rows), w.shape[0], dtype=torch.float32, device=weight.device)
        with torch.autocast(weight.device.type, enabled=False):  # dtypes are explicit here
            for i, (x, scale) in enumerate(zip(xs, scales)):
                for s in range(0, x.shape[0], chunk):
                    xc, tc, vc = x[s:s + chunk].to(compute_dtype), targets[s:s + chunk], valid[s:s + chunk]
                    probs = buffer[:xc.shape[0]]
                    if compute_dtype == torch.float32:
                        torch.matmul(xc, w.T, out=probs)
                    else:
                        probs.copy_(xc @ w.T)
                    ce = _softmax_and_ce(probs, tc, vocab_start, group)
                    ce_sums[i] += (ce * vc).sum()
                    if grad_w is None and grad_xs[i] is None:
                        continue
                    local = tc - vocab_start
                    here = (local >= 0) & (local < probs.shape[1])
                    r = rows[:probs.shape[0]][here]
                    probs[r, local[here]] -= 1.0
                    dz = probs.mul_((vc * scale)[:, None]).to(compute_dtype)
                    if grad_xs[i] is not None:
                        grad_xs[i][s:s + chunk] = dz @ w
                    if grad_w is not None:
                        grad_w.addmm_(dz.T, xc) if compute_dtype == torch.float32 else grad_w.add_(dz.T @ xc)
        ctx.grad_w, ctx.grad_xs, ctx.weight_dtype = grad_w, grad_xs, weight.dtype
        ctx.mark_non_differentiable(ce_sums)
        total = (ce_sums * torch.tensor(scales, dtype=torch.float32, device=ce_sums.device)).sum()
        return total, ce_sums

    @staticmethod
    def backward(ctx, grad_total, _grad_ce_sums):
        g = grad_total.to(torch.float32)
        # In place: the stored gradients are this function's own buffers, used once.
        grad_w = None if ctx.grad_w is None else ctx.grad_w.mul_(g).to(ctx.weight_dtype)
        grad_xs = [None if gx is None else gx.mul_(g.to(gx.dtype)) for gx in ctx.grad_xs]
        ctx.grad_w = ctx.grad_xs = None
        return (grad_w, None, None, None, None, None, None, None, *grad_xs)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype nn.Linear would compute in here: autocast's when it is on, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _vocab_shard(weight: DTensor) -> tuple[torch.Tensor, int, dist.ProcessGroup | None]:
    """(local rows, first vocabulary id of them, TP group or None at size 1) of a weight sharded
    on dim 0 (torch.chunk semantics: shard r starts at r · ceil(V / tp))."""
    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise NotImplementedError(f"chunked exit loss: output weight placements {weight.placements} on a "
                                  f"{mesh.ndim}-D mesh; expected (Shard(0),), vocabulary-sharded")
    per = -(-weight.shape[0] // mesh.size())
    group = mesh.get_group() if mesh.size() > 1 else None
    return weight.to_local(), min(mesh.get_local_rank() * per, weight.shape[0]), group


def chunked_exits_cross_entropy(norm: nn.Module, output: nn.Linear, hiddens: Sequence[torch.Tensor],
                                targets: torch.Tensor, scales: Sequence[float], chunk_tokens: int
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_l scales[l] · CE_sum(output(norm(hiddens[l])), targets), detached per-exit CE sums [k]),
    float32, chunk_tokens tokens of logits at a time. The norm runs as a module (its tensor
    parallel / FSDP hooks as in the plain path); the output weight is used directly, whole or
    vocabulary-sharded (DTensor Shard(0)). Plain (local) tensors, the same on every TP rank."""
    if output.bias is not None:
        raise NotImplementedError("chunked exit loss: the output projection has a bias")
    weight = output.weight
    if isinstance(weight, DTensor):
        w_local, vocab_start, group = _vocab_shard(weight)
    else:
        w_local, vocab_start, group = weight, 0, None
    xs = []
    for hidden in hiddens:
        x = norm(hidden)
        if isinstance(x, DTensor):  # sequence-sharded: gather the positions, as ColwiseParallel does
            x = x.redistribute(x.device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        xs.append(x.flatten(0, -2))
    cd = _compute_dtype(xs[0])
    return ChunkedExitsCrossEntropy.apply(w_local, targets.flatten(), tuple(scales), chunk_tokens, cd,
                                          vocab_start, group, torch.is_grad_enabled(), *xs)
