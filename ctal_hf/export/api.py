"""`export_model`: a CTAL model (folder, Hub id or model object) -> a folder an edge runtime runs, checked against
eager PyTorch before it is written.

The folder holds the model file of the format (`model.onnx`, `model.xml` + `model.bin`, `model.pte`),
`config.json`, `preprocessor_config.json` (the model's image processor, so inputs are prepared as in training) and
`export_manifest.json` (format, runtime, opset, the CTAL attention form in the graph, the validation differences,
and the int8 report). It is written to a temporary folder beside `output_dir` and moved into place at the end."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic_outputs import OutputLock, replace_folder, staging_dir
from .checks import check_export_arguments, check_output_dir, read_model_config
from .formats import EXPORT_MANIFEST, RUNTIMES, CTALExportOptions, get_format

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


@dataclass
class CTALExportResult:
    """What `export_model` wrote.

    Args:
        output_dir: the exported folder.
        format: `onnx`, `openvino` or `executorch`.
        runtime: the runtime it was validated with (and `ctal-predict` uses by default).
        model_file: the model file inside `output_dir`.
        manifest: the content of `export_manifest.json`.
    """

    output_dir: Path
    format: str
    runtime: str
    model_file: Path
    manifest: dict[str, Any]

    @property
    def validation(self) -> dict[str, dict[str, dict]]:
        """`{input: {task: {max_abs_diff, scale, relative, finite}}}` against eager PyTorch."""
        return self.manifest["validation"]["results"]

    @property
    def quantization(self) -> dict | None:
        return self.manifest.get("quantization")


def _load(model, revision: str | None, trust_remote_code: bool, image_processor):
    """(model, image processor, source description) for a model object, a folder or a Hub id."""
    from ..image_processing_ctal import CTALImageProcessor
    from ..modeling_ctal import CTALForDenseMultitask

    if hasattr(model, "config") and hasattr(model, "forward"):
        if getattr(model.config, "model_type", None) != "ctal":
            raise ValueError(
                f"export_model exports CTAL models; got a {type(model).__name__} with model_type "
                f"{getattr(model.config, 'model_type', None)!r}."
            )
        processor = image_processor or CTALImageProcessor.from_model_config(model.config)
        return model, processor, f"in-memory {type(model).__name__}"
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a folder, a Hub id or a CTALForDenseMultitask, got {type(model).__name__}.")
    hub = {"revision": revision}
    if trust_remote_code:
        hub["trust_remote_code"] = True
    try:
        loaded = CTALForDenseMultitask.from_pretrained(os.fspath(model), **hub)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load --model {os.fspath(model)!r}: {first_line}") from None
    if image_processor is None:
        try:
            image_processor = CTALImageProcessor.from_pretrained(os.fspath(model), revision=revision)
        except (OSError, ValueError):
            logger.info("No preprocessor_config.json with the model: building CTALImageProcessor from its config.")
            image_processor = CTALImageProcessor.from_model_config(loaded.config)
    return loaded, image_processor, os.fspath(model)


def _check_processor(processor, config) -> None:
    size = getattr(processor, "size", None)
    got = [getattr(size, "height", None), getattr(size, "width", None)]
    if got != list(config.image_size):
        raise ValueError(
            f"The image processor resizes to {got} but the model takes image_size {list(config.image_size)}; pass "
            "image_processor=CTALImageProcessor.from_model_config(config)."
        )


@contextlib.contextmanager
def _inference_copy(model):
    """The model in eval mode and float32 for the export (a float32 copy of a reduced-precision model); the
    caller's model gets its training mode back."""
    import torch

    if model.dtype != torch.float32:
        logger.warning("The model is %s: exporting a float32 copy (fp32 export).", model.dtype)
        model = copy.deepcopy(model).float()
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def _eager_runner(wrapper):
    import torch

    def run(pixel_values):
        with torch.no_grad():
            outputs = wrapper(torch.from_numpy(pixel_values))
        return {task: value.detach().float().cpu().numpy() for task, value in zip(wrapper.tasks, outputs, strict=True)}

    return run


def _versions(runtime: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from .. import __version__

    found = {"ctal_hf": __version__, "torch": torch.__version__}
    for package in {"onnxruntime": "onnxruntime", "openvino": "openvino", "executorch": "executorch"}[runtime], "onnx":
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def _move_into_place(staging: Path, target: Path) -> None:
    """Replaces `target` (absent, empty, or to be overwritten) with `staging` by renames on one file system."""
    replace_folder(staging, target)


def _staging_dir(target: Path, purpose: str) -> Path:
    return staging_dir(target, f"export-{purpose}")


def export_model(
    model,
    output_dir: str | os.PathLike,
    *,
    format: str = "onnx",
    quantize: str | None = None,
    calibration_dataset: Any = None,
    num_calibration_images: int = 64,
    float_scopes: Sequence[str] | None = None,
    validate: bool = True,
    opset: int = 18,
    dynamic_batch: bool | None = None,
    overwrite: bool = False,
    ignore_lock: bool = False,
    image_processor=None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> CTALExportResult:
    """Exports a CTAL model to `output_dir` and checks it against eager PyTorch.

    Args:
        model: a folder saved with `save_pretrained`, a Hub id, or a `CTALForDenseMultitask` (not modified).
        output_dir: the folder to write (refused if it exists and is not empty, unless `overwrite`).
        format: `"onnx"` (ONNX Runtime), `"openvino"` (IR, OpenVINO) or `"executorch"` (`.pte`, XNNPACK).
        quantize: `None` (float32) or `"int8"` (post-training static quantisation; needs `calibration_dataset`).
        calibration_dataset: images of the TRAINING split to calibrate int8 on (a dataset folder, a Hub id,
            `"synthetic"`, a `datasets.Dataset`, or prepared `pixel_values`); see `calibration.load_calibration_data`.
        num_calibration_images: how many calibration images to read.
        float_scopes: int8 only: module scopes kept in float (`"backbone"`, `"decoder.ctal"` with its submodules,
            `"=decoder.ctal"` for its own operations only); default `quantization.DEFAULT_FLOAT_SCOPES` (none).
        validate: run the exported model on a dummy input and a synthetic scene and compare every task with eager
            PyTorch (fp32: within 1e-4 x the output's scale; int8: reported, fails only on non-finite outputs).
        opset: ONNX opset (>= 18).
        dynamic_batch: a symbolic batch dimension (default: the format's, True except for ExecuTorch). A graph that
            cannot keep it is exported at batch 1, and the manifest says why.
        ignore_lock: write `output_dir` even while another run holds its lock file (`ctal_hf.atomic_outputs`).
        image_processor: the processor saved with the export (default: the model folder's, or one built from the
            config).

    Returns:
        `CTALExportResult`. Raises `ValueError` for bad arguments before anything is loaded or written,
        `ImportError` naming the package when the format's runtime is missing, and `CTALExportValidationError`
        naming the task and the difference when the exported model does not match; a failed export leaves
        nothing behind.
    """
    check_export_arguments(format, quantize, calibration_dataset, num_calibration_images, opset)
    if float_scopes is not None and quantize is None:
        raise ValueError("float_scopes only applies with quantize='int8' (add it, or drop float_scopes).")
    spec = get_format(format)
    if isinstance(model, (str, os.PathLike)):
        read_model_config(model)
    target = check_output_dir(output_dir, overwrite, model)
    with OutputLock(target, ignore_lock=ignore_lock, target_flag="--output"):
        return _export(
            model, target, spec, quantize, calibration_dataset, num_calibration_images, float_scopes, validate, opset,
            dynamic_batch, image_processor, revision, trust_remote_code,
        )  # fmt: skip


def _export(
    model, target, spec, quantize, calibration_dataset, num_calibration_images, float_scopes, validate, opset,
    dynamic_batch, image_processor, revision, trust_remote_code,
) -> CTALExportResult:  # fmt: skip
    dynamic = spec.dynamic_batch if dynamic_batch is None else bool(dynamic_batch)

    loaded, processor, source = _load(model, revision, trust_remote_code, image_processor)
    _check_processor(processor, loaded.config)
    if float_scopes:
        from .quantization import check_float_scopes

        check_float_scopes(loaded, float_scopes)
    calibration = None
    if quantize is not None:
        from .calibration import load_calibration_data

        calibration = load_calibration_data(calibration_dataset, loaded.config, processor, num_calibration_images)

    staging = _staging_dir(target, "out")
    fp32_dir = staging if quantize is None else _staging_dir(target, "fp32")
    try:
        with _inference_copy(loaded) as inference_model:
            manifest = _export_fp32(inference_model, processor, spec, fp32_dir, opset, dynamic, validate, source)
            if quantize is not None:
                manifest = _quantize(
                    inference_model, processor, spec, fp32_dir, staging, calibration, manifest, float_scopes
                )
        (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if fp32_dir != staging:
            shutil.rmtree(fp32_dir, ignore_errors=True)
    logger.info("Exported %s to %s (%s, validated with %s).", source, target, spec.name, spec.runtime)
    return CTALExportResult(target, spec.name, spec.runtime, target / spec.model_file, manifest)


def _export_fp32(model, processor, spec, folder: Path, opset: int, dynamic: bool, validate: bool, source: str):
    from .exportable import CTALExportWrapper, export_attention, trace_model
    from .validation import FP32_RELATIVE_TOLERANCE, validate_export, validation_inputs

    config = model.config
    wrapper = CTALExportWrapper(model).eval()
    with export_attention(model, dynamic) as plan:
        program, dynamic_used, dynamic_note = trace_model(wrapper, config.image_size, dynamic)
    options = CTALExportOptions(tuple(config.tasks), tuple(config.image_size), opset, dynamic_used)
    format_info = spec.export(program, folder, options)
    # The JSON files only: `save_pretrained` would also copy the model's Python files (remote code), which an
    # exported folder does not run.
    config.to_json_file(folder / "config.json")
    processor.to_json_file(folder / "preprocessor_config.json")
    height, width = (int(side) for side in config.image_size)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "format": spec.name,
        "model_file": spec.model_file,
        "files": list(spec.files),
        "runtime": spec.runtime,
        "runtimes": list(spec.runtimes),
        "precision": "fp32",
        "inputs": {"pixel_values": {"shape": ["batch" if dynamic_used else 1, 3, height, width], "dtype": "float32"}},
        "outputs": list(config.tasks),
        "output_layout": "final predictions (batch, channels, H, W), as CTALForDenseMultitask(...).predictions",
        "dynamic_batch": dynamic_used,
        "dynamic_batch_note": dynamic_note,
        "attention": plan.describe(),
        **format_info,
        "source": source,
        "versions": _versions(spec.runtime),
    }
    if validate:
        session = RUNTIMES[spec.runtime].build_session(folder / spec.model_file, config.tasks)
        inputs = validation_inputs(config, processor, dynamic_used)
        report = validate_export(_eager_runner(wrapper), session, inputs, "fp32", label=f"{spec.name} export")
        manifest["validation"] = {
            "runtime": spec.runtime,
            "precision": "fp32",
            "tolerance": f"max |exported - eager| <= {FP32_RELATIVE_TOLERANCE:g} x scale",
            "scale": "max |eager output| of the task on that input",
            "results": report,
        }
    else:
        manifest["validation"] = {"runtime": spec.runtime, "skipped": True, "results": {}}
    return manifest


def _quantize(
    model, processor, spec, fp32_dir: Path, staging: Path, calibration, manifest: dict, float_scopes=None
) -> dict:
    from .exportable import CTALExportWrapper
    from .quantization import quantize_exported
    from .validation import validate_export, validation_inputs

    config = model.config
    report = quantize_exported(spec.name, fp32_dir, staging, calibration, config, float_scopes=float_scopes)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy2(fp32_dir / name, staging / name)
    manifest = {**manifest, "precision": "int8", "fp32_validation": manifest["validation"], "quantization": report}
    session = RUNTIMES[spec.runtime].build_session(staging / spec.model_file, config.tasks)
    inputs = validation_inputs(config, processor, manifest["dynamic_batch"])
    wrapper = CTALExportWrapper(model).eval()
    results = validate_export(_eager_runner(wrapper), session, inputs, "int8", label=f"int8 {spec.name} export")
    manifest["validation"] = {
        "runtime": spec.runtime,
        "precision": "int8",
        "tolerance": "reported only; fails on non-finite outputs",
        "scale": "max |eager output| of the task on that input",
        "results": results,
    }
    return manifest


__all__ = ["CTALExportResult", "export_model"]
