"""Forward + backward time and peak memory of one training step of whole models (random init, CPU).

Each (model, attention implementation) case runs in its own process, so peak memory (VmHWM above the process's
baseline after building the model) is its own. Writes a markdown table.

    python benchmarks/train_step.py --preset nyuv2 --decoders ctal_ss mtl --batch 2 --threads 2 \
        --out benchmarks/results/train_step.md
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import peak_rss_bytes, reset_peak_rss, write_table


def run_case(preset: str, decoder: str, attention_impl: str, batch: int, threads: int, repeats: int) -> dict:
    import torch

    from ctal_hf import CTALConfig, CTALForDenseMultitask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = CTALConfig.from_preset(preset, decoder=decoder, attention_impl=attention_impl)
    model = CTALForDenseMultitask(config).train()
    height, width = config.image_size
    pixel_values = torch.randn(batch, 3, height, width)
    labels = {name: task.random_label(batch, height, width) for name, task in config.get_tasks().items()}
    step = lambda: model(pixel_values, labels=labels).loss.backward()  # noqa: E731
    step()  # warm-up (allocator, oneDNN primitives)
    model.zero_grad(set_to_none=True)
    reset_peak_rss()
    baseline = peak_rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return {
        "preset": preset,
        "decoder": decoder,
        "attention_impl": attention_impl,
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": statistics.median(times),
        "peak_gb": (peak_rss_bytes() - baseline) / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nyuv2")
    parser.add_argument("--decoders", nargs="+", default=["ctal_ss", "mtl"])
    parser.add_argument("--attention_impls", nargs="+", default=["dense", "auto"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/train_step.md")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(**json.loads(args.case))))
        return
    import torch

    rows = []
    for decoder in args.decoders:
        impls = args.attention_impls if decoder.startswith("ctal") or decoder == "papnet" else ["auto"]
        for impl in impls:
            case = dict(
                preset=args.preset,
                decoder=decoder,
                attention_impl=impl,
                batch=args.batch,
                threads=args.threads,
                repeats=args.repeats,
            )
            result = subprocess.run(
                [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, check=True
            )
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    reference = next((r["seconds"] for r in rows if r["decoder"] == "mtl"), None)
    lines = [
        f"# Training step (forward + backward), preset `{args.preset}`, batch {args.batch}",
        "",
        f"Command: `python benchmarks/train_step.py --preset {args.preset} --decoders {' '.join(args.decoders)} "
        f"--attention_impls {' '.join(args.attention_impls)} --batch {args.batch} --threads {args.threads} "
        f"--repeats {args.repeats}`",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} threads, CPU, float32, random init; median of {args.repeats} steps after a warm-up; peak = "
        "process peak RSS above its baseline during the timed steps.",
        "",
        "| decoder | attention_impl | params (M) | fwd+bwd (s) | vs MTL | peak memory (GB) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['seconds'] / reference:.2f}x" if reference else "-"
        lines.append(
            f"| {r['decoder']} | {r['attention_impl']} | {r['params'] / 1e6:.2f} | {r['seconds']:.2f} | {ratio} "
            f"| {r['peak_gb']:.2f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_table(args.out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
