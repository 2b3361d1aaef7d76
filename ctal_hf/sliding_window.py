"""Sliding-window inference: a CTAL model run on windows of its own `image_size` over a larger image, the windows'
predictions blended into maps of the whole image.

Windows step by `window * (1 - overlap)` (rounded up to whole pixels; `DEFAULT_OVERLAP` = 1/3), the last one of a
row or column aligned with the image's edge, so every pixel is covered. Each window's final predictions (class
logits, regression values, unnormalised normals, binary logits: the model's raw outputs) are weighted by a tent
that is highest at the window's centre and falls linearly to `EDGE_WEIGHT` of that at its border, where a window
sees least context, and the weighted predictions are summed with the weights normalised per pixel. An image smaller
than the window along a side is padded (edge pixels repeated) to the window and the maps cropped back. On an image
of exactly the window's size the result is the plain forward (one window of weight 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DEFAULT_OVERLAP = 1.0 / 3.0
# A window's weight at its border, relative to its centre: > 0, so pixels that only border windows cover stay defined.
EDGE_WEIGHT = 0.1


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of `window` pixels covering `length` pixels with about `overlap` of overlap; the
    last window ends at the edge. One window when `length <= window`."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"`overlap` is the fraction of a window shared with the next one, in [0, 1); got {overlap}.")
    if length <= window:
        return [0]
    step = max(1, math.ceil(window * (1.0 - overlap)))
    starts = list(range(0, length - window, step))
    return [*starts, length - window]


def _tent(window: int, device: torch.device) -> torch.Tensor:
    """1-D weights over a window: 1 at the centre, `EDGE_WEIGHT` at the outermost pixel centres."""
    position = (torch.arange(window, device=device, dtype=torch.float32) + 0.5) / window  # in (0, 1)
    distance = (position - 0.5).abs() * 2.0  # 0 at the centre, 1 - 1/window at the border pixels
    return 1.0 - (1.0 - EDGE_WEIGHT) * distance / max(distance.max().item(), 1e-12)


def sliding_window_predictions(
    model,
    pixel_values: torch.Tensor,
    window: tuple[int, int] | None = None,
    overlap: float = DEFAULT_OVERLAP,
    window_batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """Final predictions `{task: (B, C, H, W)}` (float32) of `model` (a `CTALForDenseMultitask`) for `pixel_values`
    `(B, 3, H, W)` of any size, by windows of `window` (default: the model's `image_size`) with `overlap`, blended
    as the module docstring says. `window_batch_size` windows go through the model at once."""
    if pixel_values.dim() != 4:
        raise ValueError(f"`pixel_values` must be (batch, 3, height, width), got shape {tuple(pixel_values.shape)}.")
    window = tuple(int(side) for side in (window or model.config.image_size))
    if window_batch_size < 1:
        raise ValueError(f"`window_batch_size` must be at least 1, got {window_batch_size}.")
    batch, _, height, width = pixel_values.shape
    pad_h, pad_w = max(0, window[0] - height), max(0, window[1] - width)
    if pad_h or pad_w:
        pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h), mode="replicate")
    full_h, full_w = pixel_values.shape[-2:]
    rows, cols = window_starts(full_h, window[0], overlap), window_starts(full_w, window[1], overlap)
    boxes = [(top, left) for top in rows for left in cols]
    device = pixel_values.device
    weight = _tent(window[0], device)[:, None] * _tent(window[1], device)[None, :]
    total = torch.zeros(full_h, full_w, device=device)
    for top, left in boxes:
        total[top : top + window[0], left : left + window[1]] += weight
    maps: dict[str, torch.Tensor] = {}
    for start in range(0, len(boxes), window_batch_size):
        chunk = boxes[start : start + window_batch_size]
        crops = torch.cat([pixel_values[:, :, t : t + window[0], s : s + window[1]] for t, s in chunk])
        predictions = model(pixel_values=crops).predictions
        for task, value in predictions.items():
            value = value.float().unflatten(0, (len(chunk), batch))
            if task not in maps:
                maps[task] = torch.zeros(batch, value.shape[2], full_h, full_w, device=device)
            for index, (top, left) in enumerate(chunk):
                share = weight / total[top : top + window[0], left : left + window[1]]  # 1 where one window covers
                maps[task][:, :, top : top + window[0], left : left + window[1]] += share * value[index]
    return {task: value[:, :, :height, :width] for task, value in maps.items()}


__all__ = ["DEFAULT_OVERLAP", "EDGE_WEIGHT", "sliding_window_predictions", "window_starts"]
