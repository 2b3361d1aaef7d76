# Measures the CTAL cross-task diffusion (ctal_hf.ctal_attention) per implementation: forward (inference) and
# forward + backward (training) time and peak memory at the paper's three scales, and writes a markdown table.
#
#   python benchmarks/ctal_attention.py                  # the table, benchmarks/results/ctal_attention.md
#   python benchmarks/ctal_attention.py --sections attention sweep   # adds the crossover sweep behind `auto`
#
# Every (case, implementation, mode) runs in its own fresh process (this script with --worker), threads pinned, and
# reports the median of several runs after one warm-up. Peak memory is the process's peak resident set above its
# baseline: VmHWM is reset through /proc/self/clear_refs once the inputs exist, then read after the runs.
# Sections are functions registered in SECTIONS, so further ones (e.g. a whole training step) can be added.

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import machine_line, reset_peak_rss, status_kib, write_table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "ctal_attention.md"

# name: (height, width, channels, num_tasks, batch, kernel_size), the CTAL map of each paper setting
CASES = {
    "nyuv2": (72, 96, 128, 3, 2, 3),  # HRNet at 1/4 of 288 x 384
    "cityscapes": (32, 64, 128, 2, 2, 3),  # HRNet at 1/4 of 128 x 256
    "pascal_swin": (16, 16, 128, 5, 2, 3),  # SwinV2 at 1/32 of 512 x 512
}
IMPLS = ("dense", "factorized", "auto")
MODES = ("forward", "train")
# (height, width, num_tasks) for --sweep; C = 128, batch 2, k = 3
SWEEP = [
    (16, 32, 2),
    (32, 32, 2),
    (32, 48, 2),
    (32, 64, 2),
    (48, 64, 2),
    (32, 32, 3),
    (32, 48, 3),
    (32, 64, 3),
    (48, 64, 3),
    (48, 80, 3),
    (24, 32, 5),
    (32, 48, 5),
    (48, 64, 5),
]


# ----------------------------------------------------------------------------------------------- worker (one case)
def worker(args) -> dict:
    import gc

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO))
    from ctal_hf.ctal_attention import choose_attention_impl, cross_task_diffusion

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    height, width, channels, num_tasks, batch, kernel = args.shape
    n = height * width
    features = torch.randn(batch, num_tasks, channels, height, width)
    values = torch.randn(batch, num_tasks, channels, height, width)
    weight = torch.randn(n, num_tasks, kernel, kernel) / (num_tasks * kernel * kernel * n)
    bias = torch.zeros(n)
    grad_out = torch.randn(batch, num_tasks, channels, height, width)
    train = args.mode == "train"
    for tensor in (features, values, weight, bias):
        tensor.requires_grad_(train)
    resolved = args.impl
    if args.impl == "auto":
        resolved = choose_attention_impl(n, channels, num_tasks, kernel, channels, backward=train)

    def step():
        with torch.set_grad_enabled(train):
            out = cross_task_diffusion(values, F.normalize(features, dim=2), weight, bias, impl=args.impl)
            if train:
                out.backward(grad_out)
                for tensor in (features, values, weight, bias):
                    tensor.grad = None
        return out

    gc.collect()
    baseline = status_kib("VmRSS")
    exact_peak = reset_peak_rss()
    step()  # warm-up
    times = []
    while len(times) < args.repeats or (sum(times) < args.min_seconds and len(times) < 200):
        start = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - start)
        del out
    peak = status_kib("VmHWM")
    return {
        "impl": args.impl,
        "resolved": resolved,
        "mode": args.mode,
        "shape": list(args.shape),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "peak_mib": (peak - baseline) / 1024,
        "peak_exact": exact_peak,
    }


def run_case(shape, impl: str, mode: str, repeats: int, threads: int, min_seconds: float = 1.0) -> dict:
    """One measurement in a fresh Python process, so that peaks and allocator state never leak between cases."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--impl", impl, "--mode", mode]
    cmd += ["--shape", *map(str, shape), "--repeats", str(repeats), "--threads", str(threads)]
    cmd += ["--min-seconds", str(min_seconds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed for {shape} {impl} {mode}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- sections
def attention_section(args) -> str:
    sys.path.insert(0, str(REPO))
    from ctal_hf.ctal_attention import attention_flops

    lines = [
        "## CTAL diffusion alone",
        "",
        f"float32, C = Cv = 128, k = 3. Time: median (min) in ms over {args.rounds} fresh processes x at least "
        f"{args.repeats} runs (and {args.min_seconds:g} s) after one warm-up each, processes interleaved across "
        "implementations. Peak: the process's peak RSS "
        "above its baseline (inputs allocated), MiB, max over the processes. Speed-ups from the medians. "
        "GFLOP: `attention_flops` (2 per multiply-add, as torch.utils.flop_counter counts). "
        "Ratios are dense / this row (higher is better); an `auto` row that resolves to dense runs the dense code, "
        "so its ratio only shows the timing noise.",
        "",
        "| case | map (N) | T | B | impl | fwd ms | fwd peak MiB | fwd+bwd ms | fwd+bwd peak MiB "
        "| fwd+bwd GFLOP | fwd+bwd speed-up | fwd speed-up | fwd+bwd memory saving |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in args.cases:
        height, width, channels, num_tasks, batch, kernel = CASES[case]
        n = height * width
        runs = {}
        for _ in range(args.rounds):  # rounds interleave the implementations, so a busy spell hits all of them
            for mode in MODES:
                for impl in IMPLS:
                    res = run_case(CASES[case], impl, mode, args.repeats, args.threads, args.min_seconds)
                    runs.setdefault((impl, mode), []).append(res)
                    print(
                        f"{case} {impl}->{res['resolved']} {mode}: runs "
                        f"{', '.join(f'{1000 * t:.0f}' for t in res['times_s'])} ms, peak {res['peak_mib']:.0f} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
        results = {}
        for key, processes in runs.items():
            times = [t for res in processes for t in res["times_s"]]
            results[key] = {
                "resolved": processes[0]["resolved"],
                "median_s": statistics.median(times),
                "min_s": min(times),
                "peak_mib": max(res["peak_mib"] for res in processes),
            }
        dense_fwd, dense_train = results["dense", "forward"], results["dense", "train"]
        for impl in IMPLS:
            fwd, train = results[impl, "forward"], results[impl, "train"]
            label = impl
            if impl == "auto":
                label = f"auto (fwd: {fwd['resolved']}, train: {train['resolved']})"
            flops = attention_flops(train["resolved"], n, channels, num_tasks, kernel, batch_size=batch, backward=True)
            lines.append(
                f"| {case} | {height}x{width} ({n}) | {num_tasks} | {batch} | {label} "
                f"| {1000 * fwd['median_s']:.0f} ({1000 * fwd['min_s']:.0f}) | {fwd['peak_mib']:.0f} "
                f"| {1000 * train['median_s']:.0f} ({1000 * train['min_s']:.0f}) | {train['peak_mib']:.0f} "
                f"| {flops / 1e9:.1f} | {dense_train['median_s'] / train['median_s']:.2f}x "
                f"| {dense_fwd['median_s'] / fwd['median_s']:.2f}x "
                f"| {dense_train['peak_mib'] / max(train['peak_mib'], 1e-3):.1f}x |"
            )
    return "\n".join(lines)


def sweep_section(args) -> str:
    """Dense vs factorized across map sizes: the data behind `DENSE_FLOP_PENALTY` and hence `auto`'s crossover."""
    sys.path.insert(0, str(REPO))
    from ctal_hf.ctal_attention import DENSE_FLOP_PENALTY, attention_flops, choose_attention_impl

    lines = [
        "## Crossover sweep (behind `auto`)",
        "",
        f"C = 128, B = 2, k = 3, min of at least {args.sweep_repeats} runs ({args.min_seconds:g} s). "
        "penalty = (dense time / factorized time) / "
        "(dense FLOPs / factorized FLOPs): what one dense FLOP costs in factorized FLOPs. "
        f"`DENSE_FLOP_PENALTY` = {DENSE_FLOP_PENALTY}.",
        "",
        "| map (N) | T | fwd dense ms | fwd fact. ms | fwd penalty | auto fwd | train dense ms | train fact. ms "
        "| train penalty | auto train |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for height, width, num_tasks in SWEEP:
        n = height * width
        shape = (height, width, 128, num_tasks, 2, 3)
        row = [f"{height}x{width} ({n})", str(num_tasks)]
        for mode in MODES:
            backward = mode == "train"
            dense = run_case(shape, "dense", mode, args.sweep_repeats, args.threads, args.min_seconds)["min_s"]
            fact = run_case(shape, "factorized", mode, args.sweep_repeats, args.threads, args.min_seconds)["min_s"]
            flop_ratio = attention_flops("dense", n, 128, num_tasks, 3, backward=backward) / attention_flops(
                "factorized", n, 128, num_tasks, 3, backward=backward
            )
            penalty = dense / fact / flop_ratio
            choice = choose_attention_impl(n, 128, num_tasks, 3, backward=backward)
            row += [f"{1000 * dense:.0f}", f"{1000 * fact:.0f}", f"{penalty:.2f}", choice]
            print(f"sweep {shape} {mode}: dense {dense:.3f}s fact {fact:.3f}s penalty {penalty:.2f}", file=sys.stderr)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


SECTIONS = {"attention": attention_section, "sweep": sweep_section}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per process (after one warm-up)")
    parser.add_argument(
        "--min-seconds", type=float, default=1.0, help="short cases repeat until their runs add up to this"
    )
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per (case, implementation, mode)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--sections", nargs="+", default=["attention"], choices=list(SECTIONS), help="what to measure, in order"
    )
    parser.add_argument("--sweep-repeats", type=int, default=3, help="timed runs per sweep point (min reported)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    # worker mode (internal): one measurement, JSON on stdout
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="train", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--shape", type=int, nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    command = "python benchmarks/ctal_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    bodies = [SECTIONS[name](args) for name in args.sections]
    load_after = os.getloadavg()
    header = [
        "# CTAL attention benchmark",
        "",
        f"Made by `{command.strip()}` on {started:%Y-%m-%d %H:%M %Z}.",
        "",
        f"Machine: {machine_line(args.threads)}. Load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)} "
        "(the CPU is shared; a load above the thread count means contended timings).",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_table(args.output, ["\n".join(header), "", "\n\n".join(bodies)])
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
