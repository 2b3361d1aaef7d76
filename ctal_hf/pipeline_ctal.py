"""`pipeline("dense-multitask")`: any image in, every task's map at the image's own size out, with colour-coded
visualisations. `import ctal_hf` registers the task with transformers; a saved model folder also carries this file
and declares it (`CTALConfig.custom_pipelines`), so `pipeline(model=folder, trust_remote_code=True)` runs it without
the package."""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from transformers import Pipeline
from transformers.utils import logging

from .affinity_resampling import nearest_valid_size
from .configuration_ctal import PIPELINE_TASK
from .ctal_attention import resolve_autocast_dtype
from .image_processing_ctal import CTALImageProcessor, load_image
from .input_checks import device_problem
from .sliding_window import DEFAULT_OVERLAP, sliding_window_predictions
from .visualization import visualize_predictions

logger = logging.get_logger(__name__)

# `resolution=`: where the model runs (docs/any-resolution.md). "model": the image resized to the model's image_size
# (the default); "native": at the image's own size, rounded to the nearest multiple of the backbone's largest stride,
# with CTAL's fusion weights resampled (`interpolate_affinity=True`); "sliding": windows of the model's image_size
# over the image at its own size, blended.
RESOLUTIONS: tuple[str, ...] = ("model", "native", "sliding")


class DenseMultitaskPipeline(Pipeline):
    """Multitask dense prediction with a [`CTALForDenseMultitask`] model.

    Inputs: a file path (or URL), a PIL image, a numpy array `(H, W[, C])`, a torch tensor `([C,] H, W)`, or a list
    of them; any size, RGB, grayscale or RGBA. Each image is resized to the model's `image_size` and its maps are
    resized back. One image gives a dict, a list gives a list of dicts, each with:

    - one entry per task (under the task's name, custom tasks of `config.task_specs` included), a numpy array at
      the input size, decoded by the task's kind: classification (`semseg` / `parts`) class ids `(H, W)` int64,
      regression `(H, W)` float32 for one channel (`depth`, the model's unit) or `(H, W, C)`, normals `(H, W, 3)`
      unit vectors, binary (`saliency` / `edge`) probabilities `(H, W)` in [0, 1];
    - `"visualizations"`: task -> PIL image (palette-coded classes, a colour map for one-channel regression, RGB
      for three channels, normals as RGB, grayscale probabilities).

    Call options: `tasks=[...]` (return only these tasks), `visualize=False` (skip the PIL images), `batch_size`,
    `timeout` (for URLs), `resolution=` (also at construction): `"model"` (default: the image resized to the
    model's `image_size` and the maps resized back), `"native"` (the model run at the image's own size, rounded to a
    multiple of the backbone's largest stride, with CTAL's weights resampled) or `"sliding"` (windows of the model's
    `image_size` over the image, `overlap=` of each window shared with the next, default 1/3, predictions blended);
    `"native"` and `"sliding"` take one image per forward pass (`batch_size` 1). docs/any-resolution.md compares
    them.

    Speed options (construction only): `autocast_dtype="bf16"` (or `"fp16"`) runs the model under `torch.autocast`
    (convolutions and the CTAL diffusion's matmuls in that dtype, float32 accumulation; refused on hardware without
    native support); `channels_last=True` converts the model to channels-last (faster convolutions on most CPUs
    and GPUs); `compile=True` wraps it in `torch.compile` (the first call compiles: minutes on a CPU). Maps come
    back in float32 whatever the options. transformers' own `dtype=` still sets the dtype the weights load in.

    Example:

    ```python
    >>> import ctal_hf  # registers the task
    >>> from transformers import pipeline

    >>> predictor = pipeline("dense-multitask", model="path/or/hub-id")
    >>> result = predictor("room.jpg")
    >>> result["semseg"].shape, result["visualizations"]["depth"].size
    ```

    Given a model object and no image processor, the pipeline builds a [`CTALImageProcessor`] from the model's
    config (ImageNet normalisation); pass `image_processor=` to use the one the model was trained with."""

    _load_processor = False
    _load_image_processor = None  # load it when the checkpoint has one; otherwise build it from the config
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(
        self,
        *args,
        autocast_dtype: str | torch.dtype | None = None,
        channels_last: bool = False,
        compile: bool = False,
        **kwargs,
    ):
        problem = device_problem(kwargs.get("device"))
        if problem:  # transformers would fail with a raw torch error, or (device=0) run on the CPU silently
            raise ValueError(f"device={kwargs['device']!r}: {problem}; pass device='cpu' (or -1).")
        super().__init__(*args, **kwargs)
        config = self.model.config
        if getattr(config, "model_type", None) != "ctal":
            raise ValueError(
                f"The {PIPELINE_TASK!r} pipeline runs CTAL models; got a {type(self.model).__name__} with model_type "
                f"{getattr(config, 'model_type', None)!r}."
            )
        if self.image_processor is None:
            logger.info("No image processor found with the model: building CTALImageProcessor from its config.")
            self.image_processor = CTALImageProcessor.from_model_config(config)
        if not hasattr(self.image_processor, "post_process_multitask"):
            got = type(self.image_processor).__name__
            raise ValueError(f"The {PIPELINE_TASK!r} pipeline needs a CTALImageProcessor, got {got}.")
        size = self.image_processor.size
        if [size.height, size.width] != list(config.image_size):
            raise ValueError(
                f"The image processor resizes to {[size.height, size.width]} but the model takes image_size "
                f"{list(config.image_size)}; save the processor with `CTALImageProcessor.from_model_config(config)`."
            )
        self.task_objects = config.get_tasks()
        self.model.eval()  # batch norm in training mode would make a result depend on the rest of its batch
        self.autocast_dtype = resolve_autocast_dtype(autocast_dtype, self.device.type)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._run_model = torch.compile(self.model) if compile else self.model

    def __call__(self, inputs: Any = None, **kwargs: Any) -> dict[str, Any] | list[dict[str, Any]]:
        """Predicts every task for one image (returns a dict) or a list of images (returns a list)."""
        if inputs is None:
            inputs = kwargs.pop("images", None)
        if inputs is None:
            raise ValueError(f"The {PIPELINE_TASK!r} pipeline needs an image or a list of images.")
        if isinstance(inputs, tuple) or (isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == 4):
            inputs = list(inputs)
        if isinstance(inputs, list) and not inputs:
            return []
        for name in ("batch_size", "num_workers"):
            value = kwargs.get(name, getattr(self, f"_{name}", None))  # a call's value, or the one given at creation
            minimum = 1 if name == "batch_size" else 0
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
                raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
        resolution = kwargs.get("resolution", self._forward_params.get("resolution", "model"))
        batch_size = kwargs.get("batch_size", getattr(self, "_batch_size", None)) or 1
        if resolution != "model" and batch_size > 1:
            raise ValueError(
                f"`resolution={resolution!r}` runs every image at its own size, one per forward pass: use "
                f"`batch_size=1` (got {batch_size}), or `resolution='model'` to batch."
            )
        return super().__call__(inputs, **kwargs)

    def _sanitize_parameters(
        self,
        tasks: str | Sequence[str] | None = None,
        visualize: bool | None = None,
        timeout: float | None = None,
        resolution: str | None = None,
        overlap: float | None = None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"Unknown argument(s) {sorted(kwargs)} for the {PIPELINE_TASK!r} pipeline; it takes `tasks`, "
                "`visualize`, `timeout`, `resolution`, `overlap`, `batch_size` and `num_workers`."
            )
        preprocess_params, forward_params, postprocess_params = {}, {}, {}
        if resolution is not None:
            if resolution not in RESOLUTIONS:
                raise ValueError(f"Unknown `resolution` {resolution!r}; choose from {list(RESOLUTIONS)}.")
            if resolution == "native" and self.model.fixed_size_reason:
                raise ValueError(f"`resolution='native'` is not available: {self.model.fixed_size_reason}")
            preprocess_params["resolution"] = forward_params["resolution"] = resolution
        if overlap is not None:
            if resolution is not None and resolution != "sliding":
                raise ValueError(f"`overlap` applies to `resolution='sliding'`, not {resolution!r}.")
            if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
                raise ValueError(
                    f"`overlap` is the fraction of a window shared with the next, in [0, 1); got {overlap!r}."
                )
            forward_params["overlap"] = float(overlap)
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if tasks is not None:
            tasks = [tasks] if isinstance(tasks, str) else list(tasks)
            predicted = list(self.model.config.tasks)
            unknown = [task for task in tasks if task not in predicted]
            if unknown:
                raise ValueError(f"Task(s) {unknown} requested, but this model predicts only {predicted}.")
            postprocess_params["tasks"] = tasks
        if visualize is not None:
            postprocess_params["visualize"] = bool(visualize)
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image: Any, timeout: float | None = None, resolution: str = "model") -> dict[str, Any]:
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image, timeout=timeout)
        rgb = self.image_processor.process_image(image)  # (3, H, W): validates the input and gives its size
        size = {}
        if resolution == "native":
            height, width = nearest_valid_size(tuple(rgb.shape[-2:]), self.model.input_stride)
            size = {"size": {"height": height, "width": width}}
        elif resolution == "sliding":
            size = {"size": {"height": int(rgb.shape[-2]), "width": int(rgb.shape[-1])}}
        inputs = self.image_processor(rgb, return_tensors="pt", **size)
        pixel_values = inputs["pixel_values"]
        if self.dtype is not None:
            pixel_values = pixel_values.to(self.dtype)
        return {"pixel_values": pixel_values, "target_size": tuple(int(side) for side in rgb.shape[-2:])}

    def _forward(
        self, model_inputs: dict[str, Any], resolution: str = "model", overlap: float = DEFAULT_OVERLAP
    ) -> dict[str, Any]:
        target_size = model_inputs.pop("target_size")
        autocast = self.autocast_dtype is not None
        pixel_values = model_inputs["pixel_values"]
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=autocast):
            if resolution == "sliding":
                predictions = sliding_window_predictions(
                    self._run_model, pixel_values, window=tuple(self.model.config.image_size), overlap=overlap
                )
            else:
                interpolate = resolution == "native"
                predictions = self._run_model(pixel_values=pixel_values, interpolate_affinity=interpolate).predictions
        predictions = {task: value.float() for task, value in predictions.items()}
        # A flat dict (task -> batched tensor) so the pipeline's batching can split it per image.
        return {**predictions, "target_size": target_size}

    def postprocess(
        self, model_outputs: dict[str, Any], tasks: Sequence[str] | None = None, visualize: bool = True
    ) -> dict[str, Any]:
        predictions = {task: value for task, value in model_outputs.items() if task in self.task_objects}
        return postprocess_predictions(
            predictions, model_outputs["target_size"], self.image_processor, self.task_objects, tasks, visualize
        )


def postprocess_predictions(
    predictions: dict[str, torch.Tensor],
    target_size: tuple[int, int],
    image_processor: CTALImageProcessor,
    task_objects: dict[str, Any],
    tasks: Sequence[str] | None = None,
    visualize: bool = True,
) -> dict[str, Any]:
    """One image's final predictions (`{task: (1, C, h, w)}`, the model's layout) -> the pipeline's result: each
    task's decoded map at `target_size` as a numpy array, and with `visualize` its PIL image under
    `"visualizations"`. Shared by the pipeline and the runners of exported models (`ctal_hf.export`)."""
    maps = image_processor.post_process_multitask(
        predictions, target_sizes=[target_size], tasks=tasks, task_specs=task_objects
    )[0]
    result: dict[str, Any] = {task: value.cpu().numpy() for task, value in maps.items()}
    if visualize:
        result["visualizations"] = visualize_predictions(result, task_specs=task_objects)
    return result


__all__ = ["DenseMultitaskPipeline", "PIPELINE_TASK", "RESOLUTIONS", "postprocess_predictions"]
