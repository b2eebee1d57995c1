"""Every parallel layout trains exactly like one process: same seed and global batch, layer
dropout and rotational early-exit loss on (exits on every pipeline stage), losses at every step
within 1e-5 relative and final weights within float32 noise, against a one-process reference
step written without the trainer, computed inside the script. One torchrun launch per world size (gloo, CPU).

Adam turns gradient noise of ~1e-9 on near-zero gradients into updates of up to lr, so weights
are compared with an absolute tolerance well under lr (1e-2) rather than at 1e-7.
"""

from parallel_scripts.launch import torchrun

LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-4


def check(results: list[dict], expected: int) -> None:
    assert len(results) == expected, results
    for r in results:
        assert r["loss_rel"] < LOSS_RTOL, r
        assert r["exit_rel"] < LOSS_RTOL, r
        assert r["param_abs"] < PARAM_ATOL, r
        assert r["replica_gap"] == 0.0, r  # pipeline head replicas (and tied embedding) identical
        assert min(r["blocks_run_fraction"]) < 1.0, r  # layer dropout really skipped rows


def test_two_processes_tp_pp_interleaved_fsdp_hsdp():
    results = torchrun(2, "equality.py", [
        "tp=2",                                                        # TP2 + sequence parallel
        "tp=2,tie=1,ac=1,ckpt_heads=1",                                # + tied vocab-parallel head, recompute
        "pp=2,pp_schedule=1F1B",                                       # PP2, exits on both stages
        "pp=2,pp_schedule=Interleaved1F1B,virtual_stages=2",           # 4 stages over 2 ranks
        "pp=2,pp_schedule=GPipe,tie=1,micro_batch=1,ac=1",             # head replicas tied to the embedding
        "dp_shard=2",                                                  # FSDP2, summed gradients
        "dp_shard=2,fsdp_reduce_every_micro_batch=0",                  # one reduce-scatter a step
        "dp_replicate=2",                                              # HSDP with a replicate dim only
        # one sample per rank and p_max 0.9: ranks skip whole blocks the other rank runs
        "dp_shard=2,global_batch=2,micro_batch=1,p_max=0.9,steps=4",
    ])
    check(results, 9)


def test_four_processes_2d():
    results = torchrun(4, "equality.py", [
        "tp=2,dp_shard=2",                                             # FSDP2 over TP (2-D)
        "tp=2,dp_shard=2,global_batch=2,micro_batch=1,p_max=0.9,steps=4",
        "pp=2,tp=2,pp_schedule=1F1B,export=1",
        "pp=2,dp_shard=2,pp_schedule=Interleaved1F1B,virtual_stages=2,micro_batch=1",
        "dp_replicate=2,dp_shard=2",                                   # HSDP 2-D
        "dp_replicate=2,dp_shard=2,micro_batch=1",                     # HSDP accumulating: all-reduce once
    ], timeout=300)
    check(results, 6)
    exported = [r for r in results if "export_abs" in r]
    assert len(exported) == 1 and exported[0]["export_abs"] == 0.0  # HF export from PP2×TP2


def test_eight_processes_3d():
    results = torchrun(8, "equality.py", [
        "pp=2,dp_shard=2,tp=2,pp_schedule=Interleaved1F1B,virtual_stages=2,micro_batch=1,tie=1",
    ], timeout=300)
    check(results, 1)
