"""Throughput of `ctal-predict-bulk` on the CPU: images per second for 1 and 2 processes (`torchrun`, gloo) sharing
the machine's cores, at batch 1 and 8, for NYUv2 CTAL-SS (HRNet-W18-small-v2, 288x384, random weights) on
NYUv2-sized photos (480x640, random pixels: the speed does not depend on them), writing the `.npy` maps.

    python benchmarks/bulk_prediction.py                  # writes benchmarks/results/bulk_prediction.md
    python benchmarks/bulk_prediction.py --tiny           # a tiny model in seconds (the smoke test's setting)

Each setting is a real run of the command, `torchrun --nproc_per_node P -m ctal_hf.bulk ... --batch_size B`, with
`OMP_NUM_THREADS = cores / P`, so every setting uses the same cores. Throughput is the prediction loop's (written
images over the slowest process's loop time, from `--summary_file`: model loading excluded); the wall time of the
whole command is listed beside it. Settings run interleaved, `--repeats` rounds in a rotating order, so load from
other jobs hits all of them alike; the table gives medians and ratios to 1 process at batch 1 from the same rounds."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import cpu_description

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "benchmarks" / "results" / "bulk_prediction.md"




def load_average() -> str:
    try:
        return " / ".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def build_model(folder: Path, tiny: bool) -> str:
    import torch

    from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor

    torch.manual_seed(0)
    if tiny:
        config = CTALConfig(tasks=["semseg", "depth", "normals"], image_size=[64, 64], num_semseg_classes=5)
        name = "tiny CTAL-SS (64x64)"
    else:
        config = CTALConfig.from_preset("nyuv2", decoder="ctal_ss")
        name = f"NYUv2 CTAL-SS ({config.image_size[0]}x{config.image_size[1]})"
    model = CTALForDenseMultitask(config).eval()
    model.save_pretrained(folder)
    CTALImageProcessor.from_model_config(config).save_pretrained(folder)
    return name


def make_photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    import numpy as np
    import PIL.Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / f"photo{index:04d}.jpg", quality=90)


def run_setting(model: Path, photos: Path, work: Path, processes: int, threads: int, batch: int, wait: str) -> dict:
    name = f"{processes}-{threads}-{batch}"
    out, summary_file = work / f"out-{name}", work / f"summary-{name}.json"
    shutil.rmtree(out, ignore_errors=True)
    summary_file.unlink(missing_ok=True)
    threads = str(threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "ACCELERATE_USE_CPU": "1"}
    if wait != "default":
        env["OMP_WAIT_POLICY"] = wait
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += [
        "--master_port",
        str(29500 + processes * 100 + int(threads) * 10 + batch),
        "-m",
        "ctal_hf.bulk",
        "--model",
        str(model),
    ]
    command += [str(photos), "--output_dir", str(out), "--batch_size", str(batch), "--no_progress"]
    command += ["--summary_file", str(summary_file)]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    summary = json.loads(summary_file.read_text())
    if summary["written"] != len(list(photos.iterdir())) or summary["processes"] != processes:
        raise RuntimeError(f"unexpected summary {summary}")
    return {"images_per_second": summary["images_per_second"], "wall": wall}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="A tiny model and few small photos (a smoke test).")
    parser.add_argument("--num_images", type=int, default=None, help="Photos per run (default 16; tiny: 8).")
    parser.add_argument("--repeats", type=int, default=1, help="Rounds over the settings (default 1).")
    parser.add_argument("--cores", type=int, default=2, help="Cores the processes share (threads = cores / P).")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--no_single_thread",
        action="store_true",
        help="Leave out 1 process with 1 thread (a control: same "
        "threads per process as the multi-process settings, half the cores).",
    )
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--omp_wait_policy",
        default="PASSIVE",
        choices=["PASSIVE", "ACTIVE", "default"],
        help="OMP_WAIT_POLICY of the runs (default PASSIVE: on a loaded machine, OpenMP threads that spin while "
        "their partner is descheduled made 2 threads ~25x slower than 1).",
    )
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    count = args.num_images or (8 if args.tiny else 16)
    repeats = args.repeats
    size = (48, 64) if args.tiny else (480, 640)
    # (processes, threads per process, batch); the first is the baseline of the ratios.
    settings = [(p, max(1, args.cores // p), b) for p in args.processes for b in args.batch_sizes]
    if not args.no_single_thread and args.cores > 1 and 1 in args.processes:
        settings[len(args.batch_sizes) : len(args.batch_sizes)] = [(1, 1, b) for b in args.batch_sizes]
    work = Path(tempfile.mkdtemp(prefix="bulk-bench-"))
    try:
        model_name = build_model(work / "model", args.tiny)
        make_photos(work / "photos", count, size)
        cpu, load_before = cpu_description(), load_average()
        print(f"CPU: {cpu}; {os.cpu_count()} logical CPUs visible, load average {load_before}", flush=True)
        results: dict[tuple[int, int, int], list[dict]] = {setting: [] for setting in settings}
        for round_index in range(repeats):
            order = settings[round_index % len(settings) :] + settings[: round_index % len(settings)]
            for processes, threads, batch in order:
                measured = run_setting(
                    work / "model", work / "photos", work, processes, threads, batch, args.omp_wait_policy
                )
                results[(processes, threads, batch)].append(measured)
                print(
                    f"round {round_index + 1}: {processes} process(es) x {threads} thread(s), batch {batch}: "
                    f"{measured['images_per_second']:.2f} images/s, {measured['wall']:.1f} s wall",
                    flush=True,
                )
        load_after = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = settings[0]
    lines = [
        "# Bulk prediction throughput (`ctal-predict-bulk`)",
        "",
        f"`python benchmarks/bulk_prediction.py{' --tiny' if args.tiny else ''}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. {model_name}, random weights; "
        f"{count} photos of {size[1]}x{size[0]} per run, `.npy` maps of every task written; {repeats} round(s), "
        f"medians. Processes share {args.cores} cores (`OMP_NUM_THREADS` = {args.cores} / processes; the "
        "1 process x 1 thread rows are a control that uses half the cores).",
        "",
        f"CPU: {cpu}; torch threads as above, float32, `OMP_WAIT_POLICY={args.omp_wait_policy}`.",
        "",
        f"**The machine is shared and loaded** (load average {load_before} before, {load_after} after, over "
        f"{os.cpu_count()} logical CPUs): other jobs took CPU time during every run, so absolute figures are low "
        "and noisy; compare the ratios, measured in the same rounds.",
        "",
        "| processes x threads | batch | images/s (loop) | ratio to the first row | wall time of the command (s) |",
        "|---|---|---|---|---|",
    ]
    base_rounds = [r["images_per_second"] for r in results[base]]
    for processes, threads, batch in settings:
        rounds = results[(processes, threads, batch)]
        speed = statistics.median(r["images_per_second"] for r in rounds)
        ratio = statistics.median(r["images_per_second"] / b for r, b in zip(rounds, base_rounds, strict=True))
        wall = statistics.median(r["wall"] for r in rounds)
        lines.append(f"| {processes} x {threads} | {batch} | {speed:.2f} | {ratio:.2f} | {wall:.1f} |")
    lines += [
        "",
        "Images/s counts the prediction loop of each process (reading, preprocessing, forward pass, resizing the "
        f"maps back to {size[1]}x{size[0]}, writing `.npy`), over the slowest process; the wall time adds interpreter "
        "start, "
        "process-group setup and model loading.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
