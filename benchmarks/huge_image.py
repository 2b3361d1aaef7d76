"""Time and memory of `pipeline("dense-multitask")` on one huge image (8000 x 8000 by default): the model works at its
`image_size`, so what grows with the image is loading, the resize to the model and the maps resized back.

Memory is the peak resident set size during the call (sampled every 5 ms) minus the resident set size just before
it, the model already built and warmed up on a small image: what the image costs above the model. The returned maps
are part of it (NYUv2 tasks at 8000 x 8000: semseg int64 0.5 GB, depth float32 0.25 GB, normals float32 0.75 GB;
visualisations add 0.25 GB per task as PIL images). Each setting runs in a fresh process.

    python benchmarks/huge_image.py                       # NYUv2 CTAL-SS (random init), 8000 x 8000
    python benchmarks/huge_image.py --side 2000 --tiny    # smoke setting
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from _common import cpu_description, write_table

REPO_ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, threading, time
import numpy as np, PIL.Image, torch
from transformers import pipeline
from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor

side, tiny, visualize, threads = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])
torch.set_num_threads(threads)
page = os.sysconf("SC_PAGE_SIZE")

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page

if tiny:
    config = CTALConfig(tasks=["semseg", "depth", "normals"], image_size=[64, 64], num_semseg_classes=13)
else:
    config = CTALConfig.from_preset("nyuv2")
model = CTALForDenseMultitask(config).eval()
predictor = pipeline(
    "dense-multitask", model=model, image_processor=CTALImageProcessor.from_model_config(config), device="cpu"
)
image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))
predictor(np.zeros((50, 60, 3), np.uint8), visualize=visualize)  # warm-up
peak, done = [0], threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)

baseline = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
result = predictor(image, visualize=visualize)
seconds = time.perf_counter() - start
done.set()
thread.join()
maps = sum(value.nbytes for key, value in result.items() if key != "visualizations")
print(json.dumps({"seconds": seconds, "peak_gb": (max(peak[0], rss()) - baseline) / 1e9, "maps_gb": maps / 1e9,
                  "baseline_gb": baseline / 1e9, "shape": list(result["semseg"].shape)}))
"""


def run(side: int, tiny: bool, visualize: bool, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    arguments = [str(side), str(int(tiny)), str(int(visualize)), str(threads)]
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *arguments], capture_output=True, text=True, env=env, cwd=REPO_ROOT
    )
    if result.returncode != 0:
        raise RuntimeError(f"the measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=8000, help="the image is side x side pixels")
    parser.add_argument("--tiny", action="store_true", help="a 64 x 64 model instead of NYUv2 CTAL-SS")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(REPO_ROOT / "benchmarks" / "results" / "huge_image.md"))
    args = parser.parse_args(argv)
    if args.side < 1 or args.threads < 1:
        parser.error("--side and --threads must be at least 1")
    model = "tiny 64 x 64 CTAL-SS" if args.tiny else "NYUv2 CTAL-SS 288 x 384 (random init)"
    lines = [
        "# One huge image through the pipeline",
        "",
        f"Machine: {cpu_description()}; {args.threads} torch threads; Python {platform.python_version()}. Model: "
        f"{model}; tasks semseg, depth, normals. Memory: peak RSS during the call minus RSS before it (the model "
        "built and warmed up), so it counts what the image costs above the model, returned maps included.",
        "",
        "| image | visualize | time (s) | peak above the model (GB) | returned maps (GB) |",
        "|---|---|---|---|---|",
    ]
    for visualize in (False, True):
        figures = run(args.side, args.tiny, visualize, args.threads)
        row = (
            f"| {args.side} x {args.side} | {visualize} | {figures['seconds']:.1f} | {figures['peak_gb']:.2f} | "
            f"{figures['maps_gb']:.2f} |"
        )
        print(row, flush=True)
        lines.append(row)
    lines.append("")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_table(output, lines)
    print(f"Wrote {output}")


if __name__ == "__main__":
    main()
