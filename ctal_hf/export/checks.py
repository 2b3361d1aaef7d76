"""Argument checks of `export_model` / `ctal-export` that need neither torch nor the model: they run first, so a
mistake is answered at once and nothing is written. Each raises a `ValueError` (or `ImportError` for a missing
package) naming the argument and the fix."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .formats import EXPORT_MANIFEST, QUANTIZATION_MODES, get_format

# What `huggingface_hub` accepts as a repo id: `name` or `namespace/name`.
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$")


def check_export_arguments(
    format: str,
    quantize: str | None,
    calibration_dataset: Any,
    num_calibration_images: int,
    opset: int,
    calibration_given: bool | None = None,
) -> None:
    """Format known and installed, quantisation mode known, calibration data given with `quantize` and only then,
    `num_calibration_images >= 1`, `opset >= 18`. `calibration_given` (the CLI) says whether a calibration flag
    was typed, since `num_calibration_images` has a default."""
    spec = get_format(format)
    if quantize is not None and quantize not in QUANTIZATION_MODES:
        raise ValueError(f"Unknown quantization {quantize!r}; choose from {', '.join(QUANTIZATION_MODES)}.")
    if quantize is None:
        given = calibration_dataset is not None if calibration_given is None else calibration_given
        if given:
            raise ValueError(
                "Calibration data was given without quantization: --calibration_dataset / --num_calibration_images "
                "only apply with --quantize int8 (add it, or drop them for an fp32 export)."
            )
    elif calibration_dataset is None:
        raise ValueError(
            f"--quantize {quantize} needs calibration images: pass --calibration_dataset (a dataset folder, a Hub id "
            "or `synthetic`) from the training split."
        )
    if isinstance(num_calibration_images, bool) or not isinstance(num_calibration_images, int):
        raise ValueError(f"num_calibration_images must be an integer, got {num_calibration_images!r}.")
    if num_calibration_images < 1:
        raise ValueError(f"num_calibration_images must be at least 1, got {num_calibration_images}.")
    if spec.name == "onnx" and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 18):
        raise ValueError(f"opset must be an integer >= 18 (the export uses ONNX opset 18 operators), got {opset!r}.")
    spec.check_available()


def read_model_config(model: str | os.PathLike) -> dict[str, Any] | None:
    """The `config.json` of a local CTAL model folder, or `None` for a Hub id. Refuses a path that is neither, a
    folder that is not a CTAL model, and an exported folder (export the PyTorch folder it came from)."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / EXPORT_MANIFEST).is_file():
            raise ValueError(
                f"--model {text!r} is already an exported folder ({EXPORT_MANIFEST}); export the PyTorch folder "
                "saved with save_pretrained instead."
            )
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"--model {text!r} is a folder without config.json, not a CTAL model; give a folder saved with "
                "save_pretrained."
            )
        try:
            config = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"--model {text!r}: cannot read {config_file} as JSON ({error}).") from None
        if not isinstance(config, dict) or config.get("model_type") != "ctal":
            got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
            raise ValueError(
                f"--model {text!r} is not a CTAL model: its config.json has model_type {got!r}, expected 'ctal'."
            )
        return config
    if path.exists():
        raise ValueError(f"--model {text!r} is a file; give the folder that holds config.json and the weights.")
    looks_like_path = text.startswith((".", "/", "~")) or text.endswith("/") or os.sep + os.sep in text
    if looks_like_path or not _HUB_ID.match(text) or ".." in text or "--" in text:
        raise ValueError(f"--model {text!r}: no such folder (and it is not a Hub model id, `name` or `org/name`).")
    return None


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool, model: Any = None) -> Path:
    """The absolute target folder; refuses a file, an existing non-empty folder unless `overwrite`, and the model
    folder itself (or a folder holding it, or inside it): `--overwrite` would replace the model being exported."""
    from ..atomic_outputs import check_not_source

    target = Path(output_dir).expanduser().absolute()
    if isinstance(model, (str, os.PathLike)):
        check_not_source(target, {"--model": model}, "--output")
    if target.exists() and not target.is_dir():
        raise ValueError(f"--output {os.fspath(output_dir)!r} is a file; give a folder (it is created).")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(
            f"--output {os.fspath(output_dir)!r} exists and is not empty; choose a new folder, or pass --overwrite "
            "(overwrite=True) to replace it."
        )
    base = target.parent
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"--output {os.fspath(output_dir)!r}: {str(base)!r} is a file, so the folder cannot be made.")
    if not os.access(base, os.W_OK):
        raise ValueError(f"--output {os.fspath(output_dir)!r}: {str(base)!r} is not writable.")
    return target


__all__ = ["check_export_arguments", "check_output_dir", "read_model_config"]
