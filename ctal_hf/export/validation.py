"""The check every export runs: the exported model against eager PyTorch, task by task, on two inputs.

Inputs: `dummy` (seeded standard-normal `pixel_values`, batch 2 when the graph has a dynamic batch, so the batch
dimension is exercised) and `scene` (a rendered synthetic scene, `dataset_scripts.synthetic.render_scene`, prepared
by the model's own image processor: a real-looking image with edges, flat regions and the statistics of
normalised photos).

Per task and input the difference is `max |exported - eager|` over every element, and the output's scale is
`max |eager|` over the same tensor (1 where that is 0), so the tolerance follows the units of each task (class
logits, metres, normals). fp32 exports must reach `FP32_RELATIVE_TOLERANCE` (1e-4) of the scale; int8 exports are
reported and fail only on non-finite outputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np

FP32_RELATIVE_TOLERANCE = 1e-4


class CTALExportValidationError(ValueError):
    """An exported model whose outputs differ from eager PyTorch (or are not finite)."""


def validation_inputs(config, image_processor, dynamic_batch: bool) -> dict[str, np.ndarray]:
    """`{"dummy": (2 or 1, 3, H, W), "scene": (1, 3, H, W)}` float32 `pixel_values` at `config.image_size`."""
    height, width = (int(side) for side in config.image_size)
    generator = np.random.default_rng(0)
    dummy = generator.standard_normal((2 if dynamic_batch else 1, 3, height, width)).astype(np.float32)
    return {"dummy": dummy, "scene": scene_pixel_values(config, image_processor)}


def scene_pixel_values(config, image_processor) -> np.ndarray:
    """One synthetic validation scene at the model's size, through `image_processor`: `(1, 3, H, W)` float32."""
    from dataset_scripts.synthetic import CONFIG_TASKS, render_scene

    height, width = (int(side) for side in config.image_size)
    tasks = set(getattr(config, "tasks", ()) or ())
    fitting = [name for name, columns in CONFIG_TASKS.items() if tasks <= set(columns)]
    scene = render_scene(0, split="validation", height=height, width=width, config=(fitting or ["nyuv2"])[0])
    pixel_values = image_processor(scene["image"], return_tensors="pt")["pixel_values"]
    return np.ascontiguousarray(pixel_values.detach().cpu().numpy(), dtype=np.float32)


def compare_outputs(reference: Mapping[str, np.ndarray], exported: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Per task: `max_abs_diff`, `scale` (max |reference|, 1 if 0), `relative` (their ratio) and `finite`."""
    report = {}
    for task, expected in reference.items():
        got = np.asarray(exported[task])
        expected = np.asarray(expected)
        if got.shape != expected.shape:
            raise CTALExportValidationError(
                f"Exported output {task!r} has shape {got.shape}, eager PyTorch gives {expected.shape}."
            )
        finite = bool(np.isfinite(got).all())
        difference = (
            float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if finite else math.inf
        )
        scale = float(np.max(np.abs(expected))) or 1.0
        report[task] = {"max_abs_diff": difference, "scale": scale, "relative": difference / scale, "finite": finite}
    return report


def validate_export(
    run_eager: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    run_exported: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    inputs: Mapping[str, np.ndarray],
    precision: str = "fp32",
    label: str = "export",
) -> dict[str, dict[str, dict]]:
    """Runs both on every input and checks every task: `{input: {task: compare_outputs entry}}`.

    fp32: raises `CTALExportValidationError` naming the task, the input and the difference when one exceeds
    `FP32_RELATIVE_TOLERANCE` x its scale; int8 (or any other precision): only non-finite outputs raise."""
    report = {}
    for name, pixel_values in inputs.items():
        reference = {task: np.asarray(value) for task, value in run_eager(pixel_values).items()}
        if not all(np.isfinite(value).all() for value in reference.values()):
            bad = [task for task, value in reference.items() if not np.isfinite(value).all()]
            raise CTALExportValidationError(
                f"Eager PyTorch gives non-finite outputs for {bad} on the {name!r} input, so the {label} cannot be "
                "checked; an untrained model whose BatchNorm statistics were never set can overflow: run one "
                "training batch (or load trained weights) first."
            )
        report[name] = compare_outputs(reference, run_exported(pixel_values))
    for name, tasks in report.items():
        for task, entry in tasks.items():
            if not entry["finite"]:
                raise CTALExportValidationError(
                    f"The {label} gives non-finite values for task {task!r} on the {name!r} input (eager PyTorch is "
                    "finite)."
                )
            if precision == "fp32" and entry["relative"] > FP32_RELATIVE_TOLERANCE:
                raise CTALExportValidationError(
                    f"The {label} differs from eager PyTorch for task {task!r} on the {name!r} input: max abs "
                    f"difference {entry['max_abs_diff']:.3g} = {entry['relative']:.3g} x the output's scale "
                    f"{entry['scale']:.3g} (tolerance {FP32_RELATIVE_TOLERANCE:g} x scale). Nothing was written."
                )
    return report


def worst_relative(report: Mapping[str, Mapping[str, Mapping]]) -> dict[str, float]:
    """Per task, the largest relative difference over the inputs."""
    worst: dict[str, float] = {}
    for tasks in report.values():
        for task, entry in tasks.items():
            worst[task] = max(worst.get(task, 0.0), entry["relative"])
    return worst


__all__ = [
    "CTALExportValidationError",
    "FP32_RELATIVE_TOLERANCE",
    "compare_outputs",
    "scene_pixel_values",
    "validate_export",
    "validation_inputs",
    "worst_relative",
]
