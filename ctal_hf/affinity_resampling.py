"""Resampling CTAL's per-pixel fusion parameters to another affinity size (running a model at another input size).

The fusion of `CTALAffinityModule` is a grouped convolution with one group per affinity pixel: its weight
`(N, T, k, k)` and bias `(N,)`, N = h * w, hold for query pixel `i` (row i of the fused map `M`) the k x k kernel
applied to the T affinity rows `A_t[i]`. Seen as maps over the query pixels, the weight is `T * k * k` maps of size
(h, w) and the bias one: `resample_fusion` resizes those maps to (h', w'). The kernel offsets keep their meaning (a
neighbour one affinity pixel away on the new grid), and the result is a weight `(h' * w', T, k, k)` and bias.

`AFFINITY_RESAMPLINGS` is the one registry of methods; `DEFAULT_AFFINITY_RESAMPLING` ("bilinear") is what
`model(pixel_values, interpolate_affinity=True)` and `from_pretrained(folder, image_size=[H, W])` use:

- `F.interpolate(mode="bilinear", align_corners=False)`: a query pixel keeps the parameters of the old pixels at the
  same place in the image (pixel centres, as the image and every feature map are resized), corners included only
  as far as they are pixel centres;
- multiplied by `h * w / (h' * w')` ("area" rescaling): the diffusion `D_t[:, i] = sum_j V_t[:, j] M[i, j]` sums over
  every key pixel j, so on a grid with 4x the pixels the same image would give a sum about 4x as large; the rescaling
  keeps its magnitude, which the following batch norm (fixed statistics at inference) expects. The
  `bilinear_unscaled` entry leaves it out (compared in benchmarks/any_resolution.py).

Resampling to the same size returns the parameters themselves (bit-exact identity)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CTALAffinityResampling:
    """One entry of `AFFINITY_RESAMPLINGS`.

    Args:
        mode: the `F.interpolate` mode applied to the parameter maps over (h, w).
        align_corners: `F.interpolate`'s `align_corners` (None for modes that take none).
        area_rescale: whether to multiply weight and bias by `old pixels / new pixels`, keeping the magnitude of
            the diffusion's sum over key pixels.
    """

    mode: str
    align_corners: bool | None = False
    area_rescale: bool = True

    def resample_map(self, maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(C, h, w) maps -> (C, size), in float32 at least (the parameters' dtype is restored by the caller)."""
        work = maps.float() if maps.dtype in (torch.bfloat16, torch.float16) else maps
        resized = F.interpolate(work.unsqueeze(0), size=size, mode=self.mode, align_corners=self.align_corners)[0]
        if self.area_rescale:
            resized = resized * (maps.shape[-2] * maps.shape[-1] / (size[0] * size[1]))
        return resized


AFFINITY_RESAMPLINGS: dict[str, CTALAffinityResampling] = {
    "bilinear": CTALAffinityResampling("bilinear", align_corners=False, area_rescale=True),
    "bilinear_unscaled": CTALAffinityResampling("bilinear", align_corners=False, area_rescale=False),
    "bicubic": CTALAffinityResampling("bicubic", align_corners=False, area_rescale=True),
    "nearest": CTALAffinityResampling("nearest-exact", align_corners=None, area_rescale=True),
}
DEFAULT_AFFINITY_RESAMPLING = "bilinear"


def _resampling(method: str) -> CTALAffinityResampling:
    if method not in AFFINITY_RESAMPLINGS:
        raise ValueError(f"Unknown affinity resampling {method!r}; choose from {list(AFFINITY_RESAMPLINGS)}.")
    return AFFINITY_RESAMPLINGS[method]


def resample_fusion(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    size: tuple[int, int],
    new_size: tuple[int, int],
    method: str = DEFAULT_AFFINITY_RESAMPLING,
    area_rescale: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fusion weight `(h * w, T, k, k)` and bias `(h * w,)` (or None) of affinity size `size` = (h, w),
    resampled to `new_size`: `(h' * w', T, k, k)` and `(h' * w',)`, same dtype and device. Differentiable (a
    fine-tune through it reaches the original parameters). The same size returns `weight` and `bias` themselves.
    `area_rescale` (None: the method's own) overrides the `old pixels / new pixels` factor: a fused map already
    divided by its pixel count (`affinity_normalization="num_pixels"`) must not be rescaled a second time."""
    size, new_size = tuple(int(side) for side in size), tuple(int(side) for side in new_size)
    if weight.dim() != 4 or weight.shape[0] != size[0] * size[1]:
        raise ValueError(
            f"A CTAL fusion weight of affinity size {size[0]}x{size[1]} has shape ({size[0] * size[1]}, T, k, k), "
            f"got {tuple(weight.shape)}."
        )
    if min(new_size) < 1:
        raise ValueError(f"Cannot resample the CTAL fusion to an empty affinity size {new_size}.")
    resampling = _resampling(method)
    if area_rescale is not None:
        resampling = dataclasses.replace(resampling, area_rescale=area_rescale)
    if new_size == size:
        return weight, bias
    num_tasks, kernel = weight.shape[1], weight.shape[2:]
    maps = weight.reshape(size[0], size[1], -1).permute(2, 0, 1)  # (T * k * k, h, w)
    new_weight = resampling.resample_map(maps, new_size).permute(1, 2, 0).reshape(-1, num_tasks, *kernel)
    new_bias = None
    if bias is not None:
        new_bias = resampling.resample_map(bias.reshape(1, *size), new_size).reshape(-1).to(bias.dtype)
    return new_weight.to(weight.dtype).contiguous(), new_bias


def resize_fusion_conv(
    conv: nn.Conv2d,
    size: tuple[int, int],
    new_size: tuple[int, int],
    method: str = DEFAULT_AFFINITY_RESAMPLING,
    area_rescale: bool | None = None,
) -> None:
    """Replaces, in place, the parameters of a grouped fusion conv (`CTALAffinityModule.fusion`) built for affinity
    size `size` by their resampling to `new_size`, and updates its channel and group counts."""
    weight, bias = resample_fusion(
        conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), size, new_size, method, area_rescale
    )
    num_pixels, num_tasks = weight.shape[0], weight.shape[1]
    conv.weight = nn.Parameter(weight.clone(), requires_grad=conv.weight.requires_grad)
    if bias is not None:
        conv.bias = nn.Parameter(bias.clone(), requires_grad=conv.bias.requires_grad)
    conv.in_channels, conv.out_channels, conv.groups = num_pixels * num_tasks, num_pixels, num_pixels


def check_input_size(
    size: tuple[int, int], stride: int, fixed_reason: str | None = None, what: str = "The input"
) -> None:
    """Refuses an input size a model cannot run at with resampled affinity parameters: a side that is not a
    multiple of the backbone's largest `stride` (the error lists the nearest sizes that work), or any other size
    than its own for a backbone fixed to its input size at creation (`fixed_reason`)."""
    if fixed_reason is not None:
        raise ValueError(f"{what} cannot run at another size than its image_size: {fixed_reason}")
    bad = [
        (name, side) for name, side in zip(("height", "width"), size, strict=True) if side % stride or side < stride
    ]
    if bad:

        def nearest(side: int) -> str:
            lower, upper = side // stride * stride, -(-side // stride) * stride
            return " or ".join(str(value) for value in dict.fromkeys((lower, upper)) if value >= stride)

        details = "; ".join(f"{name} {side} (nearest: {nearest(side)})" for name, side in bad)
        suggestion = [max(stride, round(side / stride) * stride) for side in size]
        raise ValueError(
            f"{what} size {list(size)} is not a multiple of the backbone's largest stride {stride}: {details}. "
            f"Use e.g. {suggestion}."
        )


def affinity_size_for(image_size: tuple[int, int], affinity_stride: int) -> tuple[int, int]:
    """The affinity map size (h, w) CTAL works at for an input of `image_size`."""
    return image_size[0] // affinity_stride, image_size[1] // affinity_stride


def affinity_size_of(finest_map: torch.Tensor, finest_stride: int, affinity_stride: int) -> tuple[int, int]:
    """The affinity map size for the input a backbone's finest map (NCHW, at `finest_stride`) was computed from:
    what the decoders resize their features to before CTAL / PAP-Net."""
    height, width = finest_map.shape[-2:]
    return affinity_size_for((height * finest_stride, width * finest_stride), affinity_stride)


def nearest_valid_size(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The input size closest to `size` whose sides are multiples of `stride` (at least `stride`)."""
    return tuple(max(stride, round(side / stride) * stride) for side in size)


__all__ = [
    "AFFINITY_RESAMPLINGS",
    "CTALAffinityResampling",
    "DEFAULT_AFFINITY_RESAMPLING",
    "affinity_size_for",
    "affinity_size_of",
    "check_input_size",
    "nearest_valid_size",
    "resample_fusion",
    "resize_fusion_conv",
]
