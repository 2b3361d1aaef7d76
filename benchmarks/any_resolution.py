"""Any input size: a CTAL-SS model trained on the synthetic scenes at one size (64 x 96), evaluated at 1x, 2x and 4x
that size, the same scenes rendered at each size (exact labels at every size), by:

- (a) `resize`: the image resized to the model's size and the maps resized back (the pipeline's default);
- (b) `native`: the model at the image's size with CTAL's fusion weights resampled (`interpolate_affinity=True`,
  the "bilinear" method: bilinear, align_corners=False, area-rescaled), and `native, unscaled` (the
  "bilinear_unscaled" method: without the area rescaling), which decides the default;
- (c) `sliding`: windows of the model's size with 1/3 overlap, blended;
- (d) `fine-tuned`: a short fine-tune at 2x starting from the interpolated weights, and `trained at 2x`: the same
  recipe and number of steps at 2x from the recipe's initialisation (run at 4x with interpolated weights).

Per task the headline metric (semseg mIoU, depth rel_err, normals mean_angle), the time per image (median, batch 1)
and the peak memory per image (the process's peak resident set above its level before the variant, reset through
/proc/self/clear_refs after returning freed memory to the system), with ratios against `resize` at the same size.
Also: an ONNX export at 2x from interpolated weights through `ctal_hf.export.export_model` and its validation.

    # trains the three models with examples/train.py (skipped when their folders exist), then evaluates:
    python benchmarks/any_resolution.py --work_dir runs/any_resolution --out benchmarks/results/any_resolution.md

Rows accumulate in `<work_dir>/rows.json` (a rerun replaces the rows it measures), so `--variants` can measure some
variants now and others later; the table is written from all of them.
"""

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import cpu_description

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BASE_SIZE = (64, 96)
TASKS = ("semseg", "depth", "normals")


def _train(args, folder: Path, *extra: str) -> None:
    if (folder / "config.json").is_file():
        print(f"[any_resolution] {folder} exists: not retrained", flush=True)
        return
    command = [sys.executable, str(REPO / "examples" / "train.py"), "--output_dir", str(folder), "--seed", "0",
               "--num_prediction_images", "0", *extra]  # fmt: skip
    print("[any_resolution] " + " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})


def train_models(args) -> dict[str, Path]:
    from ctal_hf import CTALForDenseMultitask, CTALImageProcessor

    work = Path(args.work_dir)
    large = [2 * BASE_SIZE[0], 2 * BASE_SIZE[1]]
    folders = {name: work / name for name in ("base", "finetune_init", "finetuned", "trained_2x")}
    _train(args, folders["base"], "--max_train_steps", str(args.base_steps))
    if not (folders["finetune_init"] / "config.json").is_file():
        model = CTALForDenseMultitask.from_pretrained(folders["base"], image_size=large)
        model.save_pretrained(folders["finetune_init"])
        CTALImageProcessor.from_model_config(model.config).save_pretrained(folders["finetune_init"])
    short = ["--max_train_steps", str(args.finetune_steps), "--per_device_train_batch_size", str(args.finetune_batch),
             "--num_validation_images", "8"]  # fmt: skip
    _train(args, folders["finetuned"], "--model_name_or_path", str(folders["finetune_init"]), *short)
    _train(args, folders["trained_2x"], "--image_size", *map(str, large), *short)
    return folders




def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Returns freed heap memory to the system, resets the peak resident set to the current one; returns it (KiB)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def scenes(scale: int, count: int):
    from ctal_hf.data import row_to_sample
    from dataset_scripts.synthetic import render_scene

    height, width = BASE_SIZE[0] * scale, BASE_SIZE[1] * scale
    for index in range(count):
        row = render_scene(index, seed=0, split="validation", height=height, width=width, config="nyuv2")
        sample = row_to_sample(row, list(TASKS))
        yield row["image"], {task: sample[task].unsqueeze(0) for task in TASKS}


def evaluate(args, folders: dict[str, Path]) -> tuple[list[dict], dict]:
    import torch
    import torch.nn.functional as F

    from ctal_hf import CTALForDenseMultitask, CTALImageProcessor
    from ctal_hf.metrics import MultiTaskEvaluator
    from ctal_hf.sliding_window import DEFAULT_OVERLAP, sliding_window_predictions

    torch.set_num_threads(args.threads)
    base = CTALForDenseMultitask.from_pretrained(folders["base"]).eval()
    processor = CTALImageProcessor.from_pretrained(folders["base"])
    loaded = {}

    def trained(name):
        if name not in loaded:
            loaded[name] = CTALForDenseMultitask.from_pretrained(folders[name]).eval()
        return loaded[name]

    unscaled_models = {}

    def native_pixels(image):
        return processor(image, size={"height": image.shape[0], "width": image.shape[1]}, return_tensors="pt")[
            "pixel_values"
        ]

    def resize(image):
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        predictions = base(pixels).predictions
        return {task: F.interpolate(p, size=image.shape[:2], mode="bilinear", align_corners=False)
                for task, p in predictions.items()}  # fmt: skip

    def native(image):
        return base(native_pixels(image), interpolate_affinity=True).predictions

    def native_unscaled(image):
        size = tuple(image.shape[:2])
        if size not in unscaled_models:
            unscaled_models[size] = copy.deepcopy(base)
            unscaled_models[size].resize_image_size(size, method="bilinear_unscaled")
        return unscaled_models[size](native_pixels(image)).predictions

    def sliding(image):
        return sliding_window_predictions(base, native_pixels(image), overlap=DEFAULT_OVERLAP)

    def at_own_size(name):
        return lambda image: trained(name)(native_pixels(image), interpolate_affinity=True).predictions

    variants = {
        "resize": ("(a) resize in / out", resize, 1),
        "native": ("(b) native, interpolated", native, 1),
        "native_unscaled": ("(b) native, interpolated, unscaled", native_unscaled, 2),
        "sliding": ("(c) sliding windows (1/3 overlap)", sliding, 1),
        "finetuned": ("(d) fine-tuned at 2x from interpolated", at_own_size("finetuned"), 2),
        "trained_2x": ("(d) trained at 2x from the initialisation", at_own_size("trained_2x"), 2),
    }
    rows = []
    for scale in args.scales:
        images = list(scenes(scale, args.num_images))
        for key in args.variants:
            name, run, min_scale = variants[key]
            if scale < min_scale:
                continue
            evaluator = MultiTaskEvaluator(base.config)
            with torch.no_grad():
                run(images[0][0])  # warm-up (and the resized copy of the unscaled variant)
                start_rss = _reset_peak()
                times = []
                for image, labels in images:
                    began = time.perf_counter()
                    predictions = run(image)
                    times.append(time.perf_counter() - began)
                    evaluator.update({task: p.float() for task, p in predictions.items()}, labels)
            peak = _status_kib("VmHWM") - start_rss
            rows.append({"scale": scale, "variant": name, "order": list(variants).index(key),
                         "headline": evaluator.headline(), "ms": 1000 * statistics.median(times),
                         "peak_mib": peak / 1024, "load": os.getloadavg()[0]})  # fmt: skip
            print(f"[any_resolution] {scale}x {name}: {rows[-1]}", flush=True)
    export = {}
    if args.export:
        export = check_export(folders, Path(args.work_dir) / "onnx_2x")
    return rows, export


def check_export(folders: dict[str, Path], target: Path) -> dict:
    from ctal_hf import CTALForDenseMultitask, CTALImageProcessor
    from ctal_hf.export import export_model

    size = [2 * BASE_SIZE[0], 2 * BASE_SIZE[1]]
    model = CTALForDenseMultitask.from_pretrained(folders["base"], image_size=size).eval()
    result = export_model(
        model,
        target,
        format="onnx",
        overwrite=True,
        image_processor=CTALImageProcessor.from_model_config(model.config),
    )
    worst = {
        task: max(per_input[task]["relative"] for per_input in result.validation.values())
        for task in next(iter(result.validation.values()))
    }
    return {"size": size, "file": str(result.model_file), "runtime": result.runtime, "worst_relative": worst}


def write_table(args, rows: list[dict], export: dict, header: str) -> str:
    lines = [
        "# Any input size: resize, interpolated weights, sliding windows, fine-tuning",
        "",
        "`python benchmarks/any_resolution.py " + " ".join(sys.argv[1:]) + "`",
        "",
        header,
        "",
        f"CTAL-SS (HRNet-W18-small-v2) trained on the synthetic scenes at {BASE_SIZE[0]} x {BASE_SIZE[1]} "
        f"(`examples/train.py`, {args.base_steps} steps of 8); fine-tunes at 2x: {args.finetune_steps} steps of "
        f"{args.finetune_batch}. {args.num_images} validation scenes rendered at each size. Metrics: semseg mIoU "
        "(higher is better), depth rel_err and normals mean angle in degrees (lower is better). Time: median per "
        "image, batch 1; memory: peak resident set above the level before the variant. Ratios against (a) at the "
        "same size.",
        "",
        "| size | variant | semseg mIoU | depth rel_err | normals mean angle | ms / image | x (a) | peak MiB | x (a) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reference = {row["scale"]: row for row in rows if row["variant"].startswith("(a)")}
    for row in rows:
        ref = reference.get(row["scale"])
        height, width = BASE_SIZE[0] * row["scale"], BASE_SIZE[1] * row["scale"]
        head = row["headline"]
        time_ratio = f"{row['ms'] / ref['ms']:.2f}" if ref else "-"
        mem_ratio = f"{row['peak_mib'] / ref['peak_mib']:.2f}" if ref and ref["peak_mib"] > 0 else "-"
        lines.append(
            f"| {row['scale']}x ({height} x {width}) | {row['variant']} | {100 * head['semseg']:.2f} | "
            f"{head['depth']:.4f} | {head['normals']:.2f} | {row['ms']:.0f} | {time_ratio} | "
            f"{row['peak_mib']:.0f} | {mem_ratio} |"
        )
    if args.note:
        lines += ["", args.note]
    if export:
        worst = ", ".join(f"{task} {value:.2e}" for task, value in export["worst_relative"].items())
        lines += [
            "",
            f"ONNX export at {export['size'][0]} x {export['size'][1]} from interpolated weights "
            f"(`from_pretrained(base, image_size=...)` then `ctal_hf.export.export_model(..., format='onnx')`): "
            f"validated with {export['runtime']}; worst relative difference to eager per task: {worst}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="runs/any_resolution", help="Where the trained models go.")
    parser.add_argument("--out", default=None, help="Markdown table to write (default: print only).")
    parser.add_argument("--scales", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--base_steps", type=int, default=30)
    parser.add_argument("--finetune_steps", type=int, default=8)
    parser.add_argument("--finetune_batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["resize", "native", "native_unscaled", "sliding", "finetuned", "trained_2x"],
        choices=["resize", "native", "native_unscaled", "sliding", "finetuned", "trained_2x"],
    )
    parser.add_argument(
        "--note", default=None, help="A paragraph written under the table (e.g. how the models were trained)."
    )
    parser.add_argument("--no_train", action="store_true", help="Use the models in --work_dir as they are.")
    parser.add_argument("--no_export", dest="export", action="store_false", help="Skip the ONNX export check.")
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    if args.no_train:
        folders = {name: work / name for name in ("base", "finetuned", "trained_2x")}
    else:
        folders = train_models(args)
    started = os.getloadavg()[0]
    measured, export = evaluate(args, folders)
    store = work / "rows.json"
    saved = json.loads(store.read_text()) if store.is_file() else {"rows": [], "export": {}}
    done = {(row["scale"], row["variant"]) for row in measured}
    rows = [row for row in saved["rows"] if (row["scale"], row["variant"]) not in done] + measured
    rows.sort(key=lambda row: (row["scale"], row["order"]))
    export = export or saved["export"]
    store.write_text(json.dumps({"rows": rows, "export": export}, indent=1))
    import torch

    header = (
        f"CPU: {cpu_description()}; torch {torch.__version__}, {args.threads} threads; load average "
        f"{started:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (a shared machine: compare ratios)."
    )
    table = write_table(args, rows, export, header)
    print(table)
    if args.out:
        out = Path(args.out)
        temporary = out.with_suffix(".tmp")
        temporary.write_text(table)
        os.replace(temporary, out)


if __name__ == "__main__":
    main()
