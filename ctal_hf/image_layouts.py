"""How an image given as an array is read: numpy arrays channels-last (as PIL, OpenCV and `datasets` give them), torch
tensors channels-first (as torchvision gives them), PIL images as RGB with transparency composited onto white; a
layout that contradicts that reading is refused with the layouts that work. Used by the image processor."""

import numpy as np
import PIL.Image
import torch
from transformers.image_utils import ChannelDimension

from .image_values import HIGH_DEPTH_MODES, pil_high_depth_to_unit

EXPECTED_LAYOUTS = (
    "a file path, a PIL image, a numpy array (height, width) or (height, width, channels), or a torch tensor "
    "(height, width) or (channels, height, width), with 1 (grayscale), 3 (RGB) or 4 (RGBA) channels"
)
_VALID_CHANNELS = (1, 3, 4)


def _pil_to_array(image: PIL.Image.Image) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8 RGB array; transparency is composited onto white (as transformers does) and
    16-bit / float grayscale is scaled to 8 bits instead of being clipped."""
    if image.mode in HIGH_DEPTH_MODES:  # float [0, 1] stays [0, 1]; 16-bit is scaled by its peak
        array = (pil_high_depth_to_unit(image) * 255.0).round().astype(np.uint8)
        return np.repeat(array[..., None], 3, axis=-1)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(PIL.Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))


def _layout_error(shape: tuple[int, ...], kind: str, hint: str) -> ValueError:
    return ValueError(f"Cannot read a {kind} of shape {shape} as an image: {hint} Expected {EXPECTED_LAYOUTS}.")


def _array_to_chw(image: np.ndarray | torch.Tensor, input_data_format: str | ChannelDimension | None) -> torch.Tensor:
    """Numpy arrays are read channels-last (as PIL, OpenCV and `datasets` give them), torch tensors channels-first
    (as torchvision gives them); `input_data_format` overrides. An array whose layout contradicts that reading (for
    example a 4-channel numpy array in (C, H, W) order) is refused rather than guessed."""
    is_numpy = isinstance(image, np.ndarray)
    kind = "numpy array" if is_numpy else "torch tensor"
    shape = tuple(image.shape)
    if is_numpy:
        if image.dtype.kind not in "uifb":
            raise _layout_error(shape, kind, f"its dtype {image.dtype} is not numeric.")
        if image.dtype == bool:
            image = image.astype(np.uint8)
        elif image.dtype.kind in "ui" and image.dtype != np.uint8:
            image = image.astype(np.int64)  # torch lacks most ops on uint16 / uint32
        if not (image.flags.writeable and image.flags.c_contiguous):
            image = np.array(image)
        tensor = torch.from_numpy(image)
    else:
        if image.is_complex():
            raise _layout_error(shape, kind, f"its dtype {image.dtype} is not real.")
        tensor = image.detach().cpu()
        if tensor.dtype == torch.bool:
            tensor = tensor.to(torch.uint8)
        elif not tensor.is_floating_point() and tensor.dtype != torch.uint8:
            tensor = tensor.to(torch.int64)
    if 0 in shape:
        raise _layout_error(shape, kind, "it is empty.")
    if tensor.ndim == 2:
        return tensor.unsqueeze(0)
    if tensor.ndim != 3:
        raise _layout_error(shape, kind, f"it has {tensor.ndim} dimensions (a batch of images goes in a list).")
    if input_data_format is not None:
        channels_last = ChannelDimension(input_data_format) == ChannelDimension.LAST
    else:
        channels_last = is_numpy
    channels = shape[-1] if channels_last else shape[0]
    if channels not in _VALID_CHANNELS:
        other = shape[0] if channels_last else shape[-1]
        if other in _VALID_CHANNELS and input_data_format is None:
            if is_numpy:
                hint = (
                    f"numpy arrays are read as (height, width, channels), but this one looks like (channels, height, "
                    f"width) with {other} channels. Transpose it with `array.transpose(1, 2, 0)` or pass "
                    "`input_data_format='channels_first'`."
                )
            else:
                hint = (
                    f"torch tensors are read as (channels, height, width), but this one looks like (height, width, "
                    f"channels) with {other} channels. Permute it with `tensor.permute(2, 0, 1)` or pass "
                    "`input_data_format='channels_last'`."
                )
        else:
            layout = "channels-last" if channels_last else "channels-first"
            hint = f"read {layout}, it has {channels} channels, not 1, 3 or 4."
        raise _layout_error(shape, kind, hint)
    return tensor.permute(2, 0, 1) if channels_last else tensor


__all__ = ["EXPECTED_LAYOUTS"]
