"""Megatron-style tensor parallelism with DTensor, plus sequence parallelism on the norms.

Per block: q/k/v and the SwiGLU gate/up projections are column-parallel (heads / hidden units
split over tp ranks; the model infers head counts from the shard widths), the attention output
and down projections row-parallel, reduce-scattering onto the sequence dimension. Between
blocks the activation is a plain local tensor holding seq_len / tp positions; the RMSNorms run
sequence-parallel (their weights become replicated DTensors, so the optimizer sees only DTensors
and a foreach/fused AdamW works). Row-subset layer dropout selects rows on the batch dimension,
which is not sharded, so it is unaffected.

The embedding is vocabulary-parallel (row-parallel over nn.Embedding); the exit head's output
projection is column-parallel over the vocabulary and returns logits sharded on the vocabulary
dimension for `loss_parallel` cross-entropy. The head is a module pair (norm, output) with its
own plan, so every exit's hidden state goes through the same sharded norm + output wherever it
is applied. Tied embeddings: both weights are Shard(0) over the vocabulary, so the tie is kept.

Decoding (`apply_tensor_parallel_for_decoding`) uses the same column/row split without sequence
parallelism: a decode step has one position per row, which cannot be sharded over the sequence.
Activations between blocks are replicated plain tensors, the head returns whole-vocabulary logits
on every rank (identical after the all-reduce), so samplers keyed by the same seed draw the same
tokens on every rank, and the decoder runs unchanged.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)


def block_plan() -> dict:
    # Attention.forward(x, cos, sin, cache, layer): only x is a sharded activation.
    return {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                        desired_input_layouts=(Replicate(), None, None, None, None),
                                        use_local_output=True),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                           use_local_output=True),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def head_plan() -> dict:
    """The shared exit head: sequence-parallel norm, vocabulary-parallel output (for loss_parallel)."""
    return {
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }


def decoding_block_plan() -> dict:
    """Column-parallel q/k/v, gate, up; row-parallel output and down projections returning
    replicated activations (no sequence parallelism)."""
    return {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(), "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel()}


def _parallelize(model: nn.Module, tp_mesh: DeviceMesh, root_plan: dict, embedding_plan, block_plan: dict) -> None:
    has_embedding = "tok_embeddings" in model._modules
    tied = has_embedding and model.output.weight is model.tok_embeddings.weight
    if tied:  # shard the two modules separately, then tie the (identically sharded) weights again
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone())
    if has_embedding:
        root_plan = {**root_plan, "tok_embeddings": embedding_plan}
    parallelize_module(model, tp_mesh, root_plan)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)
    if tied:
        model.output.weight = model.tok_embeddings.weight


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard a LayerSkipTransformer (or a pipeline stage of one) in place over `tp_mesh` for
    training: sequence parallel between blocks, vocabulary-sharded logits for loss_parallel."""
    _parallelize(model, tp_mesh, head_plan(),
                 RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)), block_plan())


def apply_tensor_parallel_for_decoding(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard a whole LayerSkipTransformer in place over `tp_mesh` for pretrain.decoding: the
    weights split as in training, activations and logits replicated on every rank."""
    _parallelize(model, tp_mesh, {"output": ColwiseParallel(output_layouts=Replicate())},
                 RowwiseParallel(input_layouts=Replicate()), decoding_block_plan())
