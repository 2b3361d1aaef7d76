"""Benchmark: how fast SyntheticScenes renders on one CPU core (the issue asks for >= 50 images/s at 96x128),
and how long building the default dataset takes. Writes a Markdown table.

    python benchmarks/synthetic_speed.py --output benchmarks/results/synthetic_speed.md
"""

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # one core: set before numpy is imported

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _common import cpu_description, write_table  # noqa: E402

from dataset_scripts.synthetic import SyntheticScenes, render_scene  # noqa: E402


def images_per_second(config: str, size: tuple[int, int], count: int, repeats: int) -> list[float]:
    render_scene(0, config=config, height=size[0], width=size[1])  # warm the pixel-grid cache
    rates = []
    for repeat in range(repeats):
        start = time.perf_counter()
        for index in range(count):
            render_scene(repeat * count + index, config=config, height=size[0], width=size[1])
        rates.append(count / (time.perf_counter() - start))
    return rates


def build_seconds(config: str) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as cache:
        builder = SyntheticScenes(config_name=config, cache_dir=cache)
        start = time.perf_counter()
        builder.download_and_prepare()
        rows = sum(split.num_examples for split in builder.info.splits.values())
        return time.perf_counter() - start, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100, help="images per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown table here")
    args = parser.parse_args()

    lines = [
        "# SyntheticScenes rendering speed (one CPU core)",
        "",
        f"Machine: {cpu_description()}, numpy {np.__version__}, Python {platform.python_version()}; "
        f"load average at start {os.getloadavg()[0]:.1f} (other jobs share the cores, so these are lower bounds).",
        f"Each rate: {args.count} scenes rendered with `render_scene` in one process, thread pools limited to 1; "
        f"median / best of {args.repeats} runs.",
        "",
        "| config | size | images/s (median) | images/s (best) | ms / image (median) |",
        "|---|---|---|---|---|",
    ]
    for config in ("nyuv2", "pascal"):
        for size in ((96, 128), (288, 384)):
            count = args.count if size == (96, 128) else max(10, args.count // 8)
            rates = images_per_second(config, size, count, args.repeats)
            median = statistics.median(rates)
            lines.append(f"| {config} | {size[0]}x{size[1]} | {median:.1f} | {max(rates):.1f} | {1000 / median:.1f} |")
            print(lines[-1], flush=True)
    lines += ["", "| config | default build (`download_and_prepare`) | rows | seconds |", "|---|---|---|---|"]
    for config in ("nyuv2", "pascal"):
        seconds, rows = build_seconds(config)
        lines.append(f"| {config} | 96x128, 400 train + 100 validation | {rows} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_table(args.output, [text])
    print(text)


if __name__ == "__main__":
    main()
