"""Accuracy of the exported and int8 models against eager PyTorch: every headline metric on the synthetic validation
set (`MultiTaskEvaluator`) for eager fp32, ONNX Runtime fp32 / int8 and OpenVINO fp32 / int8, and (`--sensitivity`)
the per-block int8 sensitivity study on the TRAINING split that chose what stays in float
(`ctal_hf.export.quantization.DEFAULT_FLOAT_SCOPES`).

    python examples/train.py --output_dir outputs/ctal-synthetic   # or `make train`: the model this measures
    python benchmarks/export_accuracy.py --model outputs/ctal-synthetic --sensitivity

Calibration reads the training split only (64 images spread over it by default); the validation split is read
only for the final table. Writes benchmarks/results/export_accuracy.md."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine_line, write_table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_MODEL = REPO / "outputs" / "ctal-synthetic"
OUTPUT = REPO / "benchmarks" / "results" / "export_accuracy.md"


# ------------------------------------------------------------------------------------------------ export / run
class _Predictions:
    """The model's final predictions as a plain dict (what an export wrapper returns)."""

    def __init__(self, model):
        import torch

        class Wrapper(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.model = inner

            def forward(self, pixel_values):
                return self.model(pixel_values=pixel_values).predictions

        self.module = Wrapper(model).eval()


def export_fp32(model, fmt: str, folder: Path) -> Path:
    """`folder` holding the fp32 export of `model` in `fmt` (`onnx` / `openvino`): through `ctal_hf.export.export_model`
    when it is there, otherwise with the same calls directly (`torch.onnx.export(dynamo=True)`,
    `openvino.convert_model`)."""
    try:
        from ctal_hf.export import export_model
    except ImportError:
        export_model = None
    if export_model is not None:
        export_model(model, folder, format=fmt)
        return folder
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    wrapper = _Predictions(model).module
    example = torch.zeros(1, 3, *model.config.image_size)
    with torch.no_grad():
        if fmt == "onnx":
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, input_names=["pixel_values"], output_names=list(model.config.tasks),
                opset_version=18, verbose=False,
            )  # fmt: skip
            program.save(str(folder / "model.onnx"))
        elif fmt == "openvino":
            import openvino as ov

            converted = ov.convert_model(wrapper, example_input=(example,))
            for output, task in zip(converted.outputs, model.config.tasks, strict=True):
                output.get_tensor().set_names({task})
            ov.save_model(converted, str(folder / "model.xml"), compress_to_fp16=False)
        else:
            raise ValueError(f"unknown format {fmt!r}")
    model.config.save_pretrained(folder)
    from ctal_hf import CTALImageProcessor

    CTALImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder


def model_file(folder: Path) -> Path:
    for name in ("model.onnx", "model.xml", "model.pte"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} holds no exported model file")


def file_size_mb(folder: Path) -> float:
    path = model_file(folder)
    total = path.stat().st_size
    for extra in (path.with_suffix(".bin"), Path(str(path) + ".data")):
        if extra.is_file():
            total += extra.stat().st_size
    return total / 2**20


def ort_runner(folder: Path, threads: int, profile_prefix: str | None = None):
    """A callable `pixel_values -> {task: array}` on ONNX Runtime's CPU provider, `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    input_name = session.get_inputs()[0].name

    def run(pixel_values):
        return dict(zip(names, session.run(None, {input_name: pixel_values}), strict=True))

    run.session = session
    return run


def openvino_runner(folder: Path, threads: int):
    """A callable on OpenVINO's CPU plugin in f32 precision (no bf16 down-casting), `threads` inference threads."""
    import openvino as ov

    core = ov.Core()
    properties = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1,
                  "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    compiled = core.compile_model(core.read_model(str(model_file(folder))), "CPU", properties)
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)
    names = [output.get_any_name() for output in outputs]

    def run(pixel_values):
        result = request.infer({0: pixel_values})
        return {name: np.array(result[output]) for name, output in zip(names, outputs, strict=True)}

    return run


def eager_runner(model):
    import torch

    def run(pixel_values):
        with torch.inference_mode():
            out = model(pixel_values=torch.from_numpy(pixel_values)).predictions
        return {task: value.numpy() for task, value in out.items()}

    return run


# ------------------------------------------------------------------------------------------------ evaluation
def labelled_batches(source, config, split: str, num_images: int | None, normalize: bool, cache_dir=None):
    """[(pixel_values (1, 3, H, W) float32, labels {task: tensor})] of `split`, through the evaluation transform
    `examples/train.py` evaluates with."""
    from ctal_hf.data import CTALTorchDataset, CTALTransform
    from ctal_hf.export.calibration import open_split

    rows, _ = open_split(source, config, split, cache_dir)
    if num_images is not None and num_images < len(rows):
        rows = rows.select(range(num_images))
    dataset = CTALTorchDataset(rows, config, CTALTransform(config.image_size, train=False, normalize=normalize))
    batches = []
    for index in range(len(dataset)):
        batch = dataset.collate([dataset[index]])
        batches.append((batch["pixel_values"].numpy().astype(np.float32), batch["labels"]))
    return batches


def evaluate(run, batches, config) -> dict:
    import torch

    from ctal_hf.metrics import MultiTaskEvaluator

    evaluator = MultiTaskEvaluator(config)
    for pixel_values, labels in batches:
        predictions = {task: torch.from_numpy(np.asarray(value)) for task, value in run(pixel_values).items()}
        evaluator.update(predictions, labels)
    results = evaluator.compute()
    return {"all": results, "headline": evaluator.headline(results), "lower": sorted(evaluator.lower_is_better)}


def quantize(fp32_folder: Path, out: Path, fmt: str, calibration, config, float_scopes=None, **kwargs) -> dict:
    from ctal_hf.export.quantization import quantize_exported

    if out.exists():
        shutil.rmtree(out)
    return quantize_exported(fmt, fp32_folder, out, calibration, config, float_scopes=float_scopes, **kwargs)


# ------------------------------------------------------------------------------------------------ rendering
METRIC_LABELS = {"mIoU": "mIoU %", "rel_err": "rel. err", "mean_angle": "mean angle deg", "maxF": "maxF %"}


PERCENT_METRICS = ("mIoU", "pixel_acc", "maxF")  # fractions in [0, 1]: shown in %, differences in points


def _fmt_metric(metric: str, value: float) -> str:
    if metric in PERCENT_METRICS:
        return f"{100 * value:.2f}"
    return f"{value:.2f}" if metric == "mean_angle" else f"{value:.4f}"


def _fmt_diff(metric: str, diff: float) -> str:
    if metric in PERCENT_METRICS:
        return f"{100 * diff:+.2f}"
    return f"{diff:+.2f}" if metric == "mean_angle" else f"{diff:+.4f}"


def render_rows(results: list[tuple[str, dict, str]], config, reference: dict) -> list[str]:
    """One row per variant: every headline metric, its difference to `reference`, and a note."""
    from ctal_hf.metrics import MultiTaskEvaluator

    tasks = MultiTaskEvaluator(config).task_objects
    header = ["variant"]
    for task, spec in tasks.items():
        header += [f"{task} {METRIC_LABELS.get(spec.metric, spec.metric)}", "diff"]
    if "depth" in tasks:
        header += ["depth rel. change"]
    header += ["notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, result, note in results:
        cells = [name]
        for task, spec in tasks.items():
            value, base = result["headline"][task], reference["headline"][task]
            cells += [_fmt_metric(spec.metric, value), _fmt_diff(spec.metric, value - base)]
        if "depth" in tasks:
            base = reference["headline"]["depth"]
            cells.append(f"{100 * (result['headline']['depth'] - base) / base:+.2f} %")
        cells.append(note)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="saved model folder (make train writes it)")
    parser.add_argument("--dataset", default="synthetic", help="calibration / evaluation source (train / validation)")
    parser.add_argument("--num_calibration_images", type=int, default=64)
    parser.add_argument("--num_validation_images", type=int, default=None, help="default: the whole split")
    parser.add_argument("--sensitivity", action="store_true", help="also the per-block study on the train split")
    parser.add_argument("--sensitivity_images", type=int, default=100, help="training images scored per variant")
    parser.add_argument("--formats", nargs="+", default=["onnx", "openvino"], choices=["onnx", "openvino"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work_dir", default=None, help="where the exports go (default: a temporary folder)")
    parser.add_argument("--output", default=str(OUTPUT))
    args = parser.parse_args(argv)

    import torch

    from ctal_hf import CTALForDenseMultitask, CTALImageProcessor
    from ctal_hf.export.calibration import load_calibration_data
    from ctal_hf.export.quantization import DEFAULT_FLOAT_SCOPES, SENSITIVITY_GROUPS

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} is not a saved model: run `make train` (outputs/ctal-synthetic) or pass --model.")
    model = CTALForDenseMultitask.from_pretrained(model_dir).eval()
    config = model.config
    processor = CTALImageProcessor.from_pretrained(model_dir)
    normalize = bool(getattr(processor, "do_normalize", True))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="ctal-export-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load = os.getloadavg()

    calibration = load_calibration_data(args.dataset, config, processor, args.num_calibration_images, split="train")
    validation = labelled_batches(args.dataset, config, "validation", args.num_validation_images, normalize)
    print(f"calibration: {calibration.describe()}; validation: {len(validation)} images", flush=True)

    exports = {fmt: export_fp32(model, fmt, work / f"{fmt}-fp32") for fmt in args.formats}
    runners = {"onnx": lambda folder: ort_runner(folder, args.threads),
               "openvino": lambda folder: openvino_runner(folder, args.threads)}  # fmt: skip
    lines_sensitivity = []
    if args.sensitivity and "onnx" in exports:
        train = labelled_batches(args.dataset, config, "train", args.sensitivity_images, normalize)
        fp32_train = evaluate(runners["onnx"](exports["onnx"]), train, config)
        study = [("ONNX fp32", fp32_train, "")]
        variants = [("int8, every node", ())] + [(f"int8, {group} in float", scopes)
                                                   for group, scopes in SENSITIVITY_GROUPS.items()]  # fmt: skip
        variants.append(("int8, all CTAL in float", ("decoder.ctal",)))
        for name, scopes in variants:
            report = quantize(exports["onnx"], work / "onnx-study", "onnx", calibration, config, scopes)
            result = evaluate(runners["onnx"](work / "onnx-study"), train, config)
            study.append((name, result, f"{report['float_nodes']} float nodes"))
            print(name, result["headline"], flush=True)
            lines_sensitivity = render_rows(study, config, fp32_train)
            _write(args, config, model_dir, calibration, load, started, [], lines_sensitivity)

    rows = [("eager PyTorch fp32", evaluate(eager_runner(model), validation, config), "reference")]
    print(rows[0][0], rows[0][1]["headline"], flush=True)
    reports = {}
    for fmt, folder in exports.items():
        label = {"onnx": "ONNX Runtime", "openvino": "OpenVINO"}[fmt]
        rows.append((f"{label} fp32", evaluate(runners[fmt](folder), validation, config), f"{file_size_mb(folder):.1f} MB"))
        print(rows[-1][0], rows[-1][1]["headline"], flush=True)
        for variant, scopes in (("int8", None), ("int8, CTAL block float", ("=decoder.ctal",))):
            out = work / f"{fmt}-{variant.replace(', ', '-').replace(' ', '-')}"
            report = quantize(folder, out, fmt, calibration, config, scopes)
            reports[f"{fmt} {variant}"] = {k: v for k, v in report.items() if k != "float_node_names"}
            chosen = ", ".join(report["float_scopes"]) or "none"
            note = f"{file_size_mb(out):.1f} MB; float: {chosen} ({report['float_nodes']} nodes)"
            rows.append((f"{label} {variant}", evaluate(runners[fmt](out), validation, config), note))
            print(rows[-1][0], rows[-1][1]["headline"], flush=True)
        lines = render_rows(rows, config, rows[0][1])
        _write(args, config, model_dir, calibration, load, started, lines, lines_sensitivity, reports)
    print(f"defaults kept in float: {DEFAULT_FLOAT_SCOPES}")
    print(Path(args.output).read_text())
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


def _write(args, config, model_dir, calibration, load, started, lines, lines_sensitivity, reports=None) -> None:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python benchmarks/export_accuracy.py " + " ".join(sys.argv[1:])
    text = [
        "# Exported and int8 models against eager PyTorch",
        "",
        f"`{command}` ({now}, {time.time() - started:.0f} s; load average {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} at the start). Model: `{model_dir}` ({config.decoder}, tasks {', '.join(config.tasks)}, "
        f"image size {'x'.join(map(str, config.image_size))}). Machine: {machine_line(args.threads)}.",
        "",
        f"Calibration: {len(calibration)} images of the {calibration.split} split of `{calibration.source}`, spread "
        "evenly over it; nothing of the validation split is used to calibrate or to choose what stays in float.",
        "",
    ]
    if lines:
        text += ["## Validation split (every headline metric; diff = variant - eager PyTorch fp32)", "", *lines, ""]
        text += [
            "int8 = the default of `ctal-export --quantize int8` (`DEFAULT_FLOAT_SCOPES`: every node int8); int8, "
            "CTAL block float = `--float_scopes =decoder.ctal`. Targets: semseg mIoU within 1 point, depth relative error within 2 % "
            "(relative) of fp32.",
            "",
        ]
    if lines_sensitivity:
        text += [
            "## Sensitivity per block (ONNX Runtime int8, TRAINING split; diff = variant - ONNX fp32)",
            "",
            f"{args.sensitivity_images} training images; every variant quantises the whole graph except the block "
            "named, which stays float.",
            "",
            *lines_sensitivity,
            "",
        ]
    if reports:
        text += ["## Reports of `quantize_exported`", "", "```json", json.dumps(reports, indent=1), "```", ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    write_table(args.output, text)


if __name__ == "__main__":
    main()
