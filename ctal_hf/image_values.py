"""What an image's pixel values mean, decided by its dtype and range rather than assumed: 8-bit integers are
0..255; 16-bit integers (and Pillow's 16-bit / 32-bit integer modes) are scaled by their type's peak; float images
already in [0, 1] are kept as they are (never divided by 255 again) and float images in (1, 255] are 0..255.
Anything else (negative floats, floats above 255: already normalised, or another unit) is refused with the fix,
since no rescale would be right for it. Used by the image processor, the data transforms and the pipeline."""

from __future__ import annotations

import numpy as np
import torch

# Pillow modes holding more than 8 bits per pixel, and the value that is white in each.
HIGH_DEPTH_MODES = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": None, "F": None}


def value_scale(image: torch.Tensor, name: str = "the image") -> float:
    """The factor that maps `image`'s values to [0, 1]: 1/255 for 8-bit data (uint8, or float in (1, 255]), 1 for
    float data already in [0, 1] (or bool), 1/65535 for integers above 255 (16-bit). Raises a `ValueError`
    naming `name` for non-finite, negative or out-of-range values."""
    if image.dtype == torch.bool:
        return 1.0
    if image.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(image.shape)}).")
    low, high = float(image.min()), float(image.max())
    if not image.is_floating_point():
        if low < 0:
            raise ValueError(f"{name} has negative integer values (minimum {int(low)}); pixel values are >= 0.")
        if high <= 255:
            return 1.0 / 255.0
        if high <= 65535:
            return 1.0 / 65535.0
        raise ValueError(
            f"{name} has integer values up to {int(high)}, beyond 16 bits; convert it to uint8 (0..255) or to float "
            "in [0, 1]."
        )
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError(f"{name} contains NaN or infinite values.")
    if low >= 0.0 and high <= 1.0:
        return 1.0
    if low >= 0.0 and high <= 255.0:
        return 1.0 / 255.0
    raise ValueError(
        f"{name} is a float image with values in [{low:g}, {high:g}]: neither [0, 1] nor [0, 255], so it is already "
        "normalised or in another unit. Pass the image before normalisation (float in [0, 1], or uint8 0..255)."
    )


def to_unit_range(image: torch.Tensor, name: str = "the image") -> torch.Tensor:
    """`image` as float32 in [0, 1], rescaled as its dtype and range say (see `value_scale`)."""
    scale = value_scale(image, name)
    image = image.float()
    return image if scale == 1.0 else image * scale


def pil_high_depth_to_unit(image) -> np.ndarray:
    """A Pillow image in a 16-bit, 32-bit integer or float mode -> float32 `(H, W)` in [0, 1] (Pillow's own
    conversion to RGB would clip these to 0..255, turning a [0, 1] float TIFF black)."""
    array = np.asarray(image, dtype=np.float64)
    peak = HIGH_DEPTH_MODES.get(image.mode)
    if peak is not None:
        return (array / peak).clip(0, 1).astype(np.float32)
    tensor = torch.from_numpy(array.astype(np.int64) if image.mode == "I" else array)
    return to_unit_range(tensor, f"the {image.mode}-mode image").numpy().astype(np.float32)


__all__ = ["HIGH_DEPTH_MODES", "pil_high_depth_to_unit", "to_unit_range", "value_scale"]
