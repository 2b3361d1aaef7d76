"""Evaluation over exact shards: every validation image is scored once, in the same batch as in a one-process run,
and the metric states (sums) are added across processes, so the metrics equal a one-process evaluation for any
number of processes. Also the per-task validation losses of the final and initial predictions, and the prediction
pictures written next to a trained model."""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import CTALTorchDataset, CTALTransform
from ..metrics import MultiTaskEvaluator


def eval_shard(num_samples: int, batch_size: int, num_processes: int, process_index: int):
    """This process's evaluation batches: the global batches (contiguous, in order) dealt round-robin, plus padding
    batches (marked `None`) so every process runs the same number of forward passes (FSDP needs it). No sample is
    seen twice and each is computed in the same batch as in a one-process run, so the summed metric states equal
    the one-process states. Also returns the first global batch (the filler of the padding batches)."""
    batches = [list(range(i, min(i + batch_size, num_samples))) for i in range(0, num_samples, batch_size)]
    steps = math.ceil(len(batches) / num_processes)
    mine = batches[process_index::num_processes]
    return mine + [None] * (steps - len(mine)), batches[0] if batches else []


@dataclass
class Evaluation:
    """What `evaluate` returns.

    Args:
        final, initial: metrics per task of the final and the initial predictions (`initial` empty for decoders
            without initial heads).
        losses: mean per-task validation loss (unweighted) per image, `{"final": {task: loss}, "initial": {...}}`.
        first_batch: inputs, labels and final predictions of the first validation batch (for pictures), on the main
            process only.
    """

    final: dict[str, dict[str, float]]
    initial: dict[str, dict[str, float]]
    losses: dict[str, dict[str, float]] = field(default_factory=dict)
    first_batch: dict | None = None

    def log_dict(self, prefix: str = "eval") -> dict[str, float]:
        """Flat `{prefix/task/metric: value}` for the trackers (initial metrics under `prefix/initial/...`)."""
        logs = {
            f"{prefix}/{task}/{metric}": value
            for task, values in self.final.items()
            for metric, value in values.items()
        }
        for task, values in self.initial.items():
            logs.update({f"{prefix}/initial/{task}/{metric}": value for metric, value in values.items()})
        for kind, values in self.losses.items():
            logs.update({f"{prefix}/loss_{kind}/{task}": value for task, value in values.items()})
        return logs


def _finest(prediction):
    return prediction[0] if isinstance(prediction, (list, tuple)) else prediction


def _scales(prediction):
    return list(prediction) if isinstance(prediction, (list, tuple)) else [prediction]


@torch.no_grad()
def evaluate(
    model,
    accelerator,
    dataset: CTALTorchDataset,
    config,
    batch_size: int,
    num_workers: int = 0,
    criterion=None,
    desc: str = "evaluating",
) -> Evaluation:
    """Final and initial predictions scored on the whole dataset. Every process scores its own batches; the metric
    states (sums) are then added across processes. With `criterion` (the model's `CTALCriterion`), also the mean
    per-task validation losses of the final and initial predictions (initial: mean over scales, as in training)."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    final = MultiTaskEvaluator(config).to(device)
    initial = MultiTaskEvaluator(config).to(device)
    tasks = list(config.tasks)
    # Loss sums (loss of a batch x its images), per task, for the final and the initial predictions; last: images.
    loss_sums = torch.zeros(2 * len(tasks) + 1, dtype=torch.float64, device=device)
    has_initial = False
    batches, filler = eval_shard(len(dataset), batch_size, accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(
        dataset,
        batch_sampler=[indices if indices is not None else filler for indices in batches],
        collate_fn=dataset.collate,
        num_workers=num_workers,
    )
    first_batch = None
    progress = tqdm(loader, desc=desc, disable=not accelerator.is_local_main_process, leave=False)
    for indices, batch in zip(batches, progress, strict=True):
        pixel_values = batch["pixel_values"].to(device)
        labels = {task: value.to(device) for task, value in batch["labels"].items()}
        outputs = model(pixel_values=pixel_values)
        if indices is None:  # padding batch: run for the collectives of sharded models, score nothing
            continue
        predictions = {task: value.float() for task, value in outputs.predictions.items()}
        final.update(predictions, labels)
        initial_outputs = outputs.initial_predictions or {}
        initial_predictions = {task: _finest(value).float() for task, value in initial_outputs.items()}
        if initial_predictions:
            has_initial = True
            initial.update(initial_predictions, labels)
        if criterion is not None:
            images = pixel_values.shape[0]
            for i, task in enumerate(tasks):
                if task not in labels:
                    continue
                loss_sums[i] += criterion.task_loss(task, predictions[task], labels[task]).double() * images
                if task in initial_outputs:
                    scale_losses = [
                        criterion.task_loss(task, p.float(), labels[task]) for p in _scales(initial_outputs[task])
                    ]
                    loss_sums[len(tasks) + i] += torch.stack(scale_losses).mean().double() * images
            loss_sums[-1] += images
        if first_batch is None and accelerator.is_main_process:
            first_batch = {"pixel_values": pixel_values.cpu(), "labels": batch["labels"], "predictions": predictions}

    def reduce(tensor):
        return accelerator.reduce(tensor, reduction="sum")

    final.all_reduce(reduce)
    initial.all_reduce(reduce)
    has_initial = bool(reduce(torch.tensor(int(has_initial), device=device)).item())
    losses = {}
    if criterion is not None:
        loss_sums = reduce(loss_sums)
        count = max(1.0, loss_sums[-1].item())
        losses["final"] = {task: loss_sums[i].item() / count for i, task in enumerate(tasks)}
        if has_initial:
            losses["initial"] = {task: loss_sums[len(tasks) + i].item() / count for i, task in enumerate(tasks)}
    if was_training:
        model.train()
    return Evaluation(
        final=final.compute(),
        initial=initial.compute() if has_initial else {},
        losses=losses,
        first_batch=first_batch,
    )


def save_prediction_pictures(
    first_batch, config, transform: CTALTransform, output_dir: Path, count: int, class_names=None
) -> list[Path]:
    """One PNG per validation image: input | prediction per task, with a ground-truth row."""
    from ..image_processing_ctal import CTALImageProcessor
    from ..visualization import make_figure

    if first_batch is None or count <= 0:
        return []
    processor = CTALImageProcessor.from_model_config(config)
    count = min(count, first_batch["pixel_values"].shape[0])
    predictions = {t: p[:count].cpu() for t, p in first_batch["predictions"].items()}
    decoded = processor.post_process_multitask(predictions, task_specs=config)
    tasks = config.get_tasks()
    images = first_batch["pixel_values"][:count]
    if transform.normalize:
        images = images * transform.std + transform.mean
    images = images.clamp(0, 1)
    paths = []
    for index in range(count):
        truth = {task: tasks[task].label_to_map(value[index]) for task, value in first_batch["labels"].items()}
        path = Path(output_dir) / "predictions" / f"validation_{index}.png"
        make_figure(images[index], decoded[index], truth, class_names=class_names, path=path, task_specs=config)
        paths.append(path)
    return paths


def refinement(final: dict, initial: dict, task_specs: dict) -> dict[str, dict]:
    """Whether the final (refined) predictions beat the initial ones, per task on its headline metric:
    `{task: {"metric", "final", "initial", "better"}}` (empty for decoders without initial predictions).
    `task_specs` is `config.get_tasks()`."""
    compared = {}
    for task, spec in task_specs.items():
        before, after = initial.get(task, {}).get(spec.metric), final.get(task, {}).get(spec.metric)
        if before is None or after is None:
            continue
        better = after < before if spec.lower_is_better else after > before
        compared[task] = {"metric": spec.metric, "final": after, "initial": before, "better": bool(better)}
    return compared


def refinement_report(compared: dict[str, dict]) -> str:
    """`refinement`'s result as lines for the end of a training run ("" when there is nothing to compare)."""
    if not compared:
        return ""
    from .model_card import display_value, metric_label  # the model card's number formats

    lines = ["Final (refined) vs initial predictions, headline metric per task:"]
    for task, row in compared.items():
        final, initial = display_value(row["metric"], row["final"]), display_value(row["metric"], row["initial"])
        verdict = "final better" if row["better"] else "final NOT better"
        lines.append(
            f"  {task:<10} {metric_label(row['metric']):<16} final {final:>8}  initial {initial:>8}  {verdict}"
        )
    wins = sum(row["better"] for row in compared.values())
    lines.append(f"  The refinement beats the initial predictions on {wins} of {len(compared)} tasks.")
    return "\n".join(lines)


__all__ = ["eval_shard", "Evaluation", "evaluate", "refinement", "refinement_report", "save_prediction_pictures"]
