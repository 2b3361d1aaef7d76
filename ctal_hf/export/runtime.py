"""Running an exported folder: `load_exported(folder)` gives a callable `pixel_values -> {task: array}` on the
folder's runtime, and `CTALExportedPredictor` runs it on image files with the same pre- and post-processing as
`pipeline("dense-multitask")` (`ctal_hf.pipeline_ctal.postprocess_predictions`), which `ctal-predict` uses."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .formats import EXPORT_FORMATS, EXPORT_MANIFEST, get_runtime


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The export manifest of `folder`; a `ValueError` names what is missing or unreadable."""
    path = Path(folder).expanduser()
    manifest_file = path / EXPORT_MANIFEST
    if not manifest_file.is_file():
        raise ValueError(f"{os.fspath(folder)!r} is not an exported CTAL folder: it has no {EXPORT_MANIFEST}.")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read {manifest_file} as JSON ({error}).") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in EXPORT_FORMATS:
        raise ValueError(f"{manifest_file} names no known export format (one of {', '.join(EXPORT_FORMATS)}).")
    return manifest


def is_exported_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder).expanduser() / EXPORT_MANIFEST).is_file()


def choose_runtime(manifest: dict[str, Any], runtime: str | None) -> str:
    """`runtime`, checked against the runtimes that can run the folder's file and installed; by default the one
    the export was validated with."""
    runtimes = list(manifest.get("runtimes") or [manifest["runtime"]])
    name = manifest["runtime"] if runtime is None else runtime
    get_runtime(name)
    if name not in runtimes:
        raise ValueError(
            f"--runtime {name} cannot run this {manifest['format']} export; it runs with {', '.join(runtimes)}."
        )
    get_runtime(name).check_available(f"Running this {manifest['format']} export")
    return name


class CTALExportedModel:
    """An exported CTAL model on its runtime: `model(pixel_values) -> {task: array}`.

    `pixel_values` is float32 `(batch, 3, H, W)` at `config.image_size`, as `image_processor` prepares it; the
    outputs are the final predictions in the layout of `CTALForDenseMultitask(...).predictions` (class logits,
    regression values, normals, binary logits), `(batch, channels, H, W)` float32.

    Attributes: `tasks`, `runtime`, `config` (`CTALConfig`), `image_processor` (`CTALImageProcessor`), `manifest`,
    `folder`, `model_file`."""

    def __init__(self, folder: str | os.PathLike, runtime: str | None = None, num_threads: int | None = None):
        from ..configuration_ctal import CTALConfig
        from ..image_processing_ctal import CTALImageProcessor

        self.folder = Path(folder).expanduser().absolute()
        self.manifest = read_manifest(self.folder)
        self.runtime = choose_runtime(self.manifest, runtime)
        self.format = self.manifest["format"]
        self.model_file = self.folder / self.manifest.get("model_file", EXPORT_FORMATS[self.format].model_file)
        missing = [
            name for name in self.manifest.get("files", [self.model_file.name]) if not (self.folder / name).is_file()
        ]
        if missing:
            raise ValueError(f"Exported folder {str(self.folder)!r} lacks {', '.join(missing)}; export it again.")
        self.config = CTALConfig.from_pretrained(self.folder)
        if (self.folder / "preprocessor_config.json").is_file():
            self.image_processor = CTALImageProcessor.from_pretrained(self.folder)
        else:
            self.image_processor = CTALImageProcessor.from_model_config(self.config)
        self.tasks = list(self.manifest.get("outputs") or self.config.tasks)
        self.dynamic_batch = bool(self.manifest.get("dynamic_batch", False))
        self._check_sizes()
        try:
            self.session = get_runtime(self.runtime).build_session(self.model_file, self.tasks, num_threads)
        except (ImportError, MemoryError):
            raise
        except Exception as error:  # noqa: BLE001 - each runtime has its own exception types for a bad file
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise ValueError(
                f"{self.runtime} cannot load {str(self.model_file)!r} ({first}): the file is truncated, corrupt or not "
                f"a valid {self.format} model file. Export the model again with ctal-export."
            ) from None

    def _check_sizes(self) -> None:
        """config.json, preprocessor_config.json and the manifest's input shape must agree on the image size (the
        graph is fixed to the one it was exported at)."""
        config_size = [int(side) for side in self.config.image_size]
        shape = ((self.manifest.get("inputs") or {}).get("pixel_values") or {}).get("shape")
        if isinstance(shape, list) and len(shape) == 4 and [int(side) for side in shape[-2:]] != config_size:
            raise ValueError(
                f"Exported folder {str(self.folder)!r}: config.json has image_size {config_size} but the model file "
                f"was exported for {list(shape[-2:])} ({EXPORT_MANIFEST}); config.json was edited: restore it, or "
                "export the model again at the new size."
            )
        size = self.image_processor.size
        if [size.height, size.width] != config_size:
            raise ValueError(
                f"Exported folder {str(self.folder)!r}: preprocessor_config.json resizes to {[size.height, size.width]}"
                f" but config.json has image_size {config_size}; restore the files written by ctal-export."
            )

    def __call__(self, pixel_values) -> dict[str, np.ndarray]:
        if hasattr(pixel_values, "detach"):
            pixel_values = pixel_values.detach().cpu().numpy()
        pixel_values = np.asarray(pixel_values, dtype=np.float32)
        expected = tuple(int(side) for side in self.config.image_size)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or tuple(pixel_values.shape[-2:]) != expected:
            raise ValueError(
                f"`pixel_values` must be (batch, 3, {expected[0]}, {expected[1]}) float32 (the exported model is tied "
                f"to image_size {list(expected)}), got {pixel_values.shape}; prepare images with its image_processor."
            )
        if self.dynamic_batch or pixel_values.shape[0] == 1:
            return self.session(pixel_values)
        parts = [self.session(pixel_values[index : index + 1]) for index in range(pixel_values.shape[0])]
        return {task: np.concatenate([part[task] for part in parts]) for task in self.tasks}

    def __repr__(self) -> str:
        return f"CTALExportedModel({str(self.folder)!r}, format={self.format!r}, runtime={self.runtime!r})"


def load_exported(
    folder: str | os.PathLike, runtime: str | None = None, num_threads: int | None = None
) -> CTALExportedModel:
    """Loads an exported folder on `runtime` (default: the one it was validated with; `onnx` folders also run on
    `openvino`). `num_threads` sets the runtime's intra-op threads."""
    return CTALExportedModel(folder, runtime=runtime, num_threads=num_threads)


class CTALExportedPredictor:
    """Image files in, per image `{task: map at the image's size, "visualizations": {task: PIL image}}` out, like
    `pipeline("dense-multitask")`, on an exported model. Pre-processing is the folder's image processor and the
    post-processing is the pipeline's own (`postprocess_predictions`)."""

    def __init__(self, model: CTALExportedModel):
        self.model = model
        self.image_processor = model.image_processor
        self.task_objects = model.config.get_tasks()

    def __call__(
        self, images: Sequence[Any], batch_size: int = 1, tasks: Sequence[str] | None = None, visualize: bool = True
    ) -> list[dict[str, Any]]:
        import torch

        from ..image_processing_ctal import load_image
        from ..pipeline_ctal import postprocess_predictions

        if tasks is not None:
            unknown = [task for task in tasks if task not in self.model.tasks]
            if unknown:
                raise ValueError(f"Task(s) {unknown} requested, but this model predicts only {self.model.tasks}.")
        results = []
        for start in range(0, len(images), batch_size):
            rgbs = []
            for image in images[start : start + batch_size]:
                if isinstance(image, (str, os.PathLike)):
                    image = load_image(image)
                rgbs.append(self.image_processor.process_image(image))
            pixel_values = torch.cat([self.image_processor(rgb, return_tensors="pt")["pixel_values"] for rgb in rgbs])
            outputs = self.model(pixel_values.numpy())
            for index, rgb in enumerate(rgbs):
                predictions = {task: torch.from_numpy(value[index : index + 1]) for task, value in outputs.items()}
                results.append(
                    postprocess_predictions(
                        predictions,
                        tuple(int(side) for side in rgb.shape[-2:]),
                        self.image_processor,
                        self.task_objects,
                        tasks=tasks,
                        visualize=visualize,
                    )
                )
        return results


__all__ = [
    "CTALExportedModel",
    "CTALExportedPredictor",
    "choose_runtime",
    "is_exported_folder",
    "load_exported",
    "read_manifest",
]
