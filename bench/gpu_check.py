"""Everything that needs a GPU, in one command and about ten minutes (`make gpu-check`):

  a   the tests that take the `device` fixture (tests/device_plugin.py) on the accelerator:
      model forward/backward, early-exit loss, layer dropout, decoding exactness, a bf16 train
      step, a one-process NCCL group with FSDP2;
  b   bench.mfu on llama_1b in bf16 with torch.compile: MFU, tokens/s, LayerSkip vs plain;
  c1  the standard-library corpus; c2 a 12-layer decoding model trained on it for a few minutes;
  c3  bench.decoding_speedup on that model, eager; c4 the same with --compile reduce-overhead;
  m   the compiled multi-process layouts (TP2, FSDP2, TP2 x FSDP2 with checkpointing) on this one device:
      the real Trainer as rank 0 of a fake process group, compiled vs eager (bench/compiled_layout.py);
  c5  identical greedy tokens: each decoding run checks self-speculative against autoregressive
      decoding and transformers' assistant_early_exit against both, so eager, reduce-overhead and
      transformers agree when c3 and c4 report identical tokens at a configuration both compared;
  p   pretrain.plan's predicted peak memory of a one-GPU llama_1b step against the real step's
      (bench/plan_validation.py --part device).

    python -m bench.gpu_check [--budget-s 570] [--out bench/results/gpu_check.md] [--work-dir DIR]
    python -m bench.gpu_check --dry-run        # the same parts on the CPU at toy sizes (make test runs it)

Each part runs as a subprocess under its own time limit, plus what earlier parts left unused, within
the overall budget;
a part that fails or runs out of time is reported and the next part runs. A part whose input is
missing (no checkpoint after c2) is skipped. Results of the benchmarks go to the work directory
(LAYERSKIP_BENCH_RESULTS), never over bench/results; the summary table (device, status and time
of each part, the commands) goes to --out, by default bench/results/gpu_check.md, or for a dry run
the work directory. The work directory (runs/gpu_check-<time> by default) must not exist yet.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import RESULTS, machine
from pretrain.device import device_name, is_accelerator, select_device
from pretrain.files import write_atomic

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
# dense bf16 FLOP/s of one device, by product name (MFU is left out for others unless --peak-flops)
# (the first name contained in the device's name counts)
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


@dataclass
class Part:
    key: str
    title: str
    budget_s: float
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    needs: Path | None = None                  # skipped when this path does not exist
    status: str = "not run"
    seconds: float = 0.0
    result: str = ""

    def command(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + "python " + " ".join(shlex.quote(a) for a in self.argv)


def plan(device: torch.device, work: Path, dry_run: bool, peak_flops: float) -> list[Part]:
    """The parts in order, at GPU sizes or (dry_run) toy sizes on the CPU."""
    dev, data, run = device.type, work / "data", work / "decode_model"
    toy_compile = {"TORCH_COMPILE_DISABLE": "1"} if dry_run else {}   # the compile path, not inductor's C++
    if dry_run:
        # a forward against a reference, a bf16 train step, the one-process group (by name: files move)
        tests = ["tests/test_model.py", "tests/test_device_process_group.py",
                 *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("tests/test_trainer*.py")),
                 "-k", "exit_logits_match_reference or bf16_autocast or one_process_group"]
        mfu = ["model=tiny", "model.vocab_size=512", "train.seq_len=32", "train.global_batch_size=4",
               "train.micro_batch_size=2", "--repeats", "2"]
        corpus = ["--max-files", "40", "--vocab-size", "512", "--seq-len", "32"]
        model = ["model.vocab_size=512", "model.n_layers=4", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
                 "model.ffn_dim=128", "train.seq_len=32", "train.steps=8", "train.global_batch_size=8",
                 "train.micro_batch_size=8", "eval.batches=1", "eval.batch_size=4", "checkpoint.every=4"]
        decode = ["--prompts", "2", "--prompt-len", "8", "--new-tokens", "8", "--exits", "1,2", "--gammas", "1,2",
                  "--repeats", "1"]
        budgets = dict(a=120, b=90, c1=90, c2=120, c3=120, c4=120)
    else:
        tests = ["tests", "--ignore=tests/slurm"]            # the Slurm-cluster tests take no device
        mfu = ["model=llama_1b", "train.seq_len=2048", "train.global_batch_size=8", "train.micro_batch_size=2",
               "--repeats", "5"]
        corpus = ["--max-bytes", "4000000", "--vocab-size", "4096", "--seq-len", "128", "--val-fraction", "0.03"]
        model = ["model.n_layers=12", "train.steps=1500", "train.global_batch_size=32", "train.micro_batch_size=32",
                 "optim.warmup_steps=60", "checkpoint.every=250"]
        # E=2 γ=4 is one of the configurations bench.decoding_speedup always compares with transformers
        decode = ["--prompts", "4", "--new-tokens", "48", "--exits", "2,4,6", "--gammas", "2,4", "--repeats", "2"]
        budgets = dict(a=70, b=120, c1=30, c2=110, c3=65, c4=85)
    results = {k: str(work / "results" / k) for k in ("b", "c3", "c4")}
    decode_cmd = ["-m", "bench.decoding_speedup", "--checkpoint", str(run), "--device", dev, "--dtype", "float32",
                  *decode]
    return [
        Part("a", "tests on the device (-m device)", budgets["a"],
             ["-m", "pytest", "-m", "device", *tests, "-p", "no:cacheprovider"],
             {"LAYERSKIP_TEST_DEVICE": dev}),
        Part("b", "bench.mfu, bf16, compile", budgets["b"],
             ["-m", "bench.mfu", *mfu, "train.dtype=bfloat16", "train.compile=true", f"train.device={dev}",
              f"train.peak_flops={peak_flops:g}"], {"LAYERSKIP_BENCH_RESULTS": results["b"], **toy_compile}),
        Part("c1", "stdlib corpus", budgets["c1"], ["-m", "pretrain.data.prepare", "--out", str(data), *corpus]),
        Part("c2", "train the decoding model", budgets["c2"],
             ["-m", "pretrain.train", "preset=demo", "name=gpu_check", f"run_dir={run}", f"data.dir={data}", *model,
              "train.dtype=bfloat16", f"train.device={dev}", "checkpoint.resume=none", "logging.progress_bar=false",
              "logging.every=50", "logging.wandb.mode=disabled", "eval.decode_prompts=0"], needs=data),
        Part("c3", "decoding benchmark, eager", budgets["c3"], decode_cmd,
             {"LAYERSKIP_BENCH_RESULTS": results["c3"]}, needs=run / "checkpoints"),
        Part("c4", "decoding benchmark, --compile reduce-overhead", budgets["c4"],
             [*decode_cmd, "--compile", "reduce-overhead"], {"LAYERSKIP_BENCH_RESULTS": results["c4"], **toy_compile},
             needs=run / "checkpoints"),
        compiled_layout_part(work, dev, dry_run),
        plan_check_part(work, dry_run),
    ]


def compiled_layout_part(work: Path, dev: str, dry_run: bool) -> Part:
    """m: the compiled multi-process layouts on this one device (bench/compiled_layout.py: the real
    Trainer as rank 0 of a fake process group; compiled vs eager losses, recompiles, compile time,
    step time). The dry run traces with aot_eager (no inductor C++ compile on the CPU)."""
    size = ["--dry-run", "--backend", "aot_eager", "--steps", "3", "--layouts", "tp2"] if dry_run else \
        ["--steps", "8", "--layouts", "fsdp2,tp2_fsdp2_ac"]
    return Part("m", "compiled TP / FSDP2 layouts on one device (fake process group)", 120 if dry_run else 90,
                ["-m", "bench.compiled_layout", "--device", dev, *size],
                {"LAYERSKIP_BENCH_RESULTS": str(work / "results" / "m")})


def describe_compiled_layout(work: Path) -> str:
    """m's line: per layout, the compiled-vs-eager loss difference, recompiles and speed-up."""
    result = _json(work / "results" / "m" / "compiled_layout.json")
    if result is None:
        return ""
    return "; ".join(f"{name}: loss rel {r['loss_rel']:.1e}, {r['compile_graphs']} graphs ({r['compile_recompiles']} "
                     f"recompiles, {r['compile_s']:.0f} s), {r['speedup']:.2f}x eager"
                     for name, r in result["layouts"].items())


def plan_check_part(work: Path, dry_run: bool) -> Part:
    """p: pretrain.plan's predicted peak memory of a one-GPU step against the real step's, by the same
    tracker and by the allocator (bench/plan_validation.py --part device)."""
    return Part("p", "pretrain.plan: predicted vs real peak memory", 120 if dry_run else 150,
                ["-m", "bench.plan_validation", "--part", "device", "--out", str(work / "results" / "p"),
                 *(["--dry-run"] if dry_run else [])])


def describe_plan_check(work: Path) -> str:
    res = _json(work / "results" / "p" / "plan_check.json")
    if res is None:
        return ""
    alloc = ("" if res["allocator_peak"] is None else f", allocator peak {res['allocator_peak'] / 2**30:.2f} GiB "
             f"({res['error_vs_allocator']:+.1%})")
    return (f"predicted {res['predicted'] / 2**30:.3f} GiB, tracked {res['tracked'] / 2**30:.3f} GiB "
            f"({res['error_vs_tracked']:+.1%}){alloc}")


def part_timeout(budget_s: float, remaining_s: float, reserved_s: float) -> float:
    """A part's time limit: its own budget plus what earlier parts left unused (the remaining time less
    the budgets kept for the later parts), never more than the remaining time."""
    return min(remaining_s, max(budget_s, remaining_s - reserved_s))


def run_part(part: Part, timeout: float, log: Path, dry_run: bool) -> None:
    """Run one part's command; fill in its status and seconds (the log keeps its output)."""
    if part.needs is not None and not part.needs.exists():
        part.status = f"skipped: {part.needs.name} missing"
        return
    if timeout < 1:
        part.status = "skipped: overall budget spent"
        return
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_MODE="disabled", WANDB_SILENT="true", **part.env)
    if dry_run:
        env["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    with log.open("w") as out:
        # its own process group, so that a part out of time leaves no worker behind (data loaders,
        # compile workers) holding the device for the next part
        proc = subprocess.Popen([PY, *part.argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
            part.status = "passed" if code == 0 else f"FAILED (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            part.status = f"TIMEOUT after {timeout:.0f} s"
    part.seconds = time.perf_counter() - started
    if not part.status == "passed":
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        part.result = f"`{log.name}`: " + (tail[0][:160].replace("|", "/") if tail else "(no output)")


def run_all(parts: list[Part], budget_s: float, work: Path, dry_run: bool) -> float:
    """Run the parts in order, each whatever happened to the others; logs in work/logs. Returns seconds."""
    started = time.perf_counter()
    for i, part in enumerate(parts):
        timeout = part_timeout(part.budget_s, budget_s - (time.perf_counter() - started),
                               sum(p.budget_s for p in parts[i + 1:]))
        log = work / "logs" / f"{part.key}.log"
        run_part(part, timeout, log, dry_run)
        if part.status == "passed":
            part.result = describe(part, work, log)
        print(f"[gpu-check] {part.key} {part.title}: {part.status} ({part.seconds:.0f} s) {part.result}", flush=True)
    return time.perf_counter() - started


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def describe(part: Part, work: Path, log: Path) -> str:
    """One line of what a part measured, from the files it wrote."""
    if part.key == "p":
        return describe_plan_check(work)
    if part.key == "a":
        lines = [l for l in log.read_text(errors="replace").splitlines() if " passed" in l or " failed" in l]
        return lines[-1].strip("= ") if lines else ""
    if part.key == "b" and (mfu := _json(work / "results" / "b" / "mfu.json")):
        cases = mfu["cases"]
        util = {k: f"{v['mfu']:.1%}" if v.get("mfu") is not None else "n/a" for k, v in cases.items()}
        return (f"tokens/s layerskip {cases['layerskip']['tokens_per_s']:,.0f} (MFU {util['layerskip']}), plain "
                f"{cases['plain']['tokens_per_s']:,.0f} (MFU {util['plain']}); layerskip/plain "
                f"{mfu['speed_ratio']:.2f}x")
    if part.key == "c1" and (manifest := _json(work / "data" / "manifest.json")):
        try:
            counts = {k: sum(sh["samples"] for sh in v["shards"]) for k, v in manifest["splits"].items()}
        except (KeyError, TypeError):   # another manifest layout: the part still passed
            return ""
        return (", ".join(f"{k} {n:,}" for k, n in counts.items()) + f" samples of {manifest.get('seq_len')} tokens, "
                f"vocabulary {manifest.get('vocab_size')}")
    if part.key == "c2":
        steps = sorted((work / "decode_model" / "checkpoints").glob("step_*"))
        ev = _json(work / "decode_model" / "eval.json") or {}
        exits = ev.get("exits", {})
        final = exits.get(max(exits, key=int)) if exits else None
        best = ev.get("best", {}).get("exit_layer")
        return (f"checkpoint {steps[-1].name if steps else 'none'}"
                + (f"; final exit loss {final['loss']:.3f}" if final else "")
                + (f"; best exit {best}, agreement {exits[str(best)]['agreement']:.2f}" if str(best) in exits else ""))
    if part.key == "m":
        return describe_compiled_layout(work)
    if part.key in ("c3", "c4") and (dec := _json(work / "results" / part.key / "decoding_speedup.json")):
        best = max(dec["rows"], key=lambda r: r["speedup"])
        hf = ", ".join(f"E={r['exit_layer']} γ={r['draft_len']} {'identical' if r['identical_tokens'] else 'DIFFERENT'}"
                       f" ({r['ratio']:.2f}x its tokens/s)" for r in dec["hf"])
        return (f"best E={best['exit_layer']} γ={best['draft_len']}: {best['tokens_per_s']:,.0f} tokens/s, "
                f"{best['speedup']:.2f}x autoregressive (α {best['acceptance']:.2f}); vs transformers: {hf}")
    return ""


def identical_tokens(work: Path) -> tuple[str, str]:
    """c5: each decoding run asserts its self-speculative outputs equal its autoregressive ones and
    records whether transformers' assistant_early_exit gives the same tokens; transformers is not
    compiled, so a configuration both runs compared (c3 and c4 share E=2 γ=4 at GPU sizes) ties
    eager and reduce-overhead to each other. Returns (status, line)."""
    runs = {k: _json(work / "results" / k / "decoding_speedup.json") for k in ("c3", "c4")}
    if any(r is None for r in runs.values()):
        return "skipped: c3 or c4 has no result", ""
    same = {k: {(h["exit_layer"], h["draft_len"]): h["identical_tokens"] for h in r["hf"]} for k, r in runs.items()}
    shared = sorted(c for c in same["c3"].keys() & same["c4"].keys() if same["c3"][c] and same["c4"][c])
    different = [f"{k} E={e} γ={g}" for k in same for (e, g), ok in same[k].items() if not ok]
    line = ("eager = reduce-overhead = transformers at " + ", ".join(f"E={e} γ={g}" for e, g in shared)
            if shared else "no configuration compared by both runs")
    line += ("; transformers differs: " + ", ".join(different)) if different else ""
    return ("passed" if shared and not different else "FAILED"), line


def summary(parts: list[Part], device: torch.device, work: Path, dry_run: bool, total_s: float,
            budget_s: float, c5: tuple[str, str]) -> str:
    passed = sum(p.status == "passed" for p in parts) + (c5[0] == "passed")
    kind = ("CPU dry run at toy sizes (make gpu-check DRY_RUN=1): shows that every part runs and what the table "
            "looks like; no number here is a GPU result" if dry_run else f"{device_name(device)}")
    rows = [f"| {p.key} | {p.title} | {p.status} | {p.seconds:.0f} | {p.budget_s:.0f} | {p.result} |" for p in parts]
    rows.append(f"| c5 | identical greedy tokens (c3, c4, transformers) | {c5[0]} | | | {c5[1]} |")
    text = "\n".join([
        "# GPU check (make gpu-check)", "",
        f"- device: {kind}",
        f"- machine: {machine()}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- overall: {passed}/{len(parts) + 1} passed in {total_s:.0f} s (budget {budget_s:.0f} s); "
        f"work directory `{work}` (logs, checkpoints, each benchmark's .md/.json)", "",
        "| part | what | status | time s | budget s | result |", "|---|---|---|---|---|---|", *rows, "",
        "## Commands (run from the repository root with PYTHONPATH=.)", "",
        *[f"- {p.key}: `{p.command()}`" for p in parts], ""])
    return text.replace(f"{ROOT}/", "")  # paths in the repository, relative to its root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="on the CPU at toy sizes")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--budget-s", type=float, default=570.0, help="overall time limit (default 9.5 minutes)")
    ap.add_argument("--work-dir", type=Path, help="default runs/gpu_check-<UTC time>; must not exist")
    ap.add_argument("--out", type=Path, help="summary file (default bench/results/gpu_check.md; dry run: work dir)")
    ap.add_argument("--peak-flops", type=float, help="bf16 FLOP/s of the device for MFU (default: by its name)")
    args = ap.parse_args(argv)
    device = select_device("cpu" if args.dry_run else args.device)
    if not args.dry_run and not is_accelerator(device):
        ap.error(f"--device {args.device}: no accelerator here; `make gpu-check DRY_RUN=1` runs the parts on the CPU")
    work = (args.work_dir or ROOT / "runs" / time.strftime("gpu_check-%Y%m%d-%H%M%S", time.gmtime())).resolve()
    if work.exists():
        ap.error(f"--work-dir {work} exists: give a new directory (nothing is overwritten)")
    out = args.out or (work / "gpu_check.md" if args.dry_run else RESULTS / "gpu_check.md")
    peak = args.peak_flops if args.peak_flops is not None else next(
        (v for k, v in PEAK_BF16.items() if k in device_name(device)), 0.0)
    (work / "logs").mkdir(parents=True)
    parts = plan(device, work, args.dry_run, peak)
    total_s = run_all(parts, args.budget_s, work, args.dry_run)
    c5 = identical_tokens(work)
    text = summary(parts, device, work, args.dry_run, total_s, args.budget_s, c5)
    write_atomic(out, text)
    if out.resolve() != work / "gpu_check.md":
        (work / "gpu_check.md").write_text(text)
    print(text)
    return 0 if all(p.status == "passed" for p in parts) and c5[0] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
