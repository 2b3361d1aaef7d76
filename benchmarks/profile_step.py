"""Where the time of one CTAL-SS step goes: per component time, FLOPs and achieved GFLOP/s against the matmul and
conv peaks measured in the same process, for float32 / bf16 autocast, NCHW / channels-last, eager (/ compiled), in
training (forward + backward) and inference; and the whole step against today's path.

    python benchmarks/profile_step.py --preset nyuv2 --baseline_ref b7ad3a7 --rounds 3 \
        --out benchmarks/results/profile_step.md

Every (variant, mode) runs in its own process, rounds interleave the variants (so a busy spell on a shared CPU hits
all of them) and the table reports medians. `today` runs the package as it was at `--baseline_ref` (exported with
`git archive`), NCHW float32 eager, as the model ran by default then. float32 means float32 arithmetic:
`torch.set_float32_matmul_precision("highest")` (no implicit bf16 / TF32). Component times are measured on each
component alone (its captured inputs, forward + backward of the mean of its outputs), so they add up to about the
whole step, not exactly.
"""

import argparse
import contextlib
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_line as common_machine_line
from _common import make_batch, write_table

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (autocast dtype or None, channels-last, compiled)
    "today": (None, False, False),
    "fp32": (None, False, False),
    "fp32+cl": (None, True, False),
    "bf16": ("bfloat16", False, False),
    "bf16+cl": ("bfloat16", True, False),
    "bf16+cl+compile": ("bfloat16", True, True),
}
MODES = {"train": "training step (forward + backward)", "infer": "inference (forward, no grad)"}


# ------------------------------------------------------------------------------------------------ worker (one case)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = _clock()
        fn()
        times.append(_clock() - start)
    return statistics.median(times)


def measure_peaks(dtype, channels_last: bool, quick: bool = False) -> dict:
    """Matmul (2048^3) and 3x3 conv (B=2, 128 -> 128 channels, 144 x 192, the CTAL upsample block's) GFLOP/s now;
    `quick`: 512^3 and 36 x 48 (smoke tests)."""
    import torch
    import torch.nn.functional as F

    size, (height, width) = (512, (36, 48)) if quick else (2048, (144, 192))
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    matmul = 2 * size**3 / _median_time(lambda: a @ b, 5) / 1e9
    x, w = torch.randn(2, 128, height, width, dtype=dtype), torch.randn(128, 128, 3, 3, dtype=dtype)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    conv = 2 * 2 * 128 * 128 * 9 * height * width / _median_time(lambda: F.conv2d(x, w, padding=1), 3) / 1e9
    return {"matmul": matmul, "conv": conv}


def component_probes(model):
    """(name, callable) of the components whose inputs a forward pass captures; the CTAL diffusion through the
    module-level `cross_task_diffusion` the CTAL module calls."""
    from ctal_hf import ctal_module

    decoder = model.decoder
    captured = {}

    def capture(name):
        def hook(module, args, kwargs):
            captured.setdefault(name, (module, args, kwargs))

        return hook

    handles = [model.backbone.register_forward_pre_hook(capture("backbone"), with_kwargs=True)]
    front = getattr(decoder, "neck", decoder)  # the shared CTALNeck (older code: on the decoder itself)
    if getattr(front, "fusion", None) is not None:
        handles.append(front.fusion.register_forward_pre_hook(capture("cross-scale fusion"), with_kwargs=True))
    for task, head in front.initial_heads.items():
        handles.append(head.register_forward_pre_hook(capture(f"initial head {task}"), with_kwargs=True))
    handles.append(decoder.ctal.register_forward_pre_hook(capture("CTAL module (all)"), with_kwargs=True))
    for task, block in decoder.ctal.upsample.items():
        handles.append(block.register_forward_pre_hook(capture(f"CTAL upsample {task}"), with_kwargs=True))
    for task, head in decoder.final_heads.items():
        handles.append(head.register_forward_pre_hook(capture(f"final head {task}"), with_kwargs=True))
    handles.append(model.criterion.register_forward_pre_hook(capture("loss"), with_kwargs=True))
    original = ctal_module.cross_task_diffusion

    def diffusion(*args, **kwargs):
        captured.setdefault("CTAL diffusion", (original, args, kwargs))
        return original(*args, **kwargs)

    ctal_module.cross_task_diffusion = diffusion

    def release():
        for handle in handles:
            handle.remove()
        ctal_module.cross_task_diffusion = original

    return captured, release


def _leaves(obj, train: bool):
    import torch

    if isinstance(obj, torch.Tensor):
        leaf = obj.detach().clone()  # clone keeps the layout (channels-last stays channels-last)
        return leaf.requires_grad_(train and leaf.is_floating_point())
    if isinstance(obj, dict):
        return {k: _leaves(v, train) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_leaves(v, train) for v in obj)
    return obj


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def run_case(case: dict) -> dict:
    if case["code"] != str(REPO):
        sys.path.insert(0, case["code"])
    else:
        sys.path.insert(0, str(REPO))
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ctal_hf import CTALConfig, CTALForDenseMultitask

    global _clock
    _clock = CLOCKS[case.get("clock", "wall")]
    torch.set_num_threads(case["threads"])
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(0)
    autocast_name, channels_last, compiled = VARIANTS[case["variant"]]
    dtype = getattr(torch, autocast_name) if autocast_name else None
    train = case["mode"] == "train"
    peaks = measure_peaks(dtype or torch.float32, channels_last, case.get("quick", False))
    overrides = {"image_size": case["image_size"]} if case.get("image_size") else {}
    config = CTALConfig.from_preset(case["preset"], decoder="ctal_ss", **overrides)
    model = CTALForDenseMultitask(config).train(train)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    pixel_values, labels = make_batch(config, case["batch"])
    if channels_last:  # also for today's code, which would not convert the input itself
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    runner = torch.compile(model) if compiled else model
    autocast = lambda: torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)  # noqa: E731

    def step():
        if train:
            with autocast():
                loss = runner(pixel_values, labels=labels).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode(), autocast():
                runner(pixel_values)

    compile_start = time.perf_counter()
    step()
    first_step = time.perf_counter() - compile_start
    times = []
    for _ in range(case["repeats"]):
        start = _clock()
        step()
        times.append(_clock() - start)
    result = {**case, "times": times, "first_step_s": first_step, "peaks": peaks, "components": []}
    if not case["components"] or compiled:
        return result

    captured, release = component_probes(model)
    with contextlib.ExitStack() as stack:
        if not train:
            stack.enter_context(torch.no_grad())
        with autocast():
            model(pixel_values, labels=labels)
    release()
    for name, (fn, args, kwargs) in captured.items():
        args, kwargs = _leaves(args, train), _leaves(kwargs, train)

        def run_component(fn=fn, args=args, kwargs=kwargs):
            with contextlib.ExitStack() as stack:
                if not train:
                    stack.enter_context(torch.no_grad())
                with autocast():
                    out = fn(*args, **kwargs)
                if train:
                    total = sum(t.float().mean() for t in _tensors(out) if t.requires_grad)
                    total.backward()
                    for t in _tensors((args, kwargs)):
                        t.grad = None
                    for p in model.parameters():
                        p.grad = None

        seconds = _median_time(run_component, max(1, case["repeats"] - 1))
        with FlopCounterMode(display=False) as counter:
            run_component()
        counts = {str(op): flops for op, flops in counter.get_flop_counts().get("Global", {}).items()}
        conv = sum(v for k, v in counts.items() if "convolution" in k)
        result["components"].append(
            {"name": name, "seconds": seconds, "flops": counter.get_total_flops(), "conv_flops": conv}
        )
    return result


# ---------------------------------------------------------------------------------------------------------- driver
def export_baseline(ref: str, destination: Path) -> Path:
    """The package as it was at `ref` (git archive), for today's path."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "ctal_hf"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)
    return destination


def machine_line(threads: int) -> str:
    """`_common.machine_line` and what decides this script's bf16 paths: oneDNN's bf16 support."""
    import torch

    return (
        f"{common_machine_line(threads)}; oneDNN bf16 support: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}, "
        "float32 matmul precision highest"
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="nyuv2")
    parser.add_argument("--variants", nargs="+", default=["today", "fp32", "fp32+cl", "bf16", "bf16+cl"])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=list(MODES))
    parser.add_argument("--image_size", type=int, nargs=2, default=None, help="override the preset's (smoke tests)")
    parser.add_argument("--train_batch", type=int, default=2)
    parser.add_argument("--infer_batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process, after one warm-up")
    parser.add_argument("--rounds", type=int, default=2, help="processes per (variant, mode), interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--clock",
        default="wall",
        choices=list(CLOCKS),
        help="wall: time.perf_counter; cpu: the process's CPU time (time.process_time), which other jobs' time "
        "slices do not inflate: with --threads 1 the robust measure on a loaded machine",
    )
    parser.add_argument("--baseline_ref", default=None, help="git ref of today's code (default: the working tree)")
    parser.add_argument("--no_components", action="store_true", help="whole steps only")
    parser.add_argument("--quick", action="store_true", help="small peak measurements (smoke tests)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "profile_step.md")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")

    command = "python benchmarks/profile_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        baseline = str(export_baseline(args.baseline_ref, Path(tmp))) if args.baseline_ref else str(REPO)
        for round_index in range(args.rounds):
            for mode in args.modes:
                for variant in args.variants:
                    case = dict(
                        preset=args.preset, image_size=args.image_size, variant=variant, mode=mode,
                        threads=args.threads, repeats=args.repeats, quick=args.quick, clock=args.clock,
                        batch=args.train_batch if mode == "train" else args.infer_batch,
                        code=baseline if variant == "today" else str(REPO),
                        components=round_index == 0 and not args.no_components,
                    )  # fmt: skip
                    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=case["code"])
                    proc = subprocess.run(
                        [sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True, env=env
                    )
                    if proc.returncode != 0:
                        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-4000:]}")
                    result = json.loads(proc.stdout.strip().splitlines()[-1])
                    runs.setdefault((mode, variant), []).append(result)
                    print(f"{mode} {variant}: {', '.join(f'{t:.2f}' for t in result['times'])} s", flush=True)
    load_after = os.getloadavg()
    print("\n".join(table_lines(args, command, started, load_before, load_after, runs)))


def table_lines(args, command, started, load_before, load_after, runs) -> list[str]:
    lines = [
        f"# Where the time goes: CTAL-SS, preset `{args.preset}`",
        "",
        f"Made by `{command.strip()}` on {started:%Y-%m-%d %H:%M} UTC.",
        "",
        f"Machine: {machine_line(args.threads)}. Load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in load_before)}, after {'/'.join(f'{x:.1f}' for x in load_after)}: the "
        "CPU is shared with other jobs, so absolute times are noisy; compare the ratios, measured in one run "
        f"with the variants interleaved over {args.rounds} rounds (median of {args.repeats} steps per process).",
        "",
        "Variants: `today` = the package at "
        f"`{args.baseline_ref or 'the working tree'}`, NCHW float32 eager (the default then); `fp32` = this code, "
        "NCHW float32 eager (the default now); `cl` = channels-last (`model.to(memory_format=torch.channels_last)`); "
        "`bf16` = `torch.autocast('cpu', torch.bfloat16)`; `compile` = `torch.compile(model)` (first step "
        "reported separately). "
        + (
            "Times are CPU seconds of the process (`--clock cpu`): time slices taken by other jobs do not count."
            if args.clock == "cpu"
            else "Times are wall-clock seconds."
        ),
        "",
    ]
    for mode in args.modes:
        reference = runs.get((mode, "today")) or runs.get((mode, "fp32"))
        ref_median = statistics.median(t for r in reference for t in r["times"])
        batch = args.train_batch if mode == "train" else args.infer_batch
        lines += [
            f"## {MODES[mode]}, batch {batch}",
            "",
            "| variant | step (s), median | vs today | min / max (s) | first step (s) | matmul peak GFLOP/s "
            "| 3x3 conv peak GFLOP/s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for variant in args.variants:
            results = runs[(mode, variant)]
            times = [t for r in results for t in r["times"]]
            median = statistics.median(times)
            matmul = statistics.median(r["peaks"]["matmul"] for r in results)
            conv = statistics.median(r["peaks"]["conv"] for r in results)
            first = max(r["first_step_s"] for r in results)
            lines.append(
                f"| {variant} | {median:.3f} | {median / ref_median:.2f}x | {min(times):.3f} / {max(times):.3f} "
                f"| {first:.1f} | {matmul:.0f} | {conv:.0f} |"
            )
        lines.append("")
        with_components = [v for v in args.variants if runs[(mode, v)][0]["components"]]
        if not with_components:
            continue
        lines += [
            f"Per component ({MODES[mode]}), each alone: time in ms, GFLOP, achieved GFLOP/s, and % of the peak "
            "its dominant op kind reaches in that process (conv peak where convolutions are most of its FLOPs, else "
            "matmul).",
            "",
            "| component | " + " | ".join(f"{v} ms | {v} GFLOP/s (% peak)" for v in with_components) + " | GFLOP |",
            "|---|" + "---:|---:|" * len(with_components) + "---:|",
        ]
        names = [c["name"] for c in runs[(mode, with_components[0])][0]["components"]]
        for name in names:
            cells, flops = [], 0
            for variant in with_components:
                result = runs[(mode, variant)][0]
                component = next((c for c in result["components"] if c["name"] == name), None)
                if component is None:
                    cells += ["-", "-"]
                    continue
                flops = component["flops"]
                rate = component["flops"] / component["seconds"] / 1e9
                conv_heavy = component["conv_flops"] > component["flops"] / 2
                peak = result["peaks"]["conv" if conv_heavy else "matmul"]
                cells += [f"{1000 * component['seconds']:.0f}", f"{rate:.0f} ({100 * rate / peak:.0f} %)"]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {flops / 1e9:.1f} |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_table(args.out, lines)
    return lines


if __name__ == "__main__":
    main()
