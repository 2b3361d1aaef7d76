"""OpenVINO IR: `openvino.convert_model` of the `torch.export` program, saved as `model.xml` + `model.bin` with
float32 weights, and an OpenVINO CPU session that runs in float32 (the CPU plugin would otherwise pick bf16 on CPUs
with AMX, which the fp32 check would rightly fail)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .formats import CTALExportOptions

logger = logging.getLogger(__name__)

# Asked of the CPU plugin for every fp32 run (export check and ctal-predict).
FP32_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def export_openvino(program, folder: Path, options: CTALExportOptions) -> dict:
    import openvino as ov

    from .quantization import tag_openvino_scopes

    ov_model = ov.convert_model(program)
    tag_openvino_scopes(ov_model, program)  # module paths in the op names, so int8 can keep scopes in float
    name_ports(ov_model, options.tasks)
    ov.save_model(ov_model, str(Path(folder) / "model.xml"), compress_to_fp16=False)
    return {"converter": f"openvino.convert_model (OpenVINO {ov.get_version()})", "weights": "float32"}


def name_ports(ov_model, tasks) -> None:
    """Input `pixel_values`, outputs named by task (in order), as in the ONNX export."""
    if len(ov_model.inputs) != 1 or len(ov_model.outputs) != len(tasks):
        raise RuntimeError(
            f"The OpenVINO model has {len(ov_model.inputs)} input(s) and {len(ov_model.outputs)} output(s); expected "
            f"1 and one per task {list(tasks)}."
        )
    ov_model.inputs[0].get_tensor().set_names({"pixel_values"})
    for output, task in zip(ov_model.outputs, tasks, strict=True):
        output.get_tensor().set_names({task})


class CTALOpenVINOSession:
    """An OpenVINO CPU session in float32 (`FP32_CONFIG`): `session(pixel_values) -> {output name: array}`. Reads
    an IR (`model.xml`) or an ONNX file."""

    def __init__(self, model_file, output_names, num_threads: int | None = None, config: dict | None = None):
        import openvino as ov

        core = ov.Core()
        settings = dict(FP32_CONFIG if config is None else config)
        if num_threads is not None:
            settings["INFERENCE_NUM_THREADS"] = int(num_threads)
        ov_model = core.read_model(str(model_file))
        self.output_names = list(output_names)
        names = [next(iter(output.get_names()), None) for output in ov_model.outputs]
        self._order = [names.index(task) if task in names else index for index, task in enumerate(self.output_names)]
        self.compiled = core.compile_model(ov_model, "CPU", settings)
        self.version = ov.get_version()

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        request = self.compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(pixel_values, np.float32)})
        outputs = [request.get_output_tensor(index).data.copy() for index in self._order]
        return dict(zip(self.output_names, outputs, strict=True))


def openvino_session(model_file, output_names, num_threads: int | None = None) -> CTALOpenVINOSession:
    return CTALOpenVINOSession(model_file, output_names, num_threads)


__all__ = ["CTALOpenVINOSession", "FP32_CONFIG", "export_openvino", "name_ports", "openvino_session"]
