"""Post-training static int8 quantisation of an exported CTAL model, calibrated on training images.

- ONNX: ONNX Runtime's QDQ quantiser (`onnxruntime.quantization.quantize_static`): per-channel int8 weights, uint8
  activations (U8S8, what x86 VNNI / AVX-512 kernels run), MinMax calibration.
- OpenVINO: NNCF's `nncf.quantize` (MIXED preset: symmetric weights, asymmetric activations).

Parts of the graph stay in float by *module scope*: every exported node knows the module that produced it (the
dynamo ONNX exporter's `pkg.torch.onnx.name_scopes` node metadata; OpenVINO's `__module.<path>/...` names when
converted from PyTorch, or the ONNX node names when converted from the ONNX file), so `float_scopes` names modules
of `CTALForDenseMultitask` (`"decoder.ctal.fusion"`, `"backbone"`): a node stays float when its innermost module
is that module or inside it; `"=decoder.ctal"` matches only the module's own operations (for CTAL: the pixel
normalisation, the N x N affinities, the grouped fusion convolution, the diffusion matmuls and the gamma blend),
not its submodules. `DEFAULT_FLOAT_SCOPES` is what `benchmarks/export_accuracy.py --sensitivity` measured on the
training split (docs in benchmarks/results/export_accuracy.md)."""

from __future__ import annotations

import ast
import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .calibration import CTALCalibrationData

logger = logging.getLogger(__name__)

# Module scopes kept in float by default, per format. Measured per block on the training split of the synthetic
# dataset with the model `examples/train.py` writes (benchmarks/export_accuracy.py --sensitivity): no block's int8
# costs more than 0.1 mIoU point, 0.3 % depth error or 0.12 degree of normals, so nothing stays in float by default
# (keeping the CTAL block's own operations in float, `float_scopes=["=decoder.ctal"]`, halves the normals change
# but costs about a fifth more latency on the NYUv2 CTAL-SS model: benchmarks/results/inference.md).
DEFAULT_FLOAT_SCOPES: dict[str, tuple[str, ...]] = {
    "onnx": (),
    "openvino": (),
}
# The model's top-level submodules: where a module path inside an export wrapper starts.
MODEL_CHILDREN = ("backbone", "decoder")
MODEL_CLASS = "CTALForDenseMultitask"
# Block groups of the sensitivity study (module scopes, as `float_scopes` spells them).
SENSITIVITY_GROUPS: dict[str, tuple[str, ...]] = {
    "backbone": ("backbone",),
    "neck (fusion + initial heads)": ("decoder.neck", "decoder.initial_heads", "decoder.fusions"),
    "CTAL projections": ("decoder.ctal.projections",),
    "CTAL values (3x3)": ("decoder.ctal.values",),
    "CTAL affinity + fusion + diffusion": ("=decoder.ctal",),
    "CTAL upsample": ("decoder.ctal.upsample",),
    "final heads": ("decoder.final_heads",),
}
ONNX_FILE = "model.onnx"
OPENVINO_FILES = ("model.xml", "model.bin")


# ------------------------------------------------------------------------------------------------------ scopes
def scope_matches(module_path: str, scopes: Sequence[str]) -> bool:
    """Whether a node whose innermost module is `module_path` (relative to the model, `""` for its own ops) falls
    in one of `scopes` (`"a.b"`: the module and its submodules; `"=a.b"`: the module's own operations only)."""
    for scope in scopes:
        if scope.startswith("="):
            if module_path == scope[1:]:
                return True
        elif scope == "" or module_path == scope or module_path.startswith(scope + "."):
            return True
    return False


def check_float_scopes(model, scopes: Sequence[str]) -> None:
    """Refuses a scope that names no module of `model` (a typo would otherwise quantise everything, silently)."""
    modules = {name for name, _ in model.named_modules() if name}
    unknown = [scope for scope in scopes if scope.lstrip("=") and scope.lstrip("=") not in modules]
    if unknown:
        tops = sorted(name for name in modules if name.count(".") <= 1)
        shown = ", ".join(tops[:12]) + (", ..." if len(tops) > 12 else "")
        raise ValueError(
            f"float_scopes {unknown} match no module of the model, so every node would be quantised; use module "
            f"paths of {type(model).__name__} ('backbone', 'decoder.ctal', '=decoder.ctal' for its own operations), "
            f"e.g. {shown}."
        )


def _relative(path: str) -> str:
    """A module path relative to the model: what follows the wrapper's prefix (`m.decoder.ctal` -> `decoder.ctal`)."""
    parts = path.split(".") if path else []
    for index, part in enumerate(parts):
        if part in MODEL_CHILDREN:
            return ".".join(parts[index:])
    return ""


def onnx_node_scopes(model) -> dict[str, str]:
    """ONNX node name -> module path relative to the model, from the dynamo exporter's metadata."""
    scopes = {}
    for node in model.graph.node:
        meta = {prop.key: prop.value for prop in node.metadata_props}
        names = meta.get("pkg.torch.onnx.name_scopes")
        if names is None:
            continue
        try:
            names = ast.literal_eval(names)
            classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
        except (ValueError, SyntaxError):
            continue
        modules = names[:-1]  # the last entry is the operation; class_hierarchy is aligned with name_scopes
        innermost = modules[-1] if modules else ""
        root = next((i for i, cls in enumerate(classes) if str(cls).endswith(MODEL_CLASS)), None)
        if root is None or root >= len(modules):
            scopes[node.name] = _relative(innermost)
            continue
        prefix = modules[root]
        if innermost == prefix:
            scopes[node.name] = ""
        elif not prefix:
            scopes[node.name] = innermost
        else:
            scopes[node.name] = innermost[len(prefix) + 1 :] if innermost.startswith(prefix + ".") else ""
    return scopes


def openvino_op_scopes(ov_model, onnx_scopes: dict[str, str] | None = None) -> dict[str, str]:
    """OpenVINO op friendly name -> module path relative to the model (`__module.<path>/...` names of a model
    converted from PyTorch; a model converted from ONNX keeps the ONNX node names: `onnx_scopes` maps them)."""
    scopes = {}
    for op in ov_model.get_ordered_ops():
        name = op.get_friendly_name()
        if name.startswith("__module."):
            scopes[name] = _relative(name[len("__module.") :].split("/", 1)[0])
        elif onnx_scopes:
            key = name.split("/", 1)[0]
            if key in onnx_scopes:
                scopes[name] = onnx_scopes[key]
    return scopes


def tag_openvino_scopes(ov_model, program) -> int:
    """Prefixes the friendly names of the ops `openvino.convert_model(program)` made from a `torch.export` program
    with their module path (`__module.<path>/<name>`, the names OpenVINO gives ops converted from an `nn.Module`), read
    from the program's `nn_module_stack`, so that `float_scopes` find them in the IR. Returns how many ops were
    tagged; call it before saving the IR."""
    paths = {}
    # OpenVINO converts the program after decomposing it to core ATen ops: its op names follow the decomposed graph.
    for graph_program in (program, program.run_decompositions()):
        for node in graph_program.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if stack:
                paths.setdefault(node.name, list(stack.values())[-1][0])
    tagged = 0
    for op in ov_model.get_ordered_ops():
        name = op.get_friendly_name()
        if name.startswith("__module."):
            continue
        path = paths.get(name.split("/", 1)[0])
        if path is not None:
            op.set_friendly_name(f"__module.{path}/{name}")
            tagged += 1
    return tagged


# ------------------------------------------------------------------------------------------------------ helpers
def _copy_companions(fp32_dir: Path, output_dir: Path, skip: Sequence[str]) -> None:
    for item in fp32_dir.iterdir():
        if item.name in skip or (output_dir / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(item, output_dir / item.name)
        else:
            shutil.copy2(item, output_dir / item.name)


def _compare(run_fp32: Callable, run_int8: Callable, calibration: CTALCalibrationData, count: int = 4) -> dict:
    """Per-task differences of the int8 model against fp32 on the first `count` calibration images."""
    per_task: dict[str, dict[str, float]] = {}
    for index, batch in enumerate(calibration):
        if index >= count:
            break
        reference, quantized = run_fp32(batch), run_int8(batch)
        for task, ref in reference.items():
            got = quantized[task]
            entry = per_task.setdefault(
                task, {"max_abs_diff": 0.0, "mean_abs_diff": 0.0, "scale": 0.0, "finite": True}
            )
            entry["finite"] = bool(entry["finite"] and np.isfinite(got).all())
            diff = np.abs(got.astype(np.float64) - ref)
            entry["max_abs_diff"] = max(entry["max_abs_diff"], float(np.nanmax(diff)))
            entry["mean_abs_diff"] += float(np.nanmean(diff)) / min(count, len(calibration))
            entry["scale"] = max(entry["scale"], float(np.abs(ref).max()))
    bad = [task for task, entry in per_task.items() if not entry["finite"]]
    if bad:
        raise ValueError(
            f"The int8 model gives non-finite outputs for {bad} on calibration images; keep more of the graph in "
            "float (float_scopes=) or calibrate on more images."
        )
    return per_task


def _ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_runner(session) -> Callable:
    names = [output.name for output in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    return lambda batch: dict(zip(names, session.run(None, {input_name: batch}), strict=True))


# ------------------------------------------------------------------------------------------------------ ONNX
def quantize_onnx(
    fp32_path: Path,
    output_path: Path,
    calibration: CTALCalibrationData,
    float_scopes: Sequence[str],
    calibrate_method: str = "minmax",
) -> dict[str, Any]:
    """ORT QDQ int8 of `fp32_path` into `output_path`; returns the node counts and the nodes kept in float."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}  # fmt: skip
    if calibrate_method not in methods:
        raise ValueError(f"calibrate_method {calibrate_method!r}: choose from {sorted(methods)}.")
    with tempfile.TemporaryDirectory(prefix="ctal-quantize-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        # Shape inference only: ORT's optimisation pass would drop the node metadata that holds the module scopes
        # (the session fuses Conv + QDQ at load time anyway).
        quant_pre_process(str(fp32_path), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
        model = onnx.load(str(prepared))
        scopes = onnx_node_scopes(model) or onnx_node_scopes(onnx.load(str(fp32_path), load_external_data=False))
        if not scopes and float_scopes:
            logger.warning(
                f"{fp32_path} carries no module scopes (not written by torch.onnx.export(dynamo=True)): every "
                "node is quantised."
            )
        excluded = sorted(name for name, path in scopes.items() if scope_matches(path, float_scopes))
        input_name = model.graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.batches = iter(calibration)

            def get_next(self):
                batch = next(self.batches, None)
                return None if batch is None else {input_name: batch}

        quantize_static(
            str(prepared), str(output_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
            calibrate_method=methods[calibrate_method],
            extra_options={"CalibTensorRangeSymmetric": False, "ActivationSymmetric": False},
        )  # fmt: skip
    quantized = onnx.load(str(output_path), load_external_data=False)
    ops = [node.op_type for node in quantized.graph.node]
    return {
        "float_nodes": len(excluded),
        "excluded_nodes": excluded,
        "quantized_nodes": ops.count("DequantizeLinear"),
        "nodes": len(model.graph.node),
    }


# ------------------------------------------------------------------------------------------------------ OpenVINO
def quantize_openvino(
    fp32_xml: Path,
    output_xml: Path,
    calibration: CTALCalibrationData,
    float_scopes: Sequence[str],
    onnx_scopes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """NNCF int8 of the OpenVINO IR `fp32_xml` into `output_xml`."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(fp32_xml))
    scopes = openvino_op_scopes(model, onnx_scopes)
    if not scopes and float_scopes:
        logger.warning(f"{fp32_xml}: its op names carry no module scopes: every op is quantised.")
    excluded = sorted(name for name, path in scopes.items() if scope_matches(path, float_scopes))
    ignored = nncf.IgnoredScope(names=excluded, validate=False) if excluded else nncf.IgnoredScope()
    input_name = model.inputs[0].get_any_name()
    dataset = nncf.Dataset(list(calibration), lambda batch: {input_name: batch})
    quantized = nncf.quantize(
        model, dataset, preset=nncf.QuantizationPreset.MIXED, subset_size=len(calibration), ignored_scope=ignored
    )
    ov.save_model(quantized, str(output_xml), compress_to_fp16=False)
    fake_quantize = sum(1 for op in quantized.get_ordered_ops() if op.get_type_name() == "FakeQuantize")
    return {
        "float_nodes": len(excluded),
        "excluded_nodes": excluded,
        "quantized_nodes": fake_quantize,
        "nodes": len(model.get_ordered_ops()),
    }


def _openvino_runner(xml: Path, threads: int | None = None) -> Callable:
    import openvino as ov

    core = ov.Core()
    properties = {"INFERENCE_PRECISION_HINT": "f32"}  # no bf16 on AMX CPUs: compare like with like
    if threads:
        properties["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(core.read_model(str(xml)), "CPU", properties)
    names = [output.get_any_name() for output in compiled.outputs]

    def run(batch):
        result = compiled(batch)
        return {name: np.asarray(result[output]) for name, output in zip(names, compiled.outputs, strict=True)}

    return run


# ------------------------------------------------------------------------------------------------------ entry
def quantize_exported(
    format: str,
    fp32_dir: str | Path,
    output_dir: str | Path,
    calibration: CTALCalibrationData,
    config=None,
    *,
    float_scopes: Sequence[str] | None = None,
    calibrate_method: str = "minmax",
    compare_images: int = 4,
) -> dict[str, Any]:
    """Quantises the fp32 export in `fp32_dir` to int8 into `output_dir` (the same file names; the other files of
    `fp32_dir`, config.json and preprocessor_config.json, are copied unless `output_dir` has them) and returns a
    report: the scheme, the calibration data, the scopes and node counts kept in float, and per task the
    differences to the fp32 export on the first `compare_images` calibration images (a non-finite int8 output is
    a `ValueError`).

    Args:
        format: `"onnx"` or `"openvino"`.
        calibration: from `load_calibration_data` (training images at the model's size).
        config: the model's config (checked against the calibration images' size when given).
        float_scopes: module scopes kept in float (see the module docstring); default `DEFAULT_FLOAT_SCOPES`.
        calibrate_method: ONNX only: `"minmax"`, `"percentile"` or `"entropy"`.
    """
    fp32_dir, output_dir = Path(fp32_dir), Path(output_dir)
    if format not in DEFAULT_FLOAT_SCOPES:
        raise ValueError(f"Cannot quantise format {format!r}: int8 is available for {sorted(DEFAULT_FLOAT_SCOPES)}.")
    if not isinstance(calibration, CTALCalibrationData) or len(calibration) == 0:
        raise ValueError("calibration must be a non-empty CTALCalibrationData (ctal_hf.export.load_calibration_data).")
    if config is not None and tuple(calibration.image_size) != tuple(int(v) for v in config.image_size):
        raise ValueError(
            f"Calibration images are {calibration.image_size}, the model's image_size is {list(config.image_size)}: "
            "prepare them with the model's image processor (load_calibration_data)."
        )
    scopes = tuple(DEFAULT_FLOAT_SCOPES[format] if float_scopes is None else float_scopes)
    output_dir.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        source = fp32_dir / ONNX_FILE
        if not source.is_file():
            raise FileNotFoundError(f"{fp32_dir} has no {ONNX_FILE} to quantise (an ONNX export writes it).")
        counts = quantize_onnx(source, output_dir / ONNX_FILE, calibration, scopes, calibrate_method)
        run_fp32, run_int8 = _ort_runner(_ort_session(source)), _ort_runner(_ort_session(output_dir / ONNX_FILE))
        scheme = ("ONNX Runtime QDQ, per-channel int8 weights, uint8 activations, "
                  f"{calibrate_method} calibration")  # fmt: skip
        skip = (ONNX_FILE, ONNX_FILE + ".data")
    else:
        source = fp32_dir / OPENVINO_FILES[0]
        if not source.is_file():
            raise FileNotFoundError(
                f"{fp32_dir} has no {OPENVINO_FILES[0]} to quantise (an OpenVINO export writes it)."
            )
        onnx_scopes = None
        if (fp32_dir / ONNX_FILE).is_file():  # an IR converted from the ONNX file keeps its node names
            import onnx

            onnx_scopes = onnx_node_scopes(onnx.load(str(fp32_dir / ONNX_FILE), load_external_data=False))
        counts = quantize_openvino(source, output_dir / OPENVINO_FILES[0], calibration, scopes, onnx_scopes)
        run_fp32, run_int8 = _openvino_runner(source), _openvino_runner(output_dir / OPENVINO_FILES[0])
        scheme = "NNCF post-training int8 (MIXED preset: symmetric weights, asymmetric activations)"
        skip = OPENVINO_FILES
    _copy_companions(fp32_dir, output_dir, skip)
    per_task = _compare(run_fp32, run_int8, calibration, compare_images)
    excluded = counts.pop("excluded_nodes")
    logger.info(f"int8 {format}: {counts['float_nodes']} nodes kept in float ({', '.join(scopes) or 'none'}).")
    return {
        "format": format,
        "quantize": "int8",
        "scheme": scheme,
        "calibration": calibration.describe(),
        "float_scopes": list(scopes),
        **counts,
        "float_node_names": excluded,
        "per_task": per_task,
    }


__all__ = [
    "DEFAULT_FLOAT_SCOPES",
    "SENSITIVITY_GROUPS",
    "check_float_scopes",
    "onnx_node_scopes",
    "openvino_op_scopes",
    "quantize_exported",
    "quantize_onnx",
    "quantize_openvino",
    "scope_matches",
    "tag_openvino_scopes",
]
