"""The export formats and the runtimes that execute them: `EXPORT_FORMATS` and `RUNTIMES`, the one registry of each.

This module imports neither torch nor a runtime, so `ctal-export` / `ctal-predict` can check a format or runtime
name, and whether its package is installed, before any heavy import."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass

# Written into every exported folder beside the model file, `config.json` and `preprocessor_config.json`.
EXPORT_MANIFEST = "export_manifest.json"


@dataclass(frozen=True)
class CTALExportOptions:
    """What every exporter is given besides the traced program.

    Args:
        tasks: the output names, in output order (one output per task).
        image_size: `[height, width]` of `pixel_values`.
        opset: the ONNX opset (ONNX only).
        dynamic_batch: whether the traced program has a symbolic batch.
    """

    tasks: tuple[str, ...]
    image_size: tuple[int, int]
    opset: int = 18
    dynamic_batch: bool = True


@dataclass(frozen=True)
class CTALRuntimeSpec:
    """One entry of `RUNTIMES`: a runtime that can run exported files.

    Args:
        name: what `--runtime` / `load_exported(runtime=)` takes.
        module: the Python package that must be importable.
        install: how to install it (named in the error when it is missing).
        session: `"module:function"` building the session, `function(model_file, output_names, num_threads)`, a
            callable that maps a float32 `pixel_values` array to `{output name: array}`.
    """

    name: str
    module: str
    install: str
    session: str

    def available(self) -> bool:
        """Whether `module` can be imported (a `sys.modules` entry of `None`, as tests set, counts as missing)."""
        if self.module in sys.modules:
            return sys.modules[self.module] is not None
        try:
            return importlib.util.find_spec(self.module) is not None
        except (ImportError, ValueError):
            return False

    def missing_error(self, purpose: str) -> ImportError:
        return ImportError(
            f"{purpose} needs the {self.name} runtime (Python package `{self.module}`), which is not installed here; "
            f"install it with `{self.install}`."
        )

    def check_available(self, purpose: str) -> None:
        if not self.available():
            raise self.missing_error(purpose)

    def build_session(self, model_file, output_names, num_threads: int | None = None):
        module_name, function = self.session.split(":")
        return getattr(importlib.import_module(module_name), function)(model_file, list(output_names), num_threads)


@dataclass(frozen=True)
class CTALExportFormat:
    """One entry of `EXPORT_FORMATS`.

    Args:
        name: what `--format` / `export_model(format=)` takes.
        model_file: the file the exported folder's model is in (`model.onnx`, ...).
        files: every file of the model (the OpenVINO IR is `model.xml` + `model.bin`).
        runtime: the runtime the export is validated with and `ctal-predict` uses by default.
        runtimes: every runtime that can run `model_file` (OpenVINO also reads ONNX files).
        exporter: `"module:function"` writing the format, `function(program, folder, options) -> dict` (what
            to record in the manifest), from the `torch.export` program of the model.
        needs: the Python packages the export itself needs (beyond torch), with the install hint.
        dynamic_batch: whether the graph gets a dynamic batch by default.
    """

    name: str
    model_file: str
    files: tuple[str, ...]
    runtime: str
    runtimes: tuple[str, ...]
    exporter: str
    needs: tuple[tuple[str, str], ...] = ()
    dynamic_batch: bool = True

    def check_available(self) -> None:
        """Raises an `ImportError` naming the package and the install command when the export cannot run here."""
        for module, install in self.needs:
            spec = CTALRuntimeSpec(module, module, install, "")
            if not spec.available():
                raise ImportError(
                    f"--format {self.name} needs the Python package `{module}`, which is not installed here; install "
                    f"it with `{install}`."
                )
        RUNTIMES[self.runtime].check_available(f"Validating a {self.name} export")

    def export(self, program, folder, options: CTALExportOptions) -> dict:
        module_name, function = self.exporter.split(":")
        return getattr(importlib.import_module(module_name), function)(program, folder, options)


_DEPLOY = "pip install 'ctal-hf[deploy]'"

RUNTIMES: dict[str, CTALRuntimeSpec] = {
    "onnxruntime": CTALRuntimeSpec(
        "onnxruntime", "onnxruntime", _DEPLOY + " (or pip install onnxruntime)", "ctal_hf.export.onnx:ort_session"
    ),
    "openvino": CTALRuntimeSpec(
        "openvino", "openvino", _DEPLOY + " (or pip install openvino)", "ctal_hf.export.openvino:openvino_session"
    ),
    "executorch": CTALRuntimeSpec(
        "executorch",
        "executorch",
        "pip install 'ctal-hf[executorch]'",
        "ctal_hf.export.executorch:executorch_session",
    ),
}

EXPORT_FORMATS: dict[str, CTALExportFormat] = {
    "onnx": CTALExportFormat(
        "onnx",
        "model.onnx",
        ("model.onnx",),
        runtime="onnxruntime",
        runtimes=("onnxruntime", "openvino"),
        exporter="ctal_hf.export.onnx:export_onnx",
        needs=(("onnx", _DEPLOY), ("onnxscript", _DEPLOY)),
    ),
    "openvino": CTALExportFormat(
        "openvino",
        "model.xml",
        ("model.xml", "model.bin"),
        runtime="openvino",
        runtimes=("openvino",),
        exporter="ctal_hf.export.openvino:export_openvino",
        needs=(("openvino", _DEPLOY),),
    ),
    "executorch": CTALExportFormat(
        "executorch",
        "model.pte",
        ("model.pte",),
        runtime="executorch",
        runtimes=("executorch",),
        exporter="ctal_hf.export.executorch:export_executorch",
        needs=(("executorch", "pip install 'ctal-hf[executorch]'"),),
        dynamic_batch=False,
    ),
}

QUANTIZATION_MODES = ("int8",)


def get_format(name: str) -> CTALExportFormat:
    if name not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {name!r}; choose from {', '.join(EXPORT_FORMATS)}.")
    return EXPORT_FORMATS[name]


def get_runtime(name: str) -> CTALRuntimeSpec:
    if name not in RUNTIMES:
        raise ValueError(f"Unknown runtime {name!r}; choose from {', '.join(RUNTIMES)}.")
    return RUNTIMES[name]


__all__ = [
    "CTALExportFormat",
    "CTALExportOptions",
    "CTALRuntimeSpec",
    "EXPORT_FORMATS",
    "EXPORT_MANIFEST",
    "QUANTIZATION_MODES",
    "RUNTIMES",
    "get_format",
    "get_runtime",
]
