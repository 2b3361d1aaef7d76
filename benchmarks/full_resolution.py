"""CTAL at full resolution: time and peak memory against the number of affinity pixels N, for the CTAL diffusion
alone (factorised, and dense where it fits) and for a whole CTAL-SS training step, with the fitted exponent
(time ~ N^p).

    python benchmarks/full_resolution.py --out benchmarks/results/full_resolution.md

Affinity maps from 36 x 48 to 128 x 256 (CTAL at 1/4 of 144 x 192 ... 512 x 1024; NYUv2 at 480 x 640 is 120 x 160).
Every case runs in its own process; peak = the process's peak resident memory above its baseline (VmHWM reset
through /proc/self/clear_refs once the model and inputs exist), so it covers activations, gradients and workspace.
A dense case that cannot fit is not run: the estimate `cross_task_diffusion` refuses it with is reported instead.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import make_batch, reset_peak_rss, status_kib, write_table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MAPS = [(36, 48), (72, 96), (120, 160), (128, 256)]


def run_case(case: dict) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(case["threads"])
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    height, width = case["map"]
    batch, num_tasks, channels = case["batch"], case["tasks"], case["channels"]
    dtype = torch.bfloat16 if case["dtype"] == "bf16" else None
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None)  # noqa: E731
    if case["kind"] == "diffusion":
        from ctal_hf.ctal_attention import cross_task_diffusion

        n = height * width
        features = torch.randn(batch, num_tasks, channels, height, width, requires_grad=True)
        values = torch.randn(batch, num_tasks, channels, height, width, requires_grad=True)
        weight = (torch.randn(n, num_tasks, 3, 3) / (9 * num_tasks)).requires_grad_()
        bias = torch.zeros(n, requires_grad=True)
        grad = torch.randn(batch, num_tasks, channels, height, width)

        def step():
            with autocast():
                out = cross_task_diffusion(values, F.normalize(features, dim=2), weight, bias, impl=case["impl"])
            out.backward(grad.to(out.dtype))
            for tensor in (features, values, weight, bias):
                tensor.grad = None

    else:

        from ctal_hf import CTALConfig, CTALForDenseMultitask

        config = CTALConfig.from_preset(
            "nyuv2", image_size=[4 * height, 4 * width], attention_impl=case["impl"], decoder="ctal_ss"
        )
        model = CTALForDenseMultitask(config).train()
        if case["channels_last"]:
            model.to(memory_format=torch.channels_last)
        pixel_values, labels = make_batch(config, batch)

        def step():
            with autocast():
                loss = model(pixel_values, labels=labels).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

    baseline = status_kib("VmRSS")
    reset_peak_rss()
    times = []
    for _ in range(case["repeats"] + 1):  # the first is the warm-up
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {**case, "seconds": statistics.median(times[1:]), "peak_gb": (status_kib("VmHWM") - baseline) / 1e6}


def fitted_exponent(rows: list[dict]) -> str:
    """Least-squares slope of log(time) against log(N)."""
    points = [(math.log(r["n"]), math.log(r["seconds"])) for r in rows if "seconds" in r]
    if len(points) < 2:
        return "-"
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return f"{slope:.2f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maps", nargs="+", default=[f"{h}x{w}" for h, w in MAPS], help="affinity maps, HxW")
    parser.add_argument("--step_maps", nargs="+", default=None, help="maps for the whole step (default: --maps)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument(
        "--step_variants", nargs="+", default=["fp32", "bf16+cl"], choices=["fp32", "bf16+cl"], help="whole steps"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sections", nargs="+", default=["diffusion", "step"], choices=["diffusion", "step"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "full_resolution.md")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    import torch

    from ctal_hf.ctal_attention import available_memory_bytes, dense_peak_bytes

    command = "python benchmarks/full_resolution.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    maps = [tuple(int(side) for side in m.split("x")) for m in args.maps]
    step_maps = [tuple(int(side) for side in m.split("x")) for m in (args.step_maps or args.maps)]

    def run(case: dict) -> dict:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, env=env
        )
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:160]
            return {**case, "failed": reason if proc.returncode > 0 else f"killed (signal {-proc.returncode})"}
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        print(result, flush=True)
        return result

    sections = []
    common = dict(batch=args.batch, tasks=3, channels=args.channels, threads=args.threads, repeats=args.repeats)
    if "diffusion" in args.sections:
        lines = [
            f"## CTAL diffusion alone, forward + backward (B = {args.batch}, T = 3, C = Cv = {args.channels}, k = 3)",
            "",
            "| map | N | impl | dtype | time (s) | peak (GB) |",
            "|---|---:|---|---|---:|---:|",
        ]
        fits = {}
        for dtype in args.dtypes:
            for impl in ("factorized", "dense"):
                rows = []
                for height, width in maps:
                    n = height * width
                    case = dict(kind="diffusion", map=[height, width], n=n, impl=impl, dtype=dtype, **common)
                    size = torch.bfloat16 if dtype == "bf16" else torch.float32
                    needed = dense_peak_bytes(n, 3, args.batch, size, backward=True)
                    available = available_memory_bytes("cpu") or 0
                    if impl == "dense" and needed > 0.8 * available:
                        lines.append(
                            f"| {height}x{width} | {n} | dense | {dtype} | refused: needs ~{needed / 1e9:.0f} GB "
                            f"of N x N maps, {available / 1e9:.0f} GB available | - |"
                        )
                        continue
                    result = run(case)
                    rows.append(result)
                    if "failed" in result:
                        lines.append(f"| {height}x{width} | {n} | {impl} | {dtype} | failed: {result['failed']} | - |")
                    else:
                        lines.append(
                            f"| {height}x{width} | {n} | {impl} | {dtype} | {result['seconds']:.3f} "
                            f"| {result['peak_gb']:.2f} |"
                        )
                fits[impl, dtype] = fitted_exponent(rows)
        lines += ["", "Fitted exponent p (time ~ N^p): " + ", ".join(f"{i} {d}: {p}" for (i, d), p in fits.items())]
        sections.append("\n".join(lines))
    if "step" in args.sections:
        lines = [
            f"## Whole CTAL-SS training step (NYUv2 tasks, HRNet-W18-small-v2, batch {args.batch}, factorised CTAL)",
            "",
            "| image | affinity map | N | variant | time (s) | peak (GB) |",
            "|---|---|---:|---|---:|---:|",
        ]
        fits = {}
        variants = [("fp32", False) if v == "fp32" else ("bf16", True) for v in args.step_variants]
        for dtype, channels_last in variants:
            rows = []
            label = dtype + ("+cl" if channels_last else "")
            for height, width in step_maps:
                n = height * width
                case = dict(kind="step", map=[height, width], n=n, impl="factorized", dtype=dtype, **common)
                result = run({**case, "channels_last": channels_last, "repeats": 1})
                rows.append(result)
                image = f"{4 * height}x{4 * width}"
                if "failed" in result:
                    lines.append(f"| {image} | {height}x{width} | {n} | {label} | failed: {result['failed']} | - |")
                else:
                    lines.append(
                        f"| {image} | {height}x{width} | {n} | {label} | {result['seconds']:.2f} "
                        f"| {result['peak_gb']:.2f} |"
                    )
            fits[label] = fitted_exponent(rows)
        lines += ["", "Fitted exponent p (time ~ N^p): " + ", ".join(f"{v}: {p}" for v, p in fits.items())]
        sections.append("\n".join(lines))

    load_after = os.getloadavg()
    with contextlib.suppress(OSError):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    header = [
        "# CTAL at full resolution",
        "",
        f"Made by `{command.strip()}` on {started:%Y-%m-%d %H:%M} UTC.",
        "",
        f"Machine: {cpu}, AVX-512 BF16: {'yes' if 'avx512_bf16' in flags else 'no'}, AMX: "
        f"{'yes' if ' amx' in flags else 'no'}; {args.threads} torch threads, torch {torch.__version__}; "
        f"{(available_memory_bytes('cpu') or 0) / 1e9:.0f} GB available at the end. Load average before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)} (shared "
        f"CPU: times are noisy). Median of {args.repeats} runs after a warm-up (whole steps: one run).",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_table(args.out, ["\n".join(header), "", "\n\n".join(sections)])
    print(args.out.read_text())


if __name__ == "__main__":
    main()
