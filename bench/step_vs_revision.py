"""One-process training step of this tree vs an earlier revision, interleaved in ONE process (so
machine load hits both alike): the same model, batch and LayerSkip settings (p_max 0.2, rotational
exits), median step time of each and the ratio. For checking that a change leaves throughput alone.

    python -m bench.step_vs_revision --rev ff0236a [--layers 8 --dim 256 --seq 256 --batch 8 --repeats 15]

The earlier revision is read with `git archive` into a temporary directory; its step is
`pretrain.trainer.step.train_step` (before the unified Trainer) or `Trainer.train_step`.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "parallel", "schedules", "bench")


def load_step(tree: Path, args, batch):
    """Import the project from `tree` and return a function step(s) -> loss of its trainer."""
    for name in [m for m in sys.modules if m.split(".")[0] in PACKAGES]:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        from pretrain.config import RunConfig
        from pretrain.layerskip.plan import step_plan
        from pretrain.model import LayerSkipTransformer, ModelConfig

        d = args.dim
        cfg = RunConfig(model=ModelConfig(vocab_size=args.vocab, dim=d, n_layers=args.layers, n_heads=d // 64,
                                          n_kv_heads=max(1, d // 128), ffn_dim=int(d * 8 / 3) // 64 * 64,
                                          max_seq_len=args.seq))
        cfg.train.global_batch_size = cfg.train.micro_batch_size = args.batch
        cfg.train.seq_len, cfg.train.device, cfg.train.steps = args.seq, "cpu", 1000
        cfg.layerskip.layer_dropout.p_max, cfg.layerskip.layer_dropout.time_scale = 0.2, "constant"
        torch.manual_seed(0)
        model = LayerSkipTransformer(cfg.model)
        try:
            from parallel.dims import ParallelDims
            from pretrain.trainer.trainer import Trainer

            trainer = Trainer(cfg, ParallelDims(), model)
            return lambda s: trainer.train_step(step_plan(cfg, s), batch).loss
        except ImportError:
            from pretrain.trainer.build import build_optimizer
            from pretrain.trainer.step import train_step

            opt = build_optimizer(cfg, model, torch.device("cpu"))
            return lambda s: train_step(model, opt, step_plan(cfg, s), batch, micro_batch_size=args.batch,
                                        step_tokens=batch["targets"].numel(), grad_clip=1.0).loss
    finally:
        sys.path.remove(str(tree))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True)
    for name, default in (("layers", 8), ("dim", 256), ("vocab", 8192), ("seq", 256), ("batch", 8), ("repeats", 15)):
        ap.add_argument(f"--{name}", type=int, default=default)
    args = ap.parse_args()
    from bench.common import extract_revision, interleaved_medians, random_batch, record

    batch = random_batch(args.vocab, args.batch, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        extract_revision(args.rev, list(PACKAGES), tmp)
        steps = {f"revision {args.rev}": load_step(Path(tmp), args, batch), "this tree": load_step(ROOT, args, batch)}
        counters = {name: iter(range(10**6)) for name in steps}
        losses = {name: [] for name in steps}
        cases = {name: (lambda name=name: losses[name].append(steps[name](next(counters[name])))) for name in steps}
        times = interleaved_medians(cases, args.repeats)
    old, new = times[f"revision {args.rev}"], times["this tree"]
    same = max(abs(a - b) / abs(a) for a, b in zip(*losses.values()))
    table = "\n".join([
        f"Model: {args.layers} layers, dim {args.dim}, vocab {args.vocab}; batch {args.batch} x seq {args.seq}; "
        f"p_max 0.2 (D = exp), rotational exits; median of {args.repeats} interleaved steps in one process.", "",
        "| trainer | step s |", "|---|---|", f"| revision {args.rev} | {old:.4f} |", f"| this tree | {new:.4f} |", "",
        f"this tree / revision step time: **{new / old:.3f}**; largest relative loss difference over the "
        f"steps: {same:.1e}"])
    record("step_vs_revision", "Training step: this tree vs an earlier revision",
           {"args": vars(args), "seconds": times, "ratio": new / old, "loss_rel_diff": same}, table)


if __name__ == "__main__":
    main()
