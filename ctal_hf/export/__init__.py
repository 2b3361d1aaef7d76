"""Deployment: export a CTAL model to ONNX, OpenVINO IR or ExecuTorch, validated against eager PyTorch, and run an
exported folder (`ctal-export`, `ctal-predict --model EXPORTED`).

    >>> from ctal_hf.export import export_model, load_exported
    >>> export_model("path/to/model", "exported/", format="onnx")
    >>> model = load_exported("exported/")  # ONNX Runtime
    >>> outputs = model(pixel_values)       # {task: (batch, C, H, W) float32}

Not carried by saved model folders. The import is cheap (no torch, no runtime): names load on first use."""

from typing import TYPE_CHECKING

from ..lazy_imports import lazy_module_attributes

_LAZY_ATTRIBUTES = {
    "export_model": "api",
    "CTALExportResult": "api",
    "load_exported": "runtime",
    "CTALExportedModel": "runtime",
    "CTALExportedPredictor": "runtime",
    "is_exported_folder": "runtime",
    "read_manifest": "runtime",
    "CTALExportValidationError": "validation",
    "FP32_RELATIVE_TOLERANCE": "validation",
    "EXPORT_FORMATS": "formats",
    "EXPORT_MANIFEST": "formats",
    "RUNTIMES": "formats",
}

if TYPE_CHECKING:
    from .api import CTALExportResult, export_model
    from .formats import EXPORT_FORMATS, EXPORT_MANIFEST, RUNTIMES
    from .runtime import CTALExportedModel, CTALExportedPredictor, is_exported_folder, load_exported, read_manifest
    from .validation import FP32_RELATIVE_TOLERANCE, CTALExportValidationError


__getattr__, __dir__ = lazy_module_attributes(__name__, globals(), _LAZY_ATTRIBUTES)


__all__ = [
    "CTALExportResult",
    "CTALExportValidationError",
    "CTALExportedModel",
    "CTALExportedPredictor",
    "EXPORT_FORMATS",
    "EXPORT_MANIFEST",
    "FP32_RELATIVE_TOLERANCE",
    "RUNTIMES",
    "export_model",
    "is_exported_folder",
    "load_exported",
    "read_manifest",
]
