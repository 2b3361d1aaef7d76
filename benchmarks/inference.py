"""Inference latency of exported CTAL models on the CPU: eager PyTorch (and `torch.compile` with `--compile`), ONNX
Runtime and OpenVINO (and ExecuTorch where it is installed), float32 and int8, at batch 1 with pinned threads, for
NYUv2 CTAL-SS, NYUv2 MTL and CTAL-SS on a phone-sized backbone (timm MobileNetV3-Large), all randomly initialised.

    python benchmarks/inference.py                      # writes benchmarks/results/inference.md
    python benchmarks/inference.py --profile --compile  # + where the time goes (per op type), + torch.compile
    python benchmarks/inference.py --tiny               # a tiny model in seconds (the test's setting)

Every runtime of a model is timed in the same process, interleaved: each round runs every runtime once, in a
rotating order, so load from other jobs hits all of them alike; the ratio to eager is the median of the per-round
ratios. Memory: the peak resident set (VmHWM, reset through /proc/self/clear_refs) while a runtime loads its model
and runs its warm-up inferences, and what it still holds afterwards, above the resident set before.
int8 models are calibrated on random normal images (latency does not depend on the values)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _common import machine_line, reset_peak_rss, status_kib, write_table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUTPUT = REPO / "benchmarks" / "results" / "inference.md"
# Done-when targets of NYUv2 CTAL-SS at batch 1: the runtime's latency over eager PyTorch fp32's.
TARGETS = {("ONNX Runtime", "fp32"): 0.6, ("ONNX Runtime", "int8"): 0.35}


def model_settings(tiny: bool) -> dict[str, dict]:
    """name -> CTALConfig keyword arguments (on top of the nyuv2 preset)."""
    from transformers import TimmBackboneConfig

    if tiny:
        small = TimmBackboneConfig(backbone="resnet10t", out_indices=(1, 2, 3, 4))
        fields = dict(image_size=[32, 32], backbone_config=small, head_channels=16, ctal_channels=8)
        return {"tiny CTAL-SS (ResNet-10-T, 32x32)": fields}
    mobile = TimmBackboneConfig(backbone="mobilenetv3_large_100", out_indices=(1, 2, 3, 4))
    return {
        "NYUv2 CTAL-SS (HRNet-W18-small-v2)": dict(decoder="ctal_ss"),
        "NYUv2 MTL (HRNet-W18-small-v2)": dict(decoder="mtl"),
        "NYUv2 CTAL-SS (MobileNetV3-Large)": dict(decoder="ctal_ss", backbone_config=mobile),
    }


# ------------------------------------------------------------------------------------------------ memory
def loaded(build, pixel_values, warmup: int):
    """(runner, peak MB, held MB): the peak resident memory (VmHWM, reset through /proc/self/clear_refs) while the
    runner is built and runs `warmup` times, and the resident memory it still holds afterwards, both above the
    resident set before (None where /proc lacks them)."""
    gc.collect()
    reset = reset_peak_rss()
    before = status_kib("VmRSS")
    runner = build()
    for _ in range(max(1, warmup)):
        runner(pixel_values)
    peak, after = status_kib("VmHWM"), status_kib("VmRSS")
    if before is None or after is None:
        return runner, None, None
    return runner, (max(0.0, (peak - before) / 1024) if reset and peak else None), max(0.0, (after - before) / 1024)


# ------------------------------------------------------------------------------------------------ runners
def eager_runner(model):
    import torch

    def run(pixel_values):
        with torch.inference_mode():
            return model(pixel_values=torch.from_numpy(pixel_values)).predictions

    return run


def compiled_runner(model):
    import torch

    compiled = torch.compile(model)

    def run(pixel_values):
        with torch.inference_mode():
            return compiled(pixel_values=torch.from_numpy(pixel_values)).predictions

    return run


def exported_runner(folder: Path, runtime: str, threads: int):
    from ctal_hf.export import load_exported

    exported = load_exported(folder, runtime=runtime, num_threads=threads)
    return exported


def export_all(model, work: Path, runtimes: list[str], calibration, ctal_float: bool) -> dict[str, Path]:
    """fp32 exports through `export_model` (validated against eager), int8 ones through `quantize_exported` on them
    (the step `export_model(quantize="int8")` runs), with their manifests; `ctal_float`: also ONNX int8 with the CTAL
    block's own operations kept in float (`float_scopes=["=decoder.ctal"]`)."""
    from ctal_hf.export import export_model
    from ctal_hf.export.quantization import quantize_exported

    folders = {}
    for fmt in ("onnx", "openvino", "executorch"):
        if fmt not in runtimes:
            continue
        fp32 = work / f"{fmt}-fp32"
        export_model(model, fp32, format=fmt)
        folders[(fmt, "fp32")] = fp32
        if fmt == "executorch":
            continue
        variants = {"int8": None, "int8, CTAL block float": ("=decoder.ctal",)} if ctal_float and fmt == "onnx" else {"int8": None}
        for precision, float_scopes in variants.items():
            int8 = work / f"{fmt}-{precision.replace(', ', '-').replace(' ', '-')}"
            report = quantize_exported(fmt, fp32, int8, calibration, model.config, float_scopes=float_scopes)
            manifest = json.loads((fp32 / "export_manifest.json").read_text())
            report = {k: v for k, v in report.items() if k != "float_node_names"}
            manifest.update(precision="int8", quantization=report)
            (int8 / "export_manifest.json").write_text(json.dumps(manifest, indent=2))
            folders[(fmt, precision)] = int8
    return folders


def folder_size_mb(folder: Path) -> float:
    manifest = json.loads((folder / "export_manifest.json").read_text())
    return sum((folder / name).stat().st_size for name in manifest.get("files", [])) / 2**20


# ------------------------------------------------------------------------------------------------ profiles
def profile_onnxruntime(folder: Path, threads: int, pixel_values, runs: int, top: int) -> list[tuple[str, float]]:
    """(op type, ms per inference) from ONNX Runtime's profiler, largest first."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "ort_profile")
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: pixel_values})  # warm-up, profiled too: dropped below by counting runs
    for _ in range(runs):
        session.run(None, {name: pixel_values})
    events = json.loads(Path(session.end_profiling()).read_text())
    totals = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"].get("op_name", "?")] += event["dur"] / 1000.0
    return sorted(((op, ms / (runs + 1)) for op, ms in totals.items()), key=lambda item: -item[1])[:top]


def profile_openvino(folder: Path, threads: int, pixel_values, runs: int, top: int) -> list[tuple[str, float]]:
    """(layer type and kernel, ms per inference) from OpenVINO's performance counters."""
    import openvino as ov

    core = ov.Core()
    properties = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True}
    model_file = folder / ("model.xml" if (folder / "model.xml").is_file() else "model.onnx")
    compiled = core.compile_model(core.read_model(str(model_file)), "CPU", properties)
    request = compiled.create_infer_request()
    request.infer({0: pixel_values})
    totals = defaultdict(float)
    for _ in range(runs):
        request.infer({0: pixel_values})
        for info in request.get_profiling_info():
            totals[f"{info.node_type} ({info.exec_type})"] += info.real_time.total_seconds() * 1000 / runs
    return sorted(totals.items(), key=lambda item: -item[1])[:top]


def profile_eager(model, pixel_values, runs: int, top: int) -> list[tuple[str, float]]:
    import torch

    run = eager_runner(model)
    run(pixel_values)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(runs):
            run(pixel_values)
    averages = sorted(profiler.key_averages(), key=lambda event: -event.self_cpu_time_total)[:top]
    return [(event.key, event.self_cpu_time_total / 1000 / runs) for event in averages]


# ------------------------------------------------------------------------------------------------ measure
def measure(name: str, fields: dict, args, work: Path) -> dict:
    import torch

    from ctal_hf import CTALConfig, CTALForDenseMultitask
    from ctal_hf.export.calibration import load_calibration_data

    torch.manual_seed(0)
    config = CTALConfig.from_preset("nyuv2", **fields)
    model = CTALForDenseMultitask(config).eval()
    rng = np.random.default_rng(0)
    pixel_values = rng.standard_normal((1, 3, *config.image_size), dtype=np.float32)
    calibration_images = rng.standard_normal((args.calibration_images, 3, *config.image_size), dtype=np.float32)
    calibration = load_calibration_data(calibration_images, config, None, args.calibration_images)
    start = time.time()
    folder = work / "".join(c if c.isalnum() else "_" for c in name)
    folders = export_all(model, folder, args.runtimes, calibration, args.ctal_float and not args.tiny)
    export_seconds = time.time() - start
    attention = json.loads((next(iter(folders.values())) / "export_manifest.json").read_text()).get("attention")
    params_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20

    # Eager runners load a copy of the model, so that its weights count as an exported model's do.
    builders = {("eager PyTorch", "fp32"): (lambda: eager_runner(copy.deepcopy(model)), params_mb)}
    if args.compile:
        builders[("torch.compile", "fp32")] = (lambda: compiled_runner(copy.deepcopy(model)), params_mb)
    labels = {"onnx": ("ONNX Runtime", "onnxruntime"), "openvino": ("OpenVINO", "openvino"),
              "executorch": ("ExecuTorch (XNNPACK)", "executorch")}  # fmt: skip
    for (fmt, precision), folder in folders.items():
        label, runtime = labels[fmt]
        builders[(label, precision)] = (
            lambda folder=folder, runtime=runtime: exported_runner(folder, runtime, args.threads),
            folder_size_mb(folder),
        )
    runners, rows = {}, {}
    for key, (build, size) in builders.items():
        runner, peak_mb, held_mb = loaded(build, pixel_values, args.warmup)
        runners[key] = runner
        rows[key] = {"runtime": key[0], "precision": key[1], "file_mb": size, "peak_mb": peak_mb, "held_mb": held_mb,
                     "times": []}  # fmt: skip
    order = list(runners)
    reference = ("eager PyTorch", "fp32")
    ratios = defaultdict(list)
    for round_index in range(args.repeats):
        shift = round_index % len(order)
        this_round = {}
        for key in order[shift:] + order[:shift]:
            begin = time.perf_counter()
            runners[key](pixel_values)
            this_round[key] = time.perf_counter() - begin
        for key, seconds in this_round.items():
            rows[key]["times"].append(seconds)
            ratios[key].append(seconds / this_round[reference])
    for key, row in rows.items():
        row["median_ms"] = 1000 * statistics.median(row["times"])
        row["ratio"] = statistics.median(ratios[key])
        row["ratio_spread"] = (min(ratios[key]), max(ratios[key]))
        del row["times"]
    result = {"name": name, "rows": list(rows.values()), "export_seconds": export_seconds, "attention": attention,
              "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "image_size": list(config.image_size)}  # fmt: skip
    if args.profile:
        profiles = {"eager PyTorch fp32 (self CPU time per op)": profile_eager(model, pixel_values, 3, args.top)}
        for (fmt, precision), folder in folders.items():
            if fmt == "onnx" and precision != "int8, CTAL block float":
                profiles[f"ONNX Runtime {precision} (per op type)"] = profile_onnxruntime(
                    folder, args.threads, pixel_values, args.profile_runs, args.top
                )
            elif fmt == "openvino":
                profiles[f"OpenVINO {precision} (per layer type, kernel)"] = profile_openvino(
                    folder, args.threads, pixel_values, args.profile_runs, args.top
                )
        result["profiles"] = profiles
    return result


# ------------------------------------------------------------------------------------------------ render
def _mb(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render(results: list[dict], meta: dict) -> str:
    lines = [
        "# Inference latency of exported models (CPU, batch 1)",
        "",
        f"`{meta['command']}` ({meta['date']}, {meta['seconds']:.0f} s). Machine: {meta['machine']}. Load average "
        f"(1 / 5 / 15 min) at the start {meta['load_start']}, at the end {meta['load_end']}. "
        f"{meta['threads']} threads everywhere: torch.set_num_threads({meta['threads']}) (and 1 inter-op thread), "
        f"ONNX Runtime intra_op_num_threads={meta['threads']} (inter-op 1, sequential), OpenVINO "
        f"INFERENCE_NUM_THREADS={meta['threads']} (f32 precision hint; int8 layers still run in int8). "
        f"{meta['repeats']} interleaved rounds after {meta['warmup']} warm-up runs; versions: {meta['versions']}.",
        "",
        "Columns: median latency; ratio = median over rounds of (this runtime's time / eager PyTorch fp32's time in "
        "the same round), with the smallest and largest round in brackets; peak MB = peak resident memory (VmHWM, "
        "reset through /proc/self/clear_refs) while the runtime loads its model and runs the warm-up inferences, "
        "above the resident set before (eager: loading a copy of the model); held MB = resident memory it still "
        "holds afterwards (weights, arenas); both measured one runtime after the other in one process, so memory "
        "an earlier runtime freed may be reused (an under-estimate, not an over-estimate); file MB = the model "
        "file(s) (eager: the float32 parameters).",
        "",
    ]
    for result in results:
        attention = result.get("attention") or {}
        lines += [
            f"## {result['name']}",
            "",
            f"{result['parameters_m']:.2f} M parameters, input {'x'.join(map(str, result['image_size']))}, random "
            f"weights; CTAL attention in the exported graph: {attention.get('used', 'n/a')} (requested "
            f"{attention.get('requested', 'n/a')}); exports took {result['export_seconds']:.0f} s.",
            "",
            "| runtime | precision | median ms | ratio to eager fp32 | peak MB | held MB | file MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in result["rows"]:
            low, high = row["ratio_spread"]
            lines.append(
                f"| {row['runtime']} | {row['precision']} | {row['median_ms']:.1f} | {row['ratio']:.2f}x "
                f"[{low:.2f}-{high:.2f}] | {_mb(row['peak_mb'])} | {_mb(row['held_mb'])} | {row['file_mb']:.1f} |"
            )
        lines.append("")
        if result["name"].startswith("NYUv2 CTAL-SS (HRNet"):
            for (runtime, precision), target in TARGETS.items():
                row = next((r for r in result["rows"] if (r["runtime"], r["precision"]) == (runtime, precision)), None)
                if row is not None:
                    verdict = "met" if row["ratio"] <= target else "NOT met"
                    lines.append(f"- Target {runtime} {precision} <= {target}x eager fp32: {row['ratio']:.2f}x, {verdict}.")
            lines.append("")
        for title, entries in (result.get("profiles") or {}).items():
            total = sum(ms for _, ms in entries) or 1.0
            lines += [f"Where the time goes, {title}, top {len(entries)}:", "", "| op | ms per inference | share of these |",
                      "|---|---|---|"]  # fmt: skip
            lines += [f"| {op} | {ms:.2f} | {100 * ms / total:.0f} % |" for op, ms in entries]
            lines.append("")
    return "\n".join(lines) + "\n"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("torch", "onnxruntime", "openvino", "nncf", "executorch"):
        with contextlib.suppress(PackageNotFoundError):
            found.append(f"{package} {version(package)}")
    return ", ".join(found)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model, few rounds: runs in seconds")
    parser.add_argument("--models", nargs="+", default=None, help="substrings of the model names to run")
    parser.add_argument("--runtimes", nargs="+", default=None, choices=["onnx", "openvino", "executorch"],
                        help="export formats to time (default: onnx, openvino, and executorch where installed)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 20; tiny 3)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calibration_images", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (compiles slowly)")
    parser.add_argument("--profile", action="store_true", help="also write where the time goes, per op type")
    parser.add_argument("--profile_runs", type=int, default=5)
    parser.add_argument("--no_ctal_float", dest="ctal_float", action="store_false",
                        help="skip the ONNX int8 row with the CTAL block kept in float")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--work_dir", default=None)
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args(argv)  # fmt: skip
    if args.repeats is None:
        args.repeats = 3 if args.tiny else 20
    if args.runtimes is None:
        args.runtimes = ["onnx", "openvino"] + (["executorch"] if importlib.util.find_spec("executorch") else [])

    import torch

    torch.set_num_threads(args.threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    settings = model_settings(args.tiny)
    if args.models:
        settings = {k: v for k, v in settings.items() if any(s.lower() in k.lower() for s in args.models)}
        if not settings:
            raise SystemExit(f"--models {args.models} matches none of {list(model_settings(args.tiny))}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ctal-inference-"))
    started, load_start = time.time(), os.getloadavg()
    meta = {"command": "python benchmarks/inference.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine_line(),
            "load_start": " / ".join(f"{v:.1f}" for v in load_start), "threads": args.threads,
            "repeats": args.repeats, "warmup": args.warmup, "versions": versions()}  # fmt: skip
    results = []
    try:
        for name, fields in settings.items():
            print(f"{name}: exporting and timing ...", flush=True)
            results.append(measure(name, fields, args, work))
            meta.update(seconds=time.time() - started, load_end=" / ".join(f"{v:.1f}" for v in os.getloadavg()))
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            write_table(args.output, [render(results, meta)])  # after every model: a cut-short run keeps its rows
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    print(Path(args.output).read_text())


if __name__ == "__main__":
    main()
