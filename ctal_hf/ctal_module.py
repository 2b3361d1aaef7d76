"""The cross-task affinity learning (CTAL) module (paper section 2.1; docs/design.md, "The CTAL module").

Per task t: project the initial-head features to C channels (`X_t`), normalise every pixel's vector, and form the
intra-task affinity `A_t = Xn_t^T Xn_t` (N x N, N = h * w). The T affinities are interleaved channel by channel and
fused by ONE grouped convolution (N groups of T channels, k x k kernel) into a single cross-task map `M`, shared
by all tasks. Each task diffuses a 3x3 projection of its features through `M` (Eq. 1), blends the result with
`X_t` by `gamma` (Eq. 2) and upsamples it 2x for its final head."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .affinity_resampling import DEFAULT_AFFINITY_RESAMPLING, resample_fusion, resize_fusion_conv
from .blocks import conv_bn
from .ctal_attention import check_dense_fits, cross_task_diffusion
from .heads import HEAD_FAMILIES

if TYPE_CHECKING:
    from .configuration_ctal import CTALConfig


def stack_task_maps(maps: list[torch.Tensor]) -> torch.Tensor:
    """(B, T, C, h, w) from T maps (B, C, h, w), in their memory layout: NCHW maps give a contiguous stack,
    channels-last maps the channels-last layout of the (B, T*C, h, w) view (what `cross_task_diffusion` reads
    without copying)."""
    return torch.cat(maps, dim=1).unflatten(1, (len(maps), -1))


class CTALTaskProjection(nn.Module):
    """1x1 projection of a task's features to the affinity channels: a plain conv, or conv + BN + ReLU (the deeplab
    head family, as the paper's SwinV2 models)."""

    def __init__(self, in_channels: int, out_channels: int, with_norm: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=not with_norm)
        self.norm = nn.BatchNorm2d(out_channels) if with_norm else nn.Identity()
        self.act = nn.ReLU(inplace=True) if with_norm else nn.Identity()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(conv_bn(self.conv, self.norm, hidden))


class CTALUpsampleBlock(nn.Module):
    """2x learned upsampling after the diffusion: ConvTranspose2d(2, stride 2) -> BN -> ReLU -> 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.norm = nn.BatchNorm2d(channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(conv_bn(self.deconv, self.norm, hidden), inplace=True))


class CTALFusionConv(nn.Conv2d):
    """The grouped conv that fuses the T interleaved affinity maps into `M`: `nn.Conv2d(T * N, N, k, groups=N)`
    (input channel `i * T + t` holds `A_t[i]`, output channel `i` is row `i` of `M`), whose `reset_parameters` starts
    it as `config.fusion_init` says: PyTorch's default (`"default"`, the release), zero (`"zero"`) or PyTorch's
    default divided by N (`"scaled"`). The random numbers drawn are the same in all three."""

    def __init__(self, num_tasks: int, num_pixels: int, kernel_size: int, init: str = "default"):
        self.init = init
        super().__init__(num_tasks * num_pixels, num_pixels, kernel_size, padding=kernel_size // 2, groups=num_pixels)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        loaded = getattr(self.weight, "_is_hf_initialized", False)  # weights a checkpoint gave are never rescaled
        if self.init == "default" or loaded:
            return
        scale = 0.0 if self.init == "zero" else 1.0 / self.out_channels
        with torch.no_grad():
            self.weight.mul_(scale)
            self.bias.mul_(scale)


class CTALAffinityModule(nn.Module):
    """CTAL for `tasks` at an affinity size `(h, w)` (the grouped conv has one group per pixel).

    Takes `{task: (B, in_channels, h, w)}` and returns `{task: (B, ctal_channels, 2h, 2w)}`. Features of another
    size run with the fusion parameters resampled to it (`ctal_hf.affinity_resampling`; the model allows it only
    with `interpolate_affinity=True`); `resize` resamples them for good."""

    def __init__(self, config: CTALConfig, in_channels: int, size: tuple[int, int]):
        super().__init__()
        self.tasks = list(config.tasks)
        self.size = tuple(size)
        self.gamma = config.gamma
        self.attention_impl = config.attention_impl
        self.affinity_normalization = config.affinity_normalization
        # A fused map divided by its own pixel count keeps its scale at any size: resampling adds no area factor.
        self._area_rescale = False if self.affinity_normalization == "num_pixels" else None
        channels = config.ctal_channels
        num_pixels = self.size[0] * self.size[1]
        num_tasks = len(self.tasks)
        with_norm = HEAD_FAMILIES[config.head_family].projection_norm
        self.projections = nn.ModuleDict(
            {task: CTALTaskProjection(in_channels, channels, with_norm=with_norm) for task in self.tasks}
        )
        self.values = nn.ModuleDict({task: nn.Conv2d(channels, channels, 3, padding=1) for task in self.tasks})
        # Input channel i * T + t holds A_t[i]; output channel i is row i of the fused map M.
        self.fusion = CTALFusionConv(num_tasks, num_pixels, config.kernel_size, init=config.fusion_init)
        self.upsample = nn.ModuleDict({task: CTALUpsampleBlock(channels) for task in self.tasks})
        self.gradient_checkpointing = False

    def resize(self, size: tuple[int, int], method: str = DEFAULT_AFFINITY_RESAMPLING) -> None:
        """Rebuilds the module at affinity size `size` from its fusion parameters resampled (`resample_fusion`)."""
        resize_fusion_conv(self.fusion, self.size, size, method, self._area_rescale)
        self.size = tuple(size)

    def check_memory(self, batch_size: int, size: tuple[int, int] | None = None) -> None:
        """Refuses, before the step starts, a dense diffusion whose N x N maps cannot fit in the available memory
        (a `ValueError` with the estimate; see `check_dense_fits`), at affinity size `size` (default: its own)."""
        if self.attention_impl != "dense" or torch.compiler.is_compiling():
            return
        weight = self.fusion.weight
        device_type = weight.device.type
        autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
        backward = self.training and torch.is_grad_enabled()
        num_pixels = (size or self.size)[0] * (size or self.size)[1]
        check_dense_fits(num_pixels, len(self.tasks), batch_size, dtype, weight.device, backward)

    def _diffuse(self, stacked: torch.Tensor, values: torch.Tensor, weight, bias) -> torch.Tensor:
        normalized = F.normalize(stacked, dim=2)
        if self.affinity_normalization == "num_pixels":  # a departure from the paper: M / N
            num_pixels = weight.shape[0]  # the (possibly resampled) map's N
            weight, bias = weight / num_pixels, None if bias is None else bias / num_pixels
        return cross_task_diffusion(values, normalized, weight, bias, impl=self.attention_impl)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        projected = {task: self.projections[task](features[task]) for task in self.tasks}
        size = tuple(next(iter(projected.values())).shape[-2:])
        weight, bias = resample_fusion(
            self.fusion.weight, self.fusion.bias, self.size, size, area_rescale=self._area_rescale
        )
        stacked = stack_task_maps([projected[task] for task in self.tasks])  # (B, T, C, h, w)
        values = stack_task_maps([self.values[task](projected[task]) for task in self.tasks])
        if self.gradient_checkpointing and self.training:
            diffused = torch.utils.checkpoint.checkpoint(
                self._diffuse, stacked, values, weight, bias, use_reentrant=False
            )
        else:
            diffused = self._diffuse(stacked, values, weight, bias)
        outputs = {}
        for index, task in enumerate(self.tasks):
            blended = self.gamma * diffused[:, index] + (1.0 - self.gamma) * projected[task]
            outputs[task] = self.upsample[task](blended)
        return outputs


__all__ = ["CTALAffinityModule", "CTALFusionConv", "CTALTaskProjection", "CTALUpsampleBlock", "stack_task_maps"]
