"""A tensor-parallel model decodes with the unchanged decoder: each rank builds the same small
model, decodes a ragged batch with the unsharded copy (the reference), shards the model over all
ranks with `apply_tensor_parallel_for_decoding`, decodes again, and reports whether the tokens are
identical, for every strategy, a grid of (E, γ), sampling and the adaptive options.

    torchrun --nproc-per-node 2 tests/parallel_scripts/decode_tp.py
"""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from common import report
from builders import make_model
from pretrain.decoding import DecodeOptions, generate
from parallel.mesh import init_process_group, teardown_parallel
from parallel.tensor_parallel import apply_tensor_parallel_for_decoding
from schedules.speedup import DecodeCosts

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [12], [40, 41, 42, 43]]

CASES = {
    "autoregressive": dict(strategy="autoregressive"),
    "early_exit E=2": dict(strategy="early_exit", exit_layer=2),
    **{f"self_speculative E={E} g={g}": dict(strategy="self_speculative", exit_layer=E, draft_len=g)
       for E in (1, 2, 4) for g in (1, 3)},
    "sampling E=2 g=3": dict(strategy="self_speculative", exit_layer=2, draft_len=3, temperature=0.9, top_p=0.95,
                             seed=3),
    "adaptive+dynamic": dict(strategy="self_speculative", exit_layer=2, draft_len=3, adaptive_draft=True,
                             dynamic_exit=True),
    "auto, layer-count costs": dict(strategy="auto", exit_layer=2, costs=DecodeCosts.layer_count(9)),
    "auto, measured costs": dict(strategy="auto", exit_layer=2),   # the sharded model's: rank 0's timings
}

TIED_CASES = ("autoregressive", "self_speculative E=2 g=3")


def main() -> None:
    torch.set_grad_enabled(False)
    init_process_group(torch.device("cpu"))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    for tie in (False, True):
        single = make_model(tie_embeddings=tie)  # later blocks weak: exits accept and reject
        sharded = copy.deepcopy(single)
        apply_tensor_parallel_for_decoding(sharded, mesh)
        wq = sharded.layers["0"].attention.wq.weight
        local_rows = wq.to_local().shape[0]
        # a tied model (vocabulary-sharded embedding = head) on two cases; the untied one on all
        for name, kwargs in CASES.items() if not tie else [(n, CASES[n]) for n in TIED_CASES]:
            options = dict(max_new_tokens=16, **kwargs)
            got, stats = generate(sharded, PROMPTS, **options)
            if stats.auto and "costs" not in kwargs:
                # every rank decides with rank 0's costs; the reference then decides with the same
                costs = stats.auto[0]["costs"]
                same = [None] * dist.get_world_size()
                dist.all_gather_object(same, costs)
                assert all(c == costs for c in same), same
                options["costs"] = DecodeCosts(tuple(costs["block_s"]), tuple(costs["head_s"]), costs["step_s"],
                                               costs["batch"], tuple(costs["round_extra_s"]),
                                               costs["round_extra_exit"])
            if options.get("strategy") == "auto":
                options["auto_timing"] = False   # as the sharded model decides: by the costs, untimed
            expected, expected_stats = generate(single, PROMPTS, **options)
            if dist.get_rank() == 0:
                report({"case": f"{name} tie={tie}", "identical": got == expected,
                        "same_acceptance": (stats.accepted, stats.rejections) == (expected_stats.accepted,
                                                                                 expected_stats.rejections),
                        "rejections": stats.rejections, "sharded_rows": local_rows,
                        "full_rows": single.layers["0"].attention.wq.weight.shape[0]})
    teardown_parallel()


if __name__ == "__main__":
    main()
