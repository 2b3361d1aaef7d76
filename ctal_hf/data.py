"""From dataset rows to model inputs: joint transforms that keep image and labels aligned, and a collate that
yields `{"pixel_values": (B, 3, H, W), "labels": {task: tensor}}` in the label layouts the model takes.

Randomness is explicit: every random transform draws from a `torch.Generator` passed by the caller, and
`CTALTorchDataset` seeds one per (seed, epoch, index), so a run gives the same batches whatever the number of
DataLoader workers and can resume mid-epoch (with a sampler that is itself seeded, e.g. Accelerate's).

Each task's kind (`ctal_hf.tasks`) owns its column contract and how augmentations change its labels. Per-sample
layouts (no batch dimension) used between the steps: `image` (3, H, W) float32 in [0, 1] (normalised at the end);
classification tasks (`semseg` / `parts`) (H, W) int64 with the ignore value (255) unlabelled; regression tasks
(C, H, W) float32 (`depth`: 0 invalid; others: the spec's `ignore_value`, and NaN for padding); normals (3, H, W)
float32 with (0, 0, 0) invalid; binary tasks (`saliency` / `edge`) (1, H, W) float32 in {0, 1} with 255 ignored.

Functions that take `tasks` accept task names (built-in tasks), a `CTALConfig` (its tasks, custom ones included),
or a dict name -> task object (`config.get_tasks()`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .image_values import HIGH_DEPTH_MODES, pil_high_depth_to_unit, to_unit_range
from .registry import IMAGENET_MEAN, IMAGENET_STD
from .tasks import BUILTIN_TASK_NAMES, CTALTask, as_tasks

# The names this module has always exported for `registry.IMAGENET_MEAN` / `IMAGENET_STD`.
IMAGENET_DEFAULT_MEAN = IMAGENET_MEAN
IMAGENET_DEFAULT_STD = IMAGENET_STD
IGNORE_INDEX = 255
MTAN_SCALES = (1.0, 1.2, 1.5)


def _sample_tasks(sample: Mapping[str, torch.Tensor], tasks) -> dict[str, CTALTask]:
    """The task objects of a sample's label keys: from `tasks` when given, else the built-in tasks by name."""
    labels = [key for key in sample if key != "image"]
    resolved = as_tasks(tasks) if tasks is not None else as_tasks([k for k in labels if k in BUILTIN_TASK_NAMES])
    unknown = [key for key in labels if key not in resolved]
    if unknown:
        raise ValueError(
            f"Sample key(s) {unknown} are not built-in tasks: pass `tasks=config` (or `config.get_tasks()`) so the "
            "transforms know how to flip, zoom and pad them."
        )
    return resolved


def _as_tensor(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    return torch.as_tensor(array if array.flags.writeable else array.copy())  # PIL-backed arrays are read-only


def _channels_last(value: torch.Tensor) -> torch.Tensor:
    """`datasets.Image` columns in torch format come channels-first, (C, H, W) with C in 1, 3, 4: move C last."""
    if value.ndim == 3 and value.shape[0] in (1, 3, 4) and value.shape[-1] not in (1, 3, 4):
        return value.permute(1, 2, 0)
    return value


def _as_rgb(value) -> torch.Tensor:
    """An image as (H, W, 3): PIL images of any mode, grayscale or RGBA arrays, channels-first tensors."""
    if hasattr(value, "convert"):  # a PIL image (a `datasets.Image` column in Python format)
        if value.mode in HIGH_DEPTH_MODES:  # 16-bit / float: scaled by what the values are, not clipped
            value = torch.from_numpy(pil_high_depth_to_unit(value))
        else:
            value = value.convert("RGB")
    image = _channels_last(_as_tensor(value))
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image.expand(-1, -1, 3)
    elif image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]  # drop alpha
    return image


def row_to_sample(row: Mapping, tasks) -> dict[str, torch.Tensor]:
    """One dataset row (torch, numpy or Python format) -> per-sample tensors for `image` and `tasks`, each task's
    column (named like the task) read by its kind.

    Rows with `height` / `width` columns (PASCAL-Context, stored padded) are cropped to their real size."""
    task_objects = as_tasks(tasks)
    missing = [name for name in ("image", *task_objects) if name not in row]
    if missing:
        raise ValueError(f"Dataset row has no column(s) {missing}; its columns are {sorted(row)}.")
    image = _as_rgb(row["image"])
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"`image` must be an RGB image (H, W, 3), got shape {tuple(image.shape)}.")
    height, width = image.shape[:2]
    if "height" in row and "width" in row:
        height, width = int(row["height"]), int(row["width"])
    # dtype and range decide the rescale: float rows already in [0, 1] are not divided by 255 again
    sample = {"image": to_unit_range(image[:height, :width].permute(2, 0, 1), "The row's `image`")}
    for name, task in task_objects.items():
        sample[name] = task.from_column(_channels_last(_as_tensor(row[name]))[:height, :width])
        if sample[name].shape[-2:] != (height, width):
            raise ValueError(f"`{name}` has size {tuple(sample[name].shape[-2:])}, the image is {(height, width)}.")
    return sample


def _resize(sample: dict[str, torch.Tensor], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Bilinear for the image, nearest for every label (no new class ids, depths or invalid-mixing)."""
    out = {}
    for key, value in sample.items():
        if tuple(value.shape[-2:]) == tuple(size):
            out[key] = value
            continue
        batched = value.unsqueeze(0) if value.ndim == 3 else value[None, None]
        if key == "image":
            resized = F.interpolate(batched, size=size, mode="bilinear", align_corners=False)
        else:
            resized = F.interpolate(batched.float(), size=size, mode="nearest").to(value.dtype)
        out[key] = resized[0] if value.ndim == 3 else resized[0, 0]
    return out


def hflip(sample: dict[str, torch.Tensor], tasks=None) -> dict[str, torch.Tensor]:
    """Mirror left-right; each task's `flip_negate_channels` change sign (the normals' x component)."""
    task_objects = _sample_tasks(sample, tasks)
    return {key: value.flip(-1) if key == "image" else task_objects[key].flip(value) for key, value in sample.items()}


def random_scale_crop(
    sample: dict[str, torch.Tensor],
    generator: torch.Generator,
    scales: Sequence[float] = MTAN_SCALES,
    tasks=None,
) -> dict[str, torch.Tensor]:
    """MTAN's RandomScaleCrop: pick s in `scales`, crop a random (H/s, W/s) window and resize it back to (H, W);
    labels of tasks with `divide_by_zoom` (depth) are divided by s (the view is s times closer). Labels use
    nearest neighbours."""
    task_objects = _sample_tasks(sample, tasks)
    scale = float(scales[int(torch.randint(len(scales), (1,), generator=generator))])
    height, width = sample["image"].shape[-2:]
    crop_h, crop_w = int(height / scale), int(width / scale)
    top = int(torch.randint(height - crop_h + 1, (1,), generator=generator))
    left = int(torch.randint(width - crop_w + 1, (1,), generator=generator))
    if scale == 1.0:
        return sample
    cropped = {key: value[..., top : top + crop_h, left : left + crop_w] for key, value in sample.items()}
    out = _resize(cropped, (height, width))
    return {key: value if key == "image" else task_objects[key].zoom(value, scale) for key, value in out.items()}


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_rescale(
    sample: dict[str, torch.Tensor],
    generator: torch.Generator,
    scale_range: Sequence[float] = (0.5, 2.0),
    tasks=None,
) -> dict[str, torch.Tensor]:
    """Resizes the whole sample by a factor drawn uniformly from `scale_range` (continuous): the image bilinearly,
    every label by nearest neighbours (class ids, binary maps and unit normals stay valid); labels of tasks with
    `divide_by_zoom` (depth) are divided by the factor. The new size is `int(side * factor)`, at least 1."""
    task_objects = _sample_tasks(sample, tasks)
    low, high = float(scale_range[0]), float(scale_range[1])
    scale = _uniform(generator, low, high)
    height, width = sample["image"].shape[-2:]
    size = (max(1, int(height * scale)), max(1, int(width * scale)))
    out = _resize(sample, size)
    return {key: value if key == "image" else task_objects[key].zoom(value, scale) for key, value in out.items()}


def _class_balance_ok(semseg: torch.Tensor, cat_max_ratio: float) -> bool:
    """Whether a crop's labelled pixels hold at least two classes and none has `cat_max_ratio` or more of them."""
    labels = semseg[semseg != IGNORE_INDEX]
    if labels.numel() == 0:
        return False
    counts = torch.bincount(labels.flatten())
    counts = counts[counts > 0]
    return counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


def random_crop(
    sample: dict[str, torch.Tensor],
    generator: torch.Generator,
    size: Sequence[int],
    cat_max_ratio: float = 1.0,
    max_attempts: int = 10,
    balance_label: str = "semseg",
) -> dict[str, torch.Tensor]:
    """Crops a random window of at most `size` (a side shorter than `size` is kept whole; pad afterwards), the
    offsets uniform over the valid range. With `cat_max_ratio < 1` and a `balance_label` label (class ids, default
    the semantic segmentation, as mmsegmentation's rule), up to `max_attempts`
    windows are tried in turn until one has two or more classes and no class covering `cat_max_ratio` or more of
    its labelled pixels; after that many refusals a last window is drawn and kept (mmsegmentation's rule, used by
    the authors' release)."""
    crop_h, crop_w = int(size[0]), int(size[1])
    height, width = sample["image"].shape[-2:]
    if (height, width) == (crop_h, crop_w):
        return sample

    def draw() -> tuple[int, int]:
        top = int(torch.randint(max(height - crop_h, 0) + 1, (1,), generator=generator))
        left = int(torch.randint(max(width - crop_w, 0) + 1, (1,), generator=generator))
        return top, left

    top, left = draw()
    if cat_max_ratio < 1.0 and balance_label in sample:
        for _ in range(max_attempts):
            window = sample[balance_label][top : top + crop_h, left : left + crop_w]
            if _class_balance_ok(window, cat_max_ratio):
                break
            top, left = draw()
    return {key: value[..., top : top + crop_h, left : left + crop_w] for key, value in sample.items()}


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> HSV with hue in [0, 1) (a fraction of the colour circle), S and V in [0, 1]."""
    red, green, blue = image.unbind(0)
    value, argmax = image.max(dim=0)
    chroma = value - image.min(dim=0).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        argmax == 0,
        ((green - blue) / safe) % 6.0,
        torch.where(argmax == 1, (blue - red) / safe + 2.0, (red - green) / safe + 4.0),
    )
    hue = torch.where(chroma > 0, hue / 6.0, torch.zeros_like(hue))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    return torch.stack([hue, saturation, value])


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    hue, saturation, value = hsv.unbind(0)
    k = torch.stack([(n + hue * 6.0) % 6.0 for n in (5.0, 3.0, 1.0)])
    return value - value * saturation * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def photometric_distortion(
    image: torch.Tensor,
    generator: torch.Generator,
    brightness_delta: float = 32 / 255,
    contrast_range: Sequence[float] = (0.5, 1.5),
    saturation_range: Sequence[float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> torch.Tensor:
    """mmsegmentation's PhotoMetricDistortion (the authors' PASCAL-Context recipe) on a (3, H, W) image in [0, 1]:
    each step with probability 0.5, in this order: brightness (+ U(-delta, delta)), contrast (x U(range)) either
    here or last (probability 0.5 each), saturation (HSV S x U(range)), hue (+ an integer in [-hue_delta,
    hue_delta) of 2 degrees, OpenCV's 180-step hue), then contrast if not done first; clipped to [0, 1] after each
    step. The arithmetic is in float (OpenCV's version rounds to uint8 between steps)."""

    def coin() -> bool:
        return float(torch.rand((), generator=generator)) < 0.5

    def contrast(img: torch.Tensor) -> torch.Tensor:
        if coin():
            return (img * _uniform(generator, *contrast_range)).clamp(0.0, 1.0)
        return img

    if coin():
        image = (image + _uniform(generator, -brightness_delta, brightness_delta)).clamp(0.0, 1.0)
    contrast_first = coin()
    if contrast_first:
        image = contrast(image)
    if coin():
        hsv = _rgb_to_hsv(image)
        hsv[1] = (hsv[1] * _uniform(generator, *saturation_range)).clamp(0.0, 1.0)
        image = _hsv_to_rgb(hsv)
    if coin():
        hsv = _rgb_to_hsv(image)
        shift = int(torch.randint(-hue_delta, hue_delta, (1,), generator=generator))
        hsv[0] = (hsv[0] + shift / 180.0) % 1.0
        image = _hsv_to_rgb(hsv)
    if not contrast_first:
        image = contrast(image)
    return image


def fit_to_size(
    sample: dict[str, torch.Tensor], size: Sequence[int], mode: str = "resize", tasks=None
) -> dict[str, torch.Tensor]:
    """Bring a sample to the model size. `"resize"` stretches; `"pad"` keeps the aspect ratio (downscaling only if
    the sample is larger) and pads centred with each task's missing-label value (the PASCAL evaluation protocol):
    class and binary labels 255, depth and normals 0, other regression tasks their `ignore_value` or NaN, image 0
    (`CTALTransform` makes the image padding 0 after normalisation instead)."""
    return _fit(sample, size, mode, tasks)[0]


def _fit(sample, size, mode, tasks=None):
    size = (int(size[0]), int(size[1]))
    if mode == "resize":
        return _resize(sample, size), None
    if mode != "pad":
        raise ValueError(f"fit mode must be 'resize' or 'pad', got {mode!r}.")
    height, width = sample["image"].shape[-2:]
    ratio = min(size[0] / height, size[1] / width, 1.0)
    if ratio < 1.0:
        sample = _resize(sample, (max(1, int(height * ratio)), max(1, int(width * ratio))))
        height, width = sample["image"].shape[-2:]
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    padding = (left, size[1] - width - left, top, size[0] - height - top)
    task_objects = _sample_tasks(sample, tasks)
    out = {}
    for key, value in sample.items():
        fill = 0.0 if key == "image" else task_objects[key].pad_value
        out[key] = F.pad(value.unsqueeze(0) if value.ndim == 2 else value, padding, value=fill)
        if value.ndim == 2:
            out[key] = out[key][0]
    valid = torch.zeros(size, dtype=torch.bool)
    valid[top : top + height, left : left + width] = True
    return out, valid


class CTALTransform:
    """Joint transforms for a per-sample dict (see the module docstring).

    Training order: random rescale, random crop, horizontal flip, MTAN scale-crop, photometric distortion; then (in
    training and evaluation) fit to `image_size`, normalise. The authors' PASCAL-Context recipe is
    `rescale_range=(0.5, 2.0), crop=True, cat_max_ratio=0.75, flip=True, photometric=True, fit="pad"`.

    Args:
        image_size: model input (H, W); `None` keeps the sample size.
        train: apply the random augmentations; evaluation is deterministic.
        flip: random horizontal flip with probability 0.5 (training).
        scale_crop: MTAN RandomScaleCrop with `scales` (training).
        rescale_range: resize the sample by a factor uniform in this range (continuous; training); `None` skips it.
        crop: random crop of `image_size` (training; a smaller side is kept whole and padded by `fit="pad"`).
        cat_max_ratio: with `crop`, retry windows (up to 10) in which one `semseg` class covers this fraction or
            more of the labelled pixels; 1 disables it.
        photometric: random brightness, contrast, saturation and hue (training; `photometric_distortion`).
        fit: `"resize"` or `"pad"` (centred, ignore-filled) to reach `image_size`.
        normalize: subtract `mean` and divide by `std` (ImageNet by default); `False` keeps [0, 1] images, as the
            authors' CNN recipe does.
        tasks: what the sample's labels are (a config, `config.get_tasks()` or names), for flipping, zooming and
            padding them; by default the built-in tasks by name. The datasets of this module pass their own.
    """

    def __init__(
        self,
        image_size: Sequence[int] | None = None,
        train: bool = False,
        flip: bool = True,
        scale_crop: bool = False,
        scales: Sequence[float] = MTAN_SCALES,
        fit: str = "resize",
        normalize: bool = True,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        rescale_range: Sequence[float] | None = None,
        crop: bool = False,
        cat_max_ratio: float = 1.0,
        photometric: bool = False,
        tasks=None,
    ):
        self.tasks = None if tasks is None else as_tasks(tasks)
        if fit not in ("resize", "pad"):
            raise ValueError(f"fit must be 'resize' or 'pad', got {fit!r}.")
        if rescale_range is not None:
            if len(rescale_range) != 2 or not 0 < float(rescale_range[0]) <= float(rescale_range[1]):
                raise ValueError(f"rescale_range must be (low, high) with 0 < low <= high, got {rescale_range!r}.")
            rescale_range = (float(rescale_range[0]), float(rescale_range[1]))
        if crop and image_size is None:
            raise ValueError("crop=True crops windows of image_size: pass image_size.")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio must lie in (0, 1], got {cat_max_ratio}.")
        self.image_size = None if image_size is None else (int(image_size[0]), int(image_size[1]))
        self.train, self.flip, self.scale_crop, self.scales = train, flip, scale_crop, tuple(scales)
        self.rescale_range, self.crop, self.cat_max_ratio = rescale_range, crop, float(cat_max_ratio)
        self.photometric = photometric
        self.fit, self.normalize = fit, normalize
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @property
    def is_random(self) -> bool:
        """Whether this transform draws random numbers (training with at least one augmentation)."""
        augmentations = (self.flip, self.scale_crop, self.rescale_range is not None, self.crop, self.photometric)
        return self.train and any(augmentations)

    def __call__(
        self, sample: dict[str, torch.Tensor], generator: torch.Generator | None = None, tasks=None
    ) -> dict[str, torch.Tensor]:
        """Transforms one sample; `tasks` (task objects of its labels) overrides the transform's own."""
        tasks = self.tasks if tasks is None else tasks
        if self.is_random:
            if generator is None:
                raise ValueError("Training transforms need an explicit torch.Generator (reproducible runs).")
            if self.rescale_range is not None:
                sample = random_rescale(sample, generator, self.rescale_range, tasks)
            if self.crop:
                sample = random_crop(sample, generator, self.image_size, self.cat_max_ratio)
            if self.flip and float(torch.rand((), generator=generator)) < 0.5:
                sample = hflip(sample, tasks)
            if self.scale_crop:
                sample = random_scale_crop(sample, generator, self.scales, tasks)
            if self.photometric:
                sample = {**sample, "image": photometric_distortion(sample["image"], generator)}
        valid = None
        if self.image_size is not None:
            sample, valid = _fit(sample, self.image_size, self.fit, tasks)
        image = sample["image"]
        if self.normalize:
            image = (image - self.mean) / self.std
            if valid is not None:
                image = image * valid  # padding is 0 after normalisation
        sample["image"] = image.contiguous()
        return sample

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, train={self.train}, flip={self.flip}, "
            f"scale_crop={self.scale_crop}, scales={self.scales}, rescale_range={self.rescale_range}, "
            f"crop={self.crop}, cat_max_ratio={self.cat_max_ratio}, photometric={self.photometric}, "
            f"fit={self.fit!r}, normalize={self.normalize})"
        )


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, index): the same augmentation in any worker, after resume."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def collate_samples(samples: Sequence[dict[str, torch.Tensor]], tasks) -> dict:
    """Stack transformed samples into `{"pixel_values": (B, 3, H, W), "labels": {task: (B, ...)}}`."""
    tasks = list(as_tasks(tasks))
    if not samples:
        raise ValueError("Cannot collate an empty batch.")
    sizes = {tuple(s["image"].shape[-2:]) for s in samples}
    if len(sizes) > 1:
        raise ValueError(f"Samples have different sizes {sorted(sizes)}: pass image_size to the transform.")
    return {
        "pixel_values": torch.stack([s["image"] for s in samples]),
        "labels": {task: torch.stack([s[task] for s in samples]) for task in tasks},
    }


def _split_rows(rows) -> list[Mapping]:
    if isinstance(rows, Mapping):  # a batch of columns, e.g. dataset[0:8]
        lengths = {len(v) for v in rows.values()}
        if len(lengths) != 1:
            raise ValueError(f"Batch columns have different lengths {sorted(lengths)}.")
        return [{key: value[i] for key, value in rows.items()} for i in range(lengths.pop())]
    return list(rows)


def to_model_inputs(
    rows,
    tasks,
    transform: CTALTransform | None = None,
    generator: torch.Generator | None = None,
    image_size: Sequence[int] | None = None,
) -> dict:
    """Dataset rows (a list of rows or a dict of batched columns) -> model inputs for `tasks`.

    Without `transform`, applies the evaluation transform (resize to `image_size` if given, ImageNet normalisation).
    A training `transform` draws its randomness from `generator`, one sample after the other."""
    transform = transform if transform is not None else CTALTransform(image_size=image_size)
    task_objects = as_tasks(tasks)
    samples = [
        transform(row_to_sample(row, task_objects), generator=generator, tasks=task_objects)
        for row in _split_rows(rows)
    ]
    return collate_samples(samples, task_objects)


class CTALDataCollator:
    """`collate_fn` for a DataLoader over dataset rows: deterministic (evaluation) transforms, or training ones fed
    by the collator's own generator (reproducible with `num_workers=0`; use `CTALTorchDataset` otherwise)."""

    def __init__(self, tasks, transform: CTALTransform | None = None, seed: int | None = None):
        self.task_objects = as_tasks(tasks)
        self.tasks = list(self.task_objects)
        self.transform = transform if transform is not None else CTALTransform()
        self.generator = None if seed is None else torch.Generator().manual_seed(int(seed))

    def __call__(self, rows) -> dict:
        return to_model_inputs(rows, self.task_objects, self.transform, self.generator)


class CTALTorchDataset(torch.utils.data.Dataset):
    """Wraps a `datasets.Dataset` (any format): item `i` is the transformed sample of row `i`, with augmentations
    drawn from `sample_generator(seed, epoch, i)`. Call `set_epoch(e)` before each epoch (before creating the
    DataLoader iterator, so that workers see it). Batch with `collate_fn=CTALTorchDataset.collate`."""

    def __init__(self, dataset, tasks, transform: CTALTransform | None = None, seed: int = 0):
        self.dataset = dataset.with_format("torch") if hasattr(dataset, "with_format") else dataset
        self.task_objects = as_tasks(tasks)
        self.tasks = list(self.task_objects)
        self.transform = transform if transform is not None else CTALTransform()
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            sample = row_to_sample(self.dataset[int(index)], self.task_objects)
        except Exception as error:  # noqa: BLE001 - a corrupt row fails in Pillow / pyarrow / our checks: name it
            info = getattr(self.dataset, "info", None)
            name = getattr(info, "dataset_name", None) or "the dataset"
            split = getattr(self.dataset, "split", None)
            where = f"{name!r}" + (f" ({split} split)" if split else "")
            raise ValueError(f"Row {int(index)} of {where}: {type(error).__name__}: {error}") from error
        generator = sample_generator(self.seed, self.epoch, int(index))
        return self.transform(sample, generator=generator, tasks=self.task_objects)

    def collate(self, samples: Sequence[dict[str, torch.Tensor]]) -> dict:
        return collate_samples(samples, self.task_objects)


__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "MTAN_SCALES",
    "CTALDataCollator",
    "CTALTorchDataset",
    "CTALTransform",
    "collate_samples",
    "fit_to_size",
    "hflip",
    "photometric_distortion",
    "random_crop",
    "random_rescale",
    "random_scale_crop",
    "row_to_sample",
    "sample_generator",
    "to_model_inputs",
]
