"""The post-processing names and signatures of transformers' depth, segmentation and normal estimators (as
TIPSv2-DPT's), which `CTALImageProcessor` inherits beside `post_process_multitask`: the stock `depth-estimation` and
`image-segmentation` pipelines, and user code written for those estimators, run on a CTAL per-task view
(`CTALForDepthEstimation`, ...). Each method also takes a `CTALDenseMultitaskOutput` with `task=` the task to read.
The maps equal `post_process_multitask`'s for the same task (bilinear resize of the raw prediction, then the task's
decoding). A flat module with relative imports only: saved model folders carry it."""

from typing import Any

import torch
import torch.nn.functional as F
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput


class CTALStockPostProcessingMixin:
    """`post_process_depth_estimation`, `post_process_semantic_segmentation` and `post_process_normal_estimation`."""

    def post_process_depth_estimation(
        self,
        outputs: Any,
        target_sizes: "torch.Tensor | list[tuple[int, int]] | None" = None,
        task: str | None = "depth",
    ) -> list[dict[str, torch.Tensor]]:
        """Depth maps, one dict `{"predicted_depth": (height, width) tensor}` per image, resized to `target_sizes`
        (`None` keeps the model's size); values in the unit of the depth task (`config.get_tasks()[task].unit`).

        Args:
            outputs: a [`CTALForDepthEstimation`] output (`predicted_depth` `(batch, height, width)`), or a
                `CTALDenseMultitaskOutput` whose `task` prediction is read."""
        depth = _stock_prediction(outputs, "predicted_depth", task, "post_process_depth_estimation")
        if depth.ndim == 4:
            depth = depth[:, 0]
        sizes = _check_target_sizes(target_sizes, len(depth)) or [None] * len(depth)
        return [{"predicted_depth": _resize(item[None], size)[0]} for item, size in zip(depth, sizes, strict=True)]

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: "torch.Tensor | list[tuple[int, int]] | None" = None,
        return_segmentation_scores: bool = False,
        task: str | None = "semseg",
    ) -> "list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]":
        """Class-id maps `(height, width)` int64, one per image, resized to `target_sizes` (`None`: the model's
        size); with `return_segmentation_scores=True` a `SemanticSegmentationPostProcessorOutput` per image with
        `segmentation` and
        `segmentation_scores` (the resized logits, `(classes, height, width)`). Names: `config.id2label`.

        Args:
            outputs: a [`CTALForSemanticSegmentation`] output (`logits`), or a `CTALDenseMultitaskOutput` whose
                `task` prediction is read."""
        logits = _stock_prediction(outputs, "logits", task, "post_process_semantic_segmentation")
        sizes = _check_target_sizes(target_sizes, len(logits)) or [None] * len(logits)
        results = []
        for item, size in zip(logits, sizes, strict=True):
            scores = _resize(item, size)
            segmentation = scores.argmax(dim=0)
            results.append(
                SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": segmentation, "segmentation_scores": scores}
                )
                if return_segmentation_scores
                else segmentation
            )
        return results

    def post_process_normal_estimation(
        self,
        outputs: Any,
        target_sizes: "torch.Tensor | list[tuple[int, int]] | None" = None,
        task: str | None = "normals",
    ) -> list[dict[str, torch.Tensor]]:
        """Unit normal maps, one dict `{"normals": (3, height, width) tensor}` per image (L2-normalised over the
        channels after resizing to `target_sizes`; `None` keeps the model's size), channels first as transformers'
        normal estimators return them.

        Args:
            outputs: a [`CTALForNormalEstimation`] output (`normals`), or a `CTALDenseMultitaskOutput` whose
                `task` prediction is read."""
        normals = _stock_prediction(outputs, "normals", task, "post_process_normal_estimation")
        sizes = _check_target_sizes(target_sizes, len(normals)) or [None] * len(normals)
        return [
            {"normals": F.normalize(_resize(item, size), dim=0)} for item, size in zip(normals, sizes, strict=True)
        ]


def _stock_prediction(outputs: Any, field: str, task: str | None, method: str) -> torch.Tensor:
    """The raw map a stock post-processing method reads: `outputs.<field>` (a per-task view's output), or the
    served task's prediction in a `CTALDenseMultitaskOutput` / predictions dict."""
    value = outputs.get(field) if isinstance(outputs, dict) else getattr(outputs, field, None)
    if value is not None:
        return value
    predictions = getattr(outputs, "predictions", None)
    if predictions is None and isinstance(outputs, dict):
        predictions = outputs.get("predictions", outputs)
    if isinstance(predictions, dict) and task is not None and task in predictions:
        return predictions[task]
    raise ValueError(
        f"`{method}` needs outputs with `{field}` (a CTAL per-task model's output) or a CTALDenseMultitaskOutput "
        f"holding the task{f' {task!r}' if task else ''} (pass `task=`); got {type(outputs).__name__}"
        + (f" with {sorted(predictions)}" if isinstance(predictions, dict) else "")
        + "."
    )


def _check_target_sizes(target_sizes: Any, batch_size: int) -> list | None:
    if target_sizes is None:
        return None
    if isinstance(target_sizes, torch.Tensor):
        target_sizes = target_sizes.tolist()
    if len(target_sizes) != batch_size:
        raise ValueError(
            f"Got {len(target_sizes)} target sizes for a batch of {batch_size} predictions; pass one (height, width) "
            "per image."
        )
    return [tuple(int(side) for side in size) for size in target_sizes]


def _resize(maps: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """(channels, h, w) -> (channels, *size), bilinear (as `post_process_multitask` resizes before decoding)."""
    if size is None or tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]


__all__ = ["CTALStockPostProcessingMixin"]
