"""Multitask evaluation: `MultiTaskEvaluator` holds one streaming metric per task (the task object makes it) and
`delta_m` computes the multitask gain of the paper (Maninis et al. 2019). Above the tasks in the layer order; the
metric classes it fills are below them."""

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch

from .metric_base import CTALMetric, Reducer
from .tasks import CLASS_COUNT_FIELDS, LOWER_IS_BETTER, as_tasks, resolve_tasks


class MultiTaskEvaluator:
    """One streaming metric per task, with the paper's headline metric per task.

    Args:
        config: a `CTALConfig` (its tasks, with their specs, class counts, ignore index and edge weight), a dict
            task name -> task object (`config.get_tasks()`) or spec dict, or a list of task names (then pass
            `num_semseg_classes` / `num_parts_classes` for the segmentation tasks and `task_specs` for custom ones).
        num_semseg_classes, num_parts_classes, ignore_index, edge_pos_weight: override the config's values.
        metric_kwargs: extra keyword arguments per task for its metric class, e.g.
            `{"saliency": {"double_sigmoid": True}, "edge": {"compute_ods": False}}`.
        task_specs: specs of custom tasks (see `ctal_hf.tasks`), with a list of task names.

    In a distributed run, update on every process, then sum the states once before `compute`:
    `evaluator.all_reduce()` (torch.distributed) or `evaluator.all_reduce(lambda t: accelerator.reduce(t, "sum"))`.
    Samples that a distributed sampler repeats to even out the last batch are counted twice; evaluate with
    `Accelerator(even_batches=False)` (or a sampler without padding) for exact numbers.

    Example:

    ```python
    >>> evaluator = MultiTaskEvaluator(["semseg", "depth"], num_semseg_classes=13)
    >>> evaluator.update(outputs.predictions, labels)
    >>> evaluator.compute()["semseg"]["mIoU"], evaluator.headline()
    ```
    """

    def __init__(
        self,
        config: Any,
        *,
        num_semseg_classes: int | None = None,
        num_parts_classes: int | None = None,
        ignore_index: int | None = None,
        edge_pos_weight: float | None = None,
        metric_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        task_specs: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        if isinstance(config, str):
            raise ValueError(f"MultiTaskEvaluator expects a CTALConfig or a list of task names, got {config!r}.")
        if isinstance(config, Mapping):  # task name -> task object or spec dict
            task_objects = as_tasks(config)
        else:
            if isinstance(config, Sequence):
                tasks, specs = list(config), task_specs
                config = None
                given = {"num_semseg_classes": num_semseg_classes, "num_parts_classes": num_parts_classes}
                for name, field in CLASS_COUNT_FIELDS.items():
                    if name in tasks and given[field] is None:
                        raise ValueError(f"{name}: pass {field} (or a config) to evaluate it.")
            else:
                tasks, specs = (
                    list(config.tasks),
                    {**(getattr(config, "task_specs", None) or {}), **(task_specs or {})},
                )

            def pick(value, name, default):
                if value is not None:
                    return value
                return getattr(config, name) if config is not None else default

            task_objects = resolve_tasks(
                tasks,
                specs,
                num_semseg_classes=pick(num_semseg_classes, "num_semseg_classes", 13),
                num_parts_classes=pick(num_parts_classes, "num_parts_classes", 7),
                ignore_index=pick(ignore_index, "ignore_index", 255),
                normals_loss=pick(None, "normals_loss", "cosine"),
                edge_pos_weight=pick(edge_pos_weight, "edge_pos_weight", 0.95),
            )
        metric_kwargs = dict(metric_kwargs or {})
        extra = set(metric_kwargs) - set(task_objects)
        if extra:
            raise ValueError(f"metric_kwargs names tasks that are not evaluated: {sorted(extra)}.")
        self.task_objects = task_objects
        self.tasks = list(task_objects)
        self.metrics: dict[str, CTALMetric] = {
            name: task.make_metric(**metric_kwargs.get(name, {})) for name, task in task_objects.items()
        }

    @property
    def lower_is_better(self) -> frozenset[str]:
        """The tasks whose headline metric is better when lower (the `lower_is_better` argument of `delta_m`)."""
        return frozenset(name for name, task in self.task_objects.items() if task.lower_is_better)

    def update(self, predictions: Mapping[str, Any], labels: Mapping[str, Any]) -> None:
        """Updates the metric of every task that has a label in `labels` (other keys are ignored)."""
        for task, metric in self.metrics.items():
            if task not in labels or labels[task] is None:
                continue
            if task not in predictions:
                raise ValueError(f"labels contain {task!r} but predictions do not (got {sorted(predictions)}).")
            metric.update(predictions[task], labels[task])

    def compute(self) -> dict[str, dict[str, float]]:
        return {task: metric.compute() for task, metric in self.metrics.items()}

    def headline(self, results: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, float]:
        """The headline metric per task (the paper's: mIoU, rel_err, mean_angle, maxF, loss; a custom task's spec
        `metric`): the input of `delta_m`."""
        results = self.compute() if results is None else results
        return {task: results[task][self.task_objects[task].metric] for task in self.tasks}

    def reset(self) -> "MultiTaskEvaluator":
        for metric in self.metrics.values():
            metric.reset()
        return self

    def to(self, device: str | torch.device) -> "MultiTaskEvaluator":
        for metric in self.metrics.values():
            metric.to(device)
        return self

    def merge(self, other: "MultiTaskEvaluator") -> "MultiTaskEvaluator":
        if other.tasks != self.tasks:
            raise ValueError(f"Cannot merge evaluators of tasks {other.tasks} into {self.tasks}.")
        for task, metric in self.metrics.items():
            metric.merge(other.metrics[task])
        return self

    def all_reduce(self, reducer: Reducer | None = None) -> "MultiTaskEvaluator":
        """Sums every state over processes, once, before `compute` (see `CTALMetric.all_reduce`)."""
        for metric in self.metrics.values():
            metric.all_reduce(reducer)
        return self

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """All states as one flat dict `"task/name" -> tensor` (sums: reduce each with "sum" across processes)."""
        return {
            f"{task}/{name}": value
            for task, metric in self.metrics.items()
            for name, value in metric.state_tensors().items()
        }

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> "MultiTaskEvaluator":
        per_task: dict[str, dict[str, torch.Tensor]] = {task: {} for task in self.tasks}
        for key, value in state.items():
            task, _, name = key.partition("/")
            if task not in per_task:
                raise ValueError(f"State key {key!r} names no evaluated task ({self.tasks}).")
            per_task[task][name] = value
        for task, metric in self.metrics.items():
            metric.load_state_tensors(per_task[task])
        return self


def delta_m(
    results: Mapping[str, float],
    single_task: Mapping[str, float],
    lower_is_better: Collection[str] = LOWER_IS_BETTER,
) -> float:
    """Multitask gain in percent: `100 / T * sum_t (-1)^{l_t} (M_t - M_STL,t) / M_STL,t`, with `l_t = 1` for the
    tasks in `lower_is_better`. `results` and `single_task` map each task name to its one headline value."""
    if set(results) != set(single_task):
        raise ValueError(
            f"delta_m: results tasks {sorted(results)} differ from single-task tasks {sorted(single_task)}."
        )
    if not results:
        raise ValueError("delta_m: no tasks given.")
    total = 0.0
    for task, value in results.items():
        reference = float(single_task[task])
        if reference == 0:
            raise ValueError(f"delta_m: the single-task value of {task!r} is 0; the relative change is undefined.")
        sign = -1.0 if task in lower_is_better else 1.0
        total += sign * (float(value) - reference) / reference
    return 100.0 * total / len(results)


__all__ = ["MultiTaskEvaluator", "delta_m"]
