"""The model card that `examples/train.py` writes next to a trained model (README.md): tasks, dataset, recipe, the
metrics table of the final (and initial) predictions, and `model-index` metadata so the Hub shows the results."""

import math
import re
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..registry import decoder_display_name
from ..tasks import TASKS, as_tasks, serving_task

# Metrics that are fractions in [0, 1]; cards and tables print them in percent, as the paper does.
PERCENT_METRICS = frozenset({"mIoU", "pixel_acc", "maxF", "odsF", "oisF", "within_11.25", "within_22.5", "within_30"})
# Metrics printed per built-in task (the headline first; each task object says which, custom ones included); others
# stay in eval_results.json.
DISPLAY_METRICS: dict[str, tuple[str, ...]] = {name: task.display_metrics() for name, task in TASKS.items()}
LOWER_IS_BETTER_METRICS = frozenset(
    {"rel_err", "abs_err", "rmse", "sq_rel", "log_rmse", "mean_angle", "median_angle", "rmse_angle", "loss"}
)


def display_value(metric: str, value: float) -> str:
    """A metric as printed: fractions in percent, two decimals (three for relative errors and losses)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if metric in PERCENT_METRICS:
        return f"{100.0 * value:.2f}"
    if metric in ("rel_err", "loss"):
        return f"{value:.4f}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def metric_label(metric: str) -> str:
    arrow = "↓" if metric in LOWER_IS_BETTER_METRICS else "↑"
    unit = " (%)" if metric in PERCENT_METRICS else (" (deg)" if "angle" in metric else "")
    return f"{metric}{unit} {arrow}"


def _display_metrics(tasks: Mapping[str, Any], task: str, values: Mapping[str, float]) -> tuple[str, ...]:
    return tasks[task].display_metrics() if task in tasks else tuple(values)


def metrics_table(
    final: Mapping[str, Mapping[str, float]],
    initial: Mapping[str, Mapping[str, float]] | None = None,
    tasks: Any = None,
) -> str:
    """Markdown table: one row per (task, metric), a column for the final and, if given, the initial predictions.
    `tasks` (a config or its `get_tasks()`) says which metrics each task shows; by default the built-in tasks'."""
    tasks = TASKS if tasks is None else as_tasks(tasks)
    initial = initial or {}
    has_initial = any(initial.values())
    header = "| task | metric | final |" + (" initial |" if has_initial else "")
    lines = [header, "|---|---|---|" + ("---|" if has_initial else "")]
    for task, values in final.items():
        metrics = [m for m in _display_metrics(tasks, task, values) if m in values]
        for metric in metrics:
            row = f"| {task} | {metric_label(metric)} | {display_value(metric, values[metric])} |"
            if has_initial:
                row += f" {display_value(metric, initial.get(task, {}).get(metric))} |"
            lines.append(row)
    return "\n".join(lines)


def _pipeline_tag(tasks: Mapping[str, Any]) -> str | None:
    """The card's Hub pipeline tag: image segmentation when a task is scored as one (the paper's `semseg`)."""
    return "image-segmentation" if any(task.hub_task_type == "image-segmentation" for task in tasks.values()) else None


def _eval_results(final, tasks, dataset_name: str, dataset_type: str, split: str) -> list[EvalResult]:
    results = []
    for task, values in final.items():
        for metric in _display_metrics(tasks, task, values):
            value = values.get(metric)
            if value is None or not math.isfinite(value):
                continue
            results.append(
                EvalResult(
                    task_type=tasks[task].hub_task_type if task in tasks else f"dense-{task}",
                    task_name=tasks[task].title if task in tasks else task,
                    dataset_type=dataset_type,
                    dataset_name=dataset_name,
                    dataset_split=split,
                    metric_type=metric,
                    metric_name=f"{task} {metric}",
                    metric_value=round(100.0 * value if metric in PERCENT_METRICS else value, 4),
                )
            )
    return results


# Stock transformers pipeline -> the view of the checkpoint it runs (`ctal_hf.tasks.STOCK_TASK_VIEWS`), in the order
# the card shows them; the first the model has is its `pipeline_tag`.
STOCK_PIPELINES: dict[str, str] = {
    "image-segmentation": "semantic-segmentation",
    "depth-estimation": "depth-estimation",
}


def _pipeline_tag(tasks: Mapping[str, Any]) -> str | None:
    return next((name for name, view in STOCK_PIPELINES.items() if serving_task(tasks, view)), None)


def _stock_usage(tasks: Mapping[str, Any], model_name: str) -> str:
    """The card's lines on the stock pipelines the model serves (none: empty)."""
    lines = [
        f'{name.replace("-", "_")} = pipeline("{name}", model="{model_name}")  # serves `{serving_task(tasks, view)}`'
        for name, view in STOCK_PIPELINES.items()
        if serving_task(tasks, view)
    ]
    if not lines:
        return ""
    body = "\n".join(lines)
    return (
        "The stock transformers pipelines run on the same checkpoint (per-task views of the same weights; segments "
        f"are labelled from `id2label`):\n\n```python\nimport ctal_hf\nfrom transformers import pipeline\n\n{body}\n```\n"
    )


def make_model_card(
    config: Any,
    final: Mapping[str, Mapping[str, float]],
    initial: Mapping[str, Mapping[str, float]] | None,
    dataset_name: str,
    recipe: Mapping[str, Any],
    model_name: str,
    num_parameters: int | None = None,
    completed_steps: int | None = None,
    command: str | None = None,
    split: str = "validation",
) -> ModelCard:
    """The card of a trained model; `recipe` is the flat dict of training settings (optimizer, lr, ...)."""
    decoder = decoder_display_name(config.decoder)
    tasks = config.get_tasks()
    shown = {m for name, values in final.items() for m in _display_metrics(tasks, name, values)}
    dataset_type = re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset_name).strip("-")
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        license="apache-2.0",
        pipeline_tag=_pipeline_tag(tasks),
        tags=["ctal", "multitask", "dense-prediction", "vision", *config.tasks],
        datasets=[dataset_name] if "/" in dataset_name else None,
        metrics=sorted({m for values in final.values() for m in values if m in shown}),
        eval_results=_eval_results(final, tasks, dataset_name, dataset_type, split),
    )
    task_lines = "\n".join(task.card_line() for task in tasks.values())
    stock_lines = _stock_usage(tasks, model_name)
    recipe_lines = "\n".join(f"| {key} | {value} |" for key, value in recipe.items())
    size = "x".join(str(s) for s in config.image_size)
    params = f"{num_parameters / 1e6:.2f} M parameters" if num_parameters else ""
    body = f"""# {model_name}

A {decoder} model (cross-task affinity learning for multitask dense prediction) with a `{config.backbone_description}` backbone,
trained with `examples/train.py` of `ctal_hf` on **{dataset_name}** at {size} pixels. {params}

## Tasks

{task_lines}

## Results ({split} split)

Metrics of the whole split (sums over all pixels, not means of per-batch means); fractions in percent. The
*initial* column scores the deeply supervised initial predictions (before cross-task distillation).

{metrics_table(final, initial, tasks)}

## Training recipe

| setting | value |
|---|---|
{recipe_lines}
| optimizer steps | {completed_steps} |

{f"Command: `{command}`" if command else ""}

## Use

```python
import ctal_hf  # registers the model, image processor and pipeline
from transformers import pipeline

predictor = pipeline("dense-multitask", model="{model_name}")
maps = predictor("room.png")  # dict task -> map at the image's size
```

{stock_lines}
The folder also carries the modelling and pipeline code, so `AutoModel.from_pretrained(..., trust_remote_code=True)`
and `pipeline("dense-multitask", model=..., trust_remote_code=True)` work without this package (the stock pipelines
too, with `trust_remote_code=True`).
"""
    template = "---\n{{ card_data }}\n---\n\n{{ body }}"
    return ModelCard.from_template(card_data, template_str=template, body=body)


__all__ = ["PERCENT_METRICS", "DISPLAY_METRICS", "display_value", "metrics_table", "make_model_card"]
