"""A model sharded with tensor parallelism (TP=2, gloo) decodes with the unchanged decoder and gives
the single-process tokens: every strategy (auto deciding alike on every rank), a grid of (E, γ),
sampling, adaptive and dynamic options, tied and untied heads. One torchrun launch; the reference
is the unsharded model in each rank."""
from parallel_scripts.launch import torchrun


def test_tp2_decoding_equals_single_process():
    results = torchrun(2, "decode_tp.py", [])
    assert len(results) == 14, results
    for r in results:
        assert r["identical"] and r["same_acceptance"], r
        assert r["sharded_rows"] * 2 == r["full_rows"], r  # the weights really are split
    assert sum(r["rejections"] for r in results) > 0  # the grid exercises cache cropping under TP
