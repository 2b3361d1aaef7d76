"""ONNX: `torch.onnx.export` of the `torch.export` program (the dynamo exporter, opset >= 18), and an ONNX Runtime
session for the exported file. docs/design.md ("Export") says why this route and not optimum-onnx."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .formats import CTALExportOptions

logger = logging.getLogger(__name__)

MIN_OPSET = 18


def export_onnx(program, folder: Path, options: CTALExportOptions) -> dict:
    """Writes `folder / "model.onnx"` (one file: weights inside) with input `pixel_values` and one output per
    task; returns the manifest entries (opset, exporter, ONNX IR version)."""
    import onnx
    import torch

    if options.opset < MIN_OPSET:
        raise ValueError(f"opset {options.opset} is too old: the export needs ONNX opset >= {MIN_OPSET}.")
    path = Path(folder) / "model.onnx"
    onnx_program = torch.onnx.export(
        program,
        (),
        opset_version=options.opset,
        input_names=["pixel_values"],
        output_names=list(options.tasks),
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    onnx_program.save(str(path), external_data=False)
    proto = onnx.load(str(path), load_external_data=False)
    names = [output.name for output in proto.graph.output]
    if names != list(options.tasks):
        raise RuntimeError(f"The ONNX graph's outputs are {names}, expected one per task {list(options.tasks)}.")
    opset = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), options.opset)
    return {"opset": int(opset), "exporter": f"torch.onnx.export(dynamo=True) torch {torch.__version__}"}


class CTALOrtSession:
    """An ONNX Runtime CPU session: `session(pixel_values) -> {output name: array}`."""

    def __init__(self, model_file, output_names, num_threads: int | None = None, graph_optimization: str = "all"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        options.graph_optimization_level = levels[graph_optimization]
        self.session = ort.InferenceSession(str(model_file), sess_options=options, providers=["CPUExecutionProvider"])
        self.output_names = list(output_names)
        self.version = ort.__version__

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {"pixel_values": np.ascontiguousarray(pixel_values, np.float32)})
        return dict(zip(self.output_names, outputs, strict=True))


def ort_session(model_file, output_names, num_threads: int | None = None) -> CTALOrtSession:
    return CTALOrtSession(model_file, output_names, num_threads)


__all__ = ["CTALOrtSession", "MIN_OPSET", "export_onnx", "ort_session"]
