"""Size a run before submitting it:

    python -m pretrain.plan <the training run's Hydra overrides> plan.world_size=N plan.device=h100-80gb
        [plan.mfu=0.4] [plan.memory_margin=0.1] [plan.search=true] [plan.top=10] [plan.json=FILE]
        [plan.exit_cost=false] [plan.layers=K]

Runs one training step of the real Trainer for the layout (parallel.*) on N fake devices in this CPU
process and prints, per simulated rank (rank 0; under pipelining one rank per pipeline stage, or the
first, middle and last stage above 4), what the step holds at its peak, whether it fits the device,
and the predicted step time and tokens/s. plan.search=true tries the layouts of N devices and ranks
them. Bad input exits with code 2 and one line naming the key.
"""
from __future__ import annotations

import json
import sys

from pretrain.config import ConfigError, check_layout
from pretrain.files import write_atomic
from pretrain.plan.config import parse_plan_config, planned_run_config, split_plan_overrides
from pretrain.plan.devices import device_by_name
from pretrain.plan.estimate import predict_throughput
from pretrain.plan.report import build_report, format_report
from pretrain.plan.search import search
from pretrain.plan.simulate import simulate_layout


def plan_report(cfg, world_size: int, device, margin: float, mfu: float, exit_cost: bool = True,
                layers: int = 0) -> dict:
    dims, step, exits, ranks = simulate_layout(cfg, world_size, exit_cost=exit_cost, layers=layers)
    return build_report(cfg, dims, device, margin, step, exits, ranks,
                        predict_throughput(cfg, dims, exits, device, mfu), mfu)


def search_report(cfg, plan, device) -> list[dict]:
    """Every mesh's best tried layout, fits first, then by predicted tokens/s."""
    reports = []
    for cand, (dims, step, exits, ranks) in search(cfg, plan.world_size, device, plan.memory_margin, plan.mfu,
                                                   layers=plan.layers):
        reports.append(build_report(cand, dims, device, plan.memory_margin, step, exits, ranks,
                                    predict_throughput(cand, dims, exits, device, plan.mfu), plan.mfu))
    return sorted(reports, key=lambda r: (not r["fits"], -r["throughput"]["tokens_per_s"]))


def format_ranking(reports: list[dict], top: int) -> str:
    lines = ["| # | dp_rep | dp_shard | tp | pp | micro-batch | act. ckpt | loss chunk | peak GiB | fits | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(reports[:top], 1):
        lay = r["layout"]
        lines.append(f"| {i} | {lay['dp_replicate']} | {lay['dp_shard']} | {lay['tp']} | {lay['pp']} | "
                     f"{lay['micro_batch_size']} | {lay['activation_checkpointing']} | {lay['loss_chunk_tokens']} | "
                     f"{r['peak'] / 2**30:.2f} | {'yes' if r['fits'] else 'NO'} | "
                     f"{r['throughput']['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        plan_args, run_args = split_plan_overrides(argv)
        plan = parse_plan_config(plan_args)
        cfg = planned_run_config(run_args)
        device = device_by_name(plan.device)
        if not plan.search:
            dims = check_layout(cfg, plan.world_size)   # names the key before anything runs
            if plan.layers and (plan.layers % dims.num_stages or plan.layers >= cfg.model.n_layers):
                raise ConfigError(f"plan.layers={plan.layers}: must be below model.n_layers={cfg.model.n_layers} "
                                  f"and a multiple of the {dims.num_stages} pipeline stages")
    except ConfigError as err:
        hint = "; set parallel.* for plan.world_size devices, or plan.search=true" if "world size" in str(err) else ""
        print(f"config error: {err}{hint}", file=sys.stderr)
        return 2
    if plan.search:
        reports = search_report(cfg, plan, device)
        if not reports:
            print(f"config error: plan.world_size={plan.world_size}: no layout of this model and batch "
                  "fits that many devices", file=sys.stderr)
            return 2
        print(f"{len(reports)} layouts of {plan.world_size} x {device.name} (the best tried setting of each mesh; "
              "fits first, then predicted tokens/s):\n" + format_ranking(reports, plan.top))
        print("\nbest:\n" + format_report(reports[0]))
        result: dict | list = reports
    else:
        result = plan_report(cfg, plan.world_size, device, plan.memory_margin, plan.mfu, plan.exit_cost, plan.layers)
        if 0 < plan.layers < cfg.model.n_layers:
            result["extrapolated_from_layers"] = [plan.layers, 2 * plan.layers]
        print(format_report(result))
    if plan.json:
        write_atomic(plan.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
