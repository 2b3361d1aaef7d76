"""Image processor for CTAL models: any image in (path, PIL, numpy, torch; RGB, grayscale or RGBA; any size),
`pixel_values` at the model's fixed `image_size` out, and per-task maps at each image's own size back.

A CTAL model is tied to one input size (its grouped convolution has one group per pixel), so the processor always
resizes to `config.image_size`; `post_process_multitask` resizes the predictions back. Rescaling and normalisation
are stored in `preprocessor_config.json`, so inference feeds the model exactly what training did."""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.utils import logging

from .image_layouts import EXPECTED_LAYOUTS, _array_to_chw, _pil_to_array
from .image_values import value_scale
from .registry import IMAGENET_MEAN, IMAGENET_STD
from .stock_post_processing import CTALStockPostProcessingMixin
from .tasks import BUILTIN_TASK_NAMES, as_tasks

logger = logging.get_logger(__name__)

# Above this many output pixels, `post_process_multitask` resizes and decodes a band of rows at a time (about
# `_BAND_PIXELS` pixels per band), so the memory it needs beyond the returned maps stays bounded.
BANDED_DECODE_PIXELS = 2**22
_BAND_PIXELS = 2**18


def _bilinear_taps(out_size: int, in_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Source indices (lower, upper) and the weight of the upper one for each output index, as
    `F.interpolate(mode="bilinear", align_corners=False)` computes them."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)  # torch computes the taps in float32
    source = ((torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    lower = source.floor().long().clamp_(max=in_size - 1)
    upper = (lower + 1).clamp_(max=in_size - 1)
    return (lower, upper), (source - lower).clamp_(0, 1).float()


# Seconds an image fetch may wait for the server (connecting, and between bytes) before it fails; `timeout=`
# (the pipeline's call option) overrides it.
DEFAULT_FETCH_TIMEOUT = 30.0


def pixel_limit() -> int | None:
    """The most pixels an image file may have: Pillow's `PIL.Image.MAX_IMAGE_PIXELS` (about 89 million; set it to
    another number, or None, to change the limit). Larger files are refused before they are decoded (a
    decompression bomb would take gigabytes)."""
    return PIL.Image.MAX_IMAGE_PIXELS


def _check_pixel_count(image: PIL.Image.Image, name: str) -> None:
    limit = pixel_limit()
    width, height = image.size
    if limit is not None and width * height > limit:
        raise ValueError(
            f"{name} is {width} x {height} = {width * height} pixels, more than the limit of {limit} (a "
            "decompression bomb, or a very large image): resize it first, or raise `PIL.Image.MAX_IMAGE_PIXELS` if "
            "you trust the file."
        )


def _open_checked(source, name: str) -> PIL.Image.Image:
    """Opens (header), checks the pixel count, then decodes fully and applies the EXIF orientation."""
    try:
        with PIL.Image.open(source) as image:
            _check_pixel_count(image, name)
            image.load()  # decode now: a truncated file fails here, not later inside a batch
            return PIL.ImageOps.exif_transpose(image)  # a new, file-independent image
    except PIL.Image.DecompressionBombError as error:
        raise ValueError(
            f"{name} is refused as a possible decompression bomb ({error}): resize it first, or raise "
            "`PIL.Image.MAX_IMAGE_PIXELS` if you trust the file."
        ) from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, ValueError) and str(error).startswith(name):
            raise
        raise ValueError(
            f"Cannot read {name} as an image ({type(error).__name__}: {error}); the file is corrupt, truncated, or "
            "not an image format Pillow can open."
        ) from error


def fetch_url(url: str, timeout: float | None = None) -> bytes:
    """The body of `url`, with a timeout (`DEFAULT_FETCH_TIMEOUT` unless given) and the HTTP status checked: an
    error names the URL and the status or the network failure."""
    import httpx

    timeout = DEFAULT_FETCH_TIMEOUT if timeout is None else float(timeout)
    if not timeout > 0:
        raise ValueError(f"`timeout` must be a positive number of seconds, got {timeout!r}.")
    try:
        response = httpx.get(url, timeout=timeout, follow_redirects=True)
    except httpx.TimeoutException:
        raise ValueError(
            f"Fetching {url!r} timed out after {timeout:g} s (the server did not answer); check the address, or pass "
            "a larger `timeout=`."
        ) from None
    except httpx.HTTPError as error:
        raise ValueError(
            f"Cannot fetch {url!r} ({type(error).__name__}: {error}); check the address and the network, or download "
            "the file and pass its path."
        ) from None
    if response.status_code >= 400:
        raise ValueError(
            f"Fetching {url!r} failed: the server answered HTTP {response.status_code} {response.reason_phrase}; "
            "check the address."
        )
    return response.content


def load_image(source: "str | os.PathLike | PIL.Image.Image", timeout: float | None = None) -> PIL.Image.Image:
    """Opens an image file (or URL) fully, with EXIF orientation applied; the mode (L, RGBA, ...) is kept so the
    processor can convert it. Raises `FileNotFoundError` for a missing file, `IsADirectoryError` for a folder, and
    `ValueError` naming the file or URL when it is not a readable image (corrupt, truncated, another kind of file,
    above the pixel limit, an HTTP error or a network timeout)."""
    if isinstance(source, PIL.Image.Image):
        return source
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        import io

        return _open_checked(io.BytesIO(fetch_url(source, timeout)), f"the image at {source!r}")
    path = Path(source)
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a folder, not an image file; pass the image files in it.")
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {str(path)!r}.")
    return _open_checked(path, repr(str(path)))


class CTALImageProcessor(CTALStockPostProcessingMixin, TorchvisionBackend):
    r"""
    Prepares images for [`CTALForDenseMultitask`] and turns its predictions into per-image maps.

    Preprocessing: load (paths), convert to RGB (grayscale is repeated, transparency composited onto white), resize
    to `size` (the model's `image_size`, bilinear), rescale by `rescale_factor`, normalise with `image_mean` /
    `image_std` when `do_normalize`, and stack into `pixel_values` `(batch, 3, height, width)` float32. Numpy arrays
    are read channels-last and torch tensors channels-first (`input_data_format` overrides); ambiguous layouts raise.

    Args:
        size (`dict[str, int]`, *optional*, defaults to `{"height": 288, "width": 384}`):
            The model's input size; use [`~CTALImageProcessor.from_model_config`] to take it from a config.
        do_normalize (`bool`, *optional*, defaults to `True`):
            Whether to normalise with `image_mean` / `image_std` (ImageNet by default). Set it as the model was
            trained: the authors' release feeds `[0, 1]` images (`do_normalize=False`).
        image_mean, image_std (`list[float]`, *optional*, default to ImageNet's):
            Normalisation statistics.
        do_rescale (`bool`, *optional*, defaults to `True`), rescale_factor (`float`, *optional*, defaults to 1/255):
            Maps 8-bit values to `[0, 1]`.
        resample (`PILImageResampling`, *optional*, defaults to `BILINEAR`):
            Filter used to resize images.

    Examples:

    ```python
    >>> from ctal_hf import CTALConfig, CTALImageProcessor

    >>> processor = CTALImageProcessor.from_model_config(CTALConfig.from_preset("nyuv2"))
    >>> inputs = processor(images, return_tensors="pt")  # pixel_values (batch, 3, 288, 384)
    >>> outputs = model(**inputs)
    >>> maps = processor.post_process_multitask(outputs, target_sizes=[image.size[::-1] for image in images])
    ```"""

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    image_mean = list(IMAGENET_MEAN)
    image_std = list(IMAGENET_STD)
    size = {"height": 288, "width": 384}
    default_to_square = True
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_center_crop = False
    do_pad = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if not (self.size and self.size.height and self.size.width):
            raise ValueError(
                f"CTALImageProcessor resizes to the model's fixed input size: `size` must be "
                f"{{'height': H, 'width': W}}, got {dict(self.size) if self.size else self.size}."
            )

    @classmethod
    def from_model_config(cls, config: Any, **kwargs) -> "CTALImageProcessor":
        """A processor for a model built from `config` (a `CTALConfig`, or a model holding one): resizes to
        `config.image_size`; keyword arguments (`do_normalize`, `image_mean`, ...) override the defaults."""
        config = getattr(config, "config", config)
        image_size = getattr(config, "image_size", None)
        if image_size is None or len(image_size) != 2:
            raise ValueError(f"`config.image_size` must be [height, width], got {image_size!r}.")
        kwargs.setdefault("size", {"height": int(image_size[0]), "width": int(image_size[1])})
        return cls(**kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        """The (height, width) that `pixel_values` have."""
        return int(self.size.height), int(self.size.width)

    # ----------------------------------------------------------------------------------------------- input handling
    def fetch_images(self, images):
        """Files and URLs -> PIL images (with clear errors); everything else passes through for `process_image`."""
        if isinstance(images, (list, tuple)):
            return [self.fetch_images(image) for image in images]
        if isinstance(images, (str, os.PathLike)):
            return load_image(images)
        return images

    def _prepare_images_structure(self, images, expected_ndims: int = 3) -> list:
        """A single image, a list / tuple (nested lists are flattened) or a 4-D batch array -> flat list."""
        flat = []

        def add(item):
            if isinstance(item, (list, tuple)):
                for element in item:
                    add(element)
            elif isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4:
                flat.extend(list(item))
            elif isinstance(item, (str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor)):
                flat.append(item)
            else:
                raise ValueError(f"Expected {EXPECTED_LAYOUTS}; got an object of type {type(item).__name__}.")

        add(images)
        if not flat:
            raise ValueError("No images given: expected one image or a non-empty list of images.")
        return [self.fetch_images(item) for item in flat]

    def process_image(
        self,
        image,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        device: "torch.device | str | None" = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """One raw image -> RGB (3, H, W) tensor (dtype kept: uint8 stays uint8). Usable alone, e.g. by the
        pipeline to learn an image's size before batching."""
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        if isinstance(image, (str, os.PathLike)):
            image = load_image(image)
        if isinstance(image, PIL.Image.Image):
            tensor = torch.from_numpy(np.array(_pil_to_array(image))).permute(2, 0, 1)
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            tensor = _array_to_chw(image, input_data_format)
            tensor = self._check_value_range(tensor, do_rescale, rescale_factor)
            if do_convert_rgb:
                tensor = self._to_rgb(tensor, white=(1.0 / rescale_factor) if do_rescale else 1.0)
        else:
            raise ValueError(f"Expected {EXPECTED_LAYOUTS}; got an object of type {type(image).__name__}.")
        if tensor.shape[0] != 3:
            raise ValueError(
                f"The model takes RGB images, got {tensor.shape[0]} channels with `do_convert_rgb=False`; "
                "pass `do_convert_rgb=True` to convert grayscale / RGBA."
            )
        tensor = tensor.contiguous()
        return tensor.to(device) if device is not None else tensor

    @staticmethod
    def _check_value_range(tensor: torch.Tensor, do_rescale: bool, rescale_factor: float) -> torch.Tensor:
        if not tensor.is_floating_point():
            peak = int(tensor.max())
            if int(tensor.min()) < 0:
                raise ValueError(f"Integer image values must be >= 0, got a minimum of {int(tensor.min())}.")
            if do_rescale and peak * rescale_factor > 1.0 + 1e-6:
                raise ValueError(
                    f"Integer image values reach {peak}, beyond the 8-bit range that `rescale_factor` "
                    f"{rescale_factor:g} maps to [0, 1]; convert to uint8 (0..255) or to float in [0, 1] with "
                    "`do_rescale=False`."
                )
            return tensor.to(torch.uint8) if tensor.dtype != torch.uint8 and peak <= 255 else tensor
        if not torch.isfinite(tensor).all():
            raise ValueError("The image contains NaN or infinite values.")
        if not do_rescale:
            return tensor
        # The values decide: a float image already in [0, 1] is brought to 0..255 here so that the rescale gives it
        # back unchanged (it is never divided by 255 twice); other ranges are refused with the fix.
        scale = value_scale(tensor, "The image")
        if scale == 1.0:
            return tensor / rescale_factor
        if abs(scale - rescale_factor) > 1e-12:
            raise ValueError(
                f"A float image in 0..255 does not match `rescale_factor` {rescale_factor:g}; pass uint8 images or "
                "`do_rescale=False` with values already in [0, 1]."
            )
        return tensor

    @staticmethod
    def _to_rgb(tensor: torch.Tensor, white: float) -> torch.Tensor:
        """(1|3|4, H, W) -> (3, H, W): grayscale repeated, alpha composited onto white (as for PIL inputs)."""
        if tensor.shape[0] == 1:
            return tensor.expand(3, -1, -1)
        if tensor.shape[0] == 4:
            dtype = tensor.dtype
            rgb, alpha = tensor[:3].double(), tensor[3:].double() / white
            out = rgb * alpha + white * (1.0 - alpha)
            return out.round().clamp(0, 255).to(dtype) if not dtype.is_floating_point else out.to(dtype)
        return tensor

    def rescale_and_normalize(self, images, do_rescale, rescale_factor, do_normalize, image_mean, image_std):
        """The model always gets float32, even with rescaling and normalisation both off."""
        images = super().rescale_and_normalize(images, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        return images.to(torch.float32)

    # ---------------------------------------------------------------------------------------------- post-processing
    def post_process_multitask(
        self,
        outputs: Any,
        target_sizes: "Sequence[Sequence[int]] | torch.Tensor | None" = None,
        tasks: Sequence[str] | None = None,
        task_specs: Any = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Raw predictions -> one dict per image, task -> map at that image's size.

        Args:
            outputs: a `CTALDenseMultitaskOutput`, or a dict task -> tensor `(batch, channels, h, w)` (the model's
                `predictions`).
            target_sizes: `(height, width)` per image (the original sizes); `None` keeps the model's size.
            tasks: the tasks to return (default: all predicted tasks).
            task_specs: what the tasks are: the model's config (or `config.get_tasks()`, or a dict name -> spec).
                Needed for tasks that are not built in; by default the built-in tasks are known by name.

        Returns:
            A list (one entry per image) of dicts, each task's map decoded by its kind (bilinear resizing of the raw
            prediction first): classification (`semseg` / `parts`) class ids `(H, W)` int64, regression `(H, W)`
            for one channel (`depth`, in the model's unit) or `(H, W, C)`, normals `(H, W, 3)` unit vectors, binary
            (`saliency` / `edge`) probabilities `(H, W)` in [0, 1]."""
        predictions = getattr(outputs, "predictions", None)
        if predictions is None:
            predictions = outputs.get("predictions", outputs) if isinstance(outputs, dict) else None
        if not isinstance(predictions, dict) or not predictions:
            raise ValueError(
                "`outputs` must be a CTALDenseMultitaskOutput or a dict task -> prediction tensor, got "
                f"{type(outputs).__name__}."
            )
        if task_specs is None:
            known = as_tasks([task for task in predictions if task in BUILTIN_TASK_NAMES])
        else:
            known = as_tasks(task_specs)
        unknown = [task for task in predictions if task not in known]
        if unknown:
            raise ValueError(
                f"Unknown task(s) {unknown} in the predictions (known: {sorted(known)}); pass "
                "`task_specs=model.config` to post-process tasks that are not built in."
            )
        if tasks is None:
            tasks = list(predictions)
        else:
            missing = [task for task in tasks if task not in predictions]
            if missing:
                raise ValueError(f"Task(s) {missing} were requested but the model predicts only {list(predictions)}.")
        batch_size = next(iter(predictions.values())).shape[0]
        if target_sizes is not None:
            if isinstance(target_sizes, torch.Tensor):
                target_sizes = target_sizes.tolist()
            if len(target_sizes) != batch_size:
                raise ValueError(
                    f"Got {len(target_sizes)} target sizes for a batch of {batch_size} predictions; pass one "
                    "(height, width) per image."
                )
            for index, size in enumerate(target_sizes):
                if len(size) != 2 or not all(float(side).is_integer() and int(side) >= 1 for side in size):
                    raise ValueError(
                        f"target_sizes[{index}] is {tuple(size)}; each target size is the (height, width) of an "
                        "image, two integers >= 1."
                    )
        results = []
        for index in range(batch_size):
            result = {}
            for task in tasks:
                prediction = predictions[task][index : index + 1].float()
                if prediction.ndim != 4:
                    raise ValueError(
                        f"Prediction for {task!r} must be (batch, channels, height, width), got "
                        f"{tuple(predictions[task].shape)}."
                    )
                size = tuple(prediction.shape[-2:])
                if target_sizes is not None:
                    size = tuple(int(side) for side in target_sizes[index])
                if size[0] * size[1] > BANDED_DECODE_PIXELS and size != tuple(prediction.shape[-2:]):
                    result[task] = _resize_and_decode_in_bands(known[task], prediction[0], size)
                    continue
                if size != tuple(prediction.shape[-2:]):
                    prediction = F.interpolate(prediction, size=size, mode="bilinear", align_corners=False)
                result[task] = known[task].decode(prediction[0])
            results.append(result)
        return results


def _resize_and_decode_in_bands(spec: Any, prediction: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`spec.decode(bilinear resize of prediction to size)` for large sizes, a band of rows at a time: the full size
    multi-channel map (13 float32 logits per pixel for NYUv2 semseg: 3.3 GB at 8000 x 8000) is never built, only the
    decoded map. The same bilinear taps as `F.interpolate(..., align_corners=False)`, applied along the width once
    and along the height per band."""
    height, width = size
    rows, row_weights = _bilinear_taps(height, prediction.shape[-2])
    columns, column_weights = _bilinear_taps(width, prediction.shape[-1])
    # Along the width for every source row: (channels, source rows, width), small (the model's height).
    wide = torch.lerp(prediction[..., columns[0]], prediction[..., columns[1]], column_weights)
    band = max(1, _BAND_PIXELS // width)
    decoded = None
    for start in range(0, height, band):
        stop = min(start + band, height)
        top, bottom = wide[:, rows[0][start:stop]], wide[:, rows[1][start:stop]]
        piece = spec.decode(torch.lerp(top, bottom, row_weights[start:stop, None]))
        if decoded is None:
            decoded = torch.empty((height, *piece.shape[1:]), dtype=piece.dtype)
        decoded[start:stop] = piece
    return decoded


__all__ = ["CTALImageProcessor", "load_image", "fetch_url", "pixel_limit", "DEFAULT_FETCH_TIMEOUT", "EXPECTED_LAYOUTS"]
