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


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard a LayerSkipTransformer (or a pipeline stage of one) in place over `tp_mesh`."""
    has_embedding = "tok_embeddings" in model._modules
    tied = has_embedding and model.output.weight is model.tok_embeddings.weight
    if tied:  # shard the two modules separately, then tie the (identically sharded) weights again
        model.output.weight = nn.Parameter(model.tok_embeddings.weight.detach().clone())
    plan = head_plan()
    if has_embedding:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    parallelize_module(model, tp_mesh, plan)
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan())
    if tied:
        model.output.weight = model.tok_embeddings.weight
