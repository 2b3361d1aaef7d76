"""Whole-step ratios on a busy machine: every variant in ONE process, stepping in turn (round robin), so that load
from other jobs hits all variants alike; the table is rewritten after every round, so a cut-short run still leaves
one. The companion of benchmarks/profile_step.py (which runs each variant in its own process and breaks the time
down per component).

    python benchmarks/interleaved_step.py --baseline_ref b7ad3a7 --rounds 5 --out benchmarks/results/interleaved_step.md

`today` is the whole package as it was at `--baseline_ref` (`git archive`, imported under another name without its
`__init__`, so nothing is registered twice), NCHW float32 eager: today's path, every module of it, not only the
diffusion. Its model is built with the same seed (its parameter names may differ, so weights are not copied; the
timings do not depend on the values). float32 means float32 arithmetic (matmul precision "highest").

On a loaded machine, `--clock cpu --threads 1` times each step by this process's CPU time (`time.process_time`), which
time slices taken by other jobs do not inflate (cache and memory-bandwidth sharing still do, a little); the targets
are wall-clock figures with 2 threads on a quiet machine (`--clock wall`, the default).
"""

import argparse
import datetime
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from _common import machine_line, make_batch, write_table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {"today": (None, False), "fp32": (None, False), "fp32+cl": (None, True), "bf16": ("bf16", False)}
VARIANTS["bf16+cl"] = ("bf16", True)


def load_baseline_package(ref: str, folder: Path, name: str = "ctal_hf_today"):
    """`ctal_hf` as it was at `ref`, importable as `name` (its modules use relative imports); the package's
    `__init__` (Auto class and pipeline registration) is skipped. Returns the package's `modeling_ctal` module."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "ctal_hf"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    package = types.ModuleType(name)
    package.__path__ = [str(folder / "ctal_hf")]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.modeling_ctal")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nyuv2")
    parser.add_argument("--image_size", type=int, nargs=2, default=None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--train_batch", type=int, default=2)
    parser.add_argument("--infer_batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: time.perf_counter (the targets' measure, meaningful on a quiet machine); cpu: this process's CPU "
        "time (time.process_time), which time slices taken by other jobs do not inflate: with --threads 1, the "
        "robust measure of a variant's cost on a loaded machine",
    )
    parser.add_argument("--baseline_ref", default="HEAD")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "interleaved_step.md")
    args = parser.parse_args(argv)

    import torch

    from ctal_hf import CTALConfig, CTALForDenseMultitask

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    command = "python benchmarks/interleaved_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    overrides = {"image_size": args.image_size} if args.image_size else {}
    config = CTALConfig.from_preset(args.preset, decoder="ctal_ss", **overrides)
    current_model = CTALForDenseMultitask(config)
    tmp = tempfile.TemporaryDirectory()
    today_models = {}
    if "today" in args.variants:
        today = load_baseline_package(args.baseline_ref, Path(tmp.name))
        torch.manual_seed(0)
        today_config = today.CTALConfig.from_preset(args.preset, decoder="ctal_ss", **overrides)
        today_models["today"] = today.CTALForDenseMultitask(today_config)
    times = {(mode, variant): [] for mode in args.modes for variant in args.variants}
    batches = {
        mode: make_batch(config, args.train_batch if mode == "train" else args.infer_batch) for mode in args.modes
    }

    def step(mode: str, variant: str) -> float:
        dtype, channels_last = VARIANTS[variant]
        model = today_models.get(variant, current_model)
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model.train(mode == "train")
        pixel_values, labels = batches[mode]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None)
        start = clock()
        if mode == "train":
            with autocast:
                loss = model(pixel_values, labels=labels).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast:
                model(pixel_values)
        return clock() - start

    for mode in args.modes:
        for variant in args.variants:
            step(mode, variant)  # warm-up (oneDNN primitives for this layout and dtype)
    for round_index in range(args.rounds):
        for mode in args.modes:
            for variant in args.variants:
                times[mode, variant].append(step(mode, variant))
                print(f"round {round_index} {mode} {variant}: {times[mode, variant][-1]:.2f} s", flush=True)
        write(args, command, started, load_before, times, machine_line(args.threads), round_index + 1)
    tmp.cleanup()


def write(args, command, started, load_before, times, machine, rounds_done) -> None:
    load_now = os.getloadavg()
    lines = [
        f"# Whole CTAL-SS step, variants interleaved in one process: preset `{args.preset}`",
        "",
        f"Made by `{command.strip()}` on {started:%Y-%m-%d %H:%M} UTC; {rounds_done} of {args.rounds} rounds done.",
        "",
        f"Machine: {machine}. Load average before {'/'.join(f'{x:.1f}' for x in load_before)}, at the last round "
        f"{'/'.join(f'{x:.1f}' for x in load_now)}: the CPU is shared with other jobs (a load above "
        f"{args.threads} means contended timings); the variants step in turn, one step each per round, so the "
        "ratios (of medians) are the meaningful figures.",
        "",
        f"`today` = the package at `{args.baseline_ref}`, NCHW float32 eager; `fp32` = this code, NCHW float32 "
        "eager; `cl` = channels-last; `bf16` = autocast. "
        + (
            "Times are this process's CPU seconds (`--clock cpu`), not wall-clock."
            if args.clock == "cpu"
            else "Times are wall-clock seconds."
        ),
        "",
        "| mode | batch | variant | median step (s) | vs today | all steps (s) |",
        "|---|---:|---|---:|---:|---|",
    ]
    for mode in args.modes:
        reference = statistics.median(times[mode, args.variants[0]])
        batch = args.train_batch if mode == "train" else args.infer_batch
        for variant in args.variants:
            median = statistics.median(times[mode, variant])
            all_steps = ", ".join(f"{t:.2f}" for t in times[mode, variant])
            label = "training step" if mode == "train" else "inference"
            lines.append(f"| {label} | {batch} | {variant} | {median:.2f} | {median / reference:.2f}x | {all_steps} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_table(args.out, lines)


if __name__ == "__main__":
    main()
