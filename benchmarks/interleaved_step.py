"""Whole-step ratios on a busy machine: every variant in ONE process, stepping in turn (round robin), so that load
from other jobs hits all variants alike; the table is rewritten after every round, so a cut-short run still leaves
one. The companion of benchmarks/profile_step.py (which runs each variant in its own process and breaks the time
down per component).

    python benchmarks/interleaved_step.py --baseline_ref b7ad3a7 --rounds 5 --out benchmarks/results/interleaved_step.md

`today` is this model with the CTAL diffusion of `--baseline_ref` (`ctal_hf/ctal_attention.py` at that ref, which
imports only torch) and its `torch.stack` of the task maps: the NCHW float32 eager path as it ran then (the rest of
that path is unchanged). float32 means float32 arithmetic (matmul precision "highest").
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

VARIANTS = {"today": (None, False), "fp32": (None, False), "fp32+cl": (None, True), "bf16": ("bf16", False)}
VARIANTS["bf16+cl"] = ("bf16", True)


def load_baseline_diffusion(ref: str, folder: Path):
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{ref}:ctal_hf/ctal_attention.py"], capture_output=True, check=True
    ).stdout
    path = folder / "ctal_attention_today.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("ctal_attention_today", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cross_task_diffusion


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
    parser.add_argument("--baseline_ref", default="HEAD")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "interleaved_step.md")
    args = parser.parse_args(argv)

    import torch
    from profile_step import machine_line, make_batch

    from ctal_hf import CTALConfig, CTALForDenseMultitask, ctal_module

    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    command = "python benchmarks/interleaved_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    overrides = {"image_size": args.image_size} if args.image_size else {}
    config = CTALConfig.from_preset(args.preset, decoder="ctal_ss", **overrides)
    model = CTALForDenseMultitask(config)
    current_diffusion, current_stack = ctal_module.cross_task_diffusion, ctal_module.stack_task_maps
    with tempfile.TemporaryDirectory() as tmp:
        today_diffusion = load_baseline_diffusion(args.baseline_ref, Path(tmp))
    times = {(mode, variant): [] for mode in args.modes for variant in args.variants}
    batches = {
        mode: make_batch(config, args.train_batch if mode == "train" else args.infer_batch) for mode in args.modes
    }

    def step(mode: str, variant: str) -> float:
        dtype, channels_last = VARIANTS[variant]
        today = variant == "today"
        ctal_module.cross_task_diffusion = today_diffusion if today else current_diffusion
        ctal_module.stack_task_maps = (lambda maps: torch.stack(maps, dim=1)) if today else current_stack
        model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        model.train(mode == "train")
        pixel_values, labels = batches[mode]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None)
        start = time.perf_counter()
        if mode == "train":
            with autocast:
                loss = model(pixel_values, labels=labels).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast:
                model(pixel_values)
        return time.perf_counter() - start

    for mode in args.modes:
        for variant in args.variants:
            step(mode, variant)  # warm-up (oneDNN primitives for this layout and dtype)
    for round_index in range(args.rounds):
        for mode in args.modes:
            for variant in args.variants:
                times[mode, variant].append(step(mode, variant))
                print(f"round {round_index} {mode} {variant}: {times[mode, variant][-1]:.2f} s", flush=True)
        write(args, command, started, load_before, times, machine_line(args.threads), round_index + 1)
    ctal_module.cross_task_diffusion, ctal_module.stack_task_maps = current_diffusion, current_stack


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
        "`today` = NCHW float32 eager with the CTAL diffusion of "
        f"`{args.baseline_ref}`; `fp32` = the same path with this code; `cl` = channels-last; `bf16` = autocast.",
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
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
