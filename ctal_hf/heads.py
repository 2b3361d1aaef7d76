"""Task heads: the head families (which final heads and STL / MTL heads a model ends in), the shared decoder front
(`CTALNeck`: cross-scale fusion + initial heads) and the multi-scale initial heads of CTAL-MS and MTI-Net."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    CTALBasicBlock,
    CTALBottleneck,
    CTALClassifier,
    CTALCrossScaleFusion,
    CTALDeepLabHead,
    CTALHighResolutionHead,
    CTALResidualHead,
    upsample_to,
)
from .registry import FPM_GROUPINGS, HEAD_FAMILY_INFO, CTALHeadFamilyInfo, check_choice

if TYPE_CHECKING:
    from .backbones import CTALFeatureInfo
    from .configuration_ctal import CTALConfig


class CTALFusedDeepLabHead(CTALDeepLabHead):
    """A DeepLab head on a backbone's maps: the single map as is, several maps fused at the finest first (the STL /
    MTL head of the `"deeplab"` family)."""

    def __init__(self, in_channels: list[int], out_channels: int, dropout: float = 0.0):
        super().__init__(sum(in_channels), out_channels, dropout=dropout)
        self.fusion = CTALCrossScaleFusion(in_channels) if len(in_channels) > 1 else None

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return super().forward(self.fusion(features) if self.fusion is not None else features[0])


@dataclass(frozen=True)
class CTALHeadFamily(CTALHeadFamilyInfo):
    """How a model ends (`config.head_family`): the paper's CNN models and its SwinV2 models differ in three places,
    the registry entry (`registry.HEAD_FAMILY_INFO`: `projection_norm`, whether the 1x1 projections into CTAL and
    Concat's have BatchNorm + ReLU) and two head builders.

    Args:
        final_head: `(in_channels, out_channels, config) -> module` on one map: the final heads of CTAL and of the
            distillation baselines.
        task_head: `(backbone_channels, out_channels, config) -> module` on the backbone's list of maps: the heads
            of STL and MTL.
    """

    final_head: Callable[[int, int, CTALConfig], nn.Module] = field(kw_only=True)
    task_head: Callable[[list[int], int, CTALConfig], nn.Module] = field(kw_only=True)


def _residual_final_head(in_channels: int, out_channels: int, config: CTALConfig) -> nn.Module:
    return CTALResidualHead(in_channels, out_channels)


def _high_resolution_task_head(in_channels: list[int], out_channels: int, config: CTALConfig) -> nn.Module:
    return CTALHighResolutionHead(in_channels, out_channels)


def _deeplab_final_head(in_channels: int, out_channels: int, config: CTALConfig) -> nn.Module:
    return CTALDeepLabHead(in_channels, out_channels, dropout=config.aspp_dropout)


def _deeplab_task_head(in_channels: list[int], out_channels: int, config: CTALConfig) -> nn.Module:
    return CTALFusedDeepLabHead(in_channels, out_channels, dropout=config.aspp_dropout)


# The model side of `registry.HEAD_FAMILY_INFO`: the head builders of each family.
HEAD_BUILDERS: dict[str, tuple[Callable, Callable]] = {
    # Two bottlenecks + 1x1 final heads; MTI-Net's high-resolution head (fusion + 1x1) for STL / MTL.
    "bottleneck": (_residual_final_head, _high_resolution_task_head),
    # DeepLab-v3 heads everywhere (with `config.aspp_dropout`); projections with BatchNorm + ReLU.
    "deeplab": (_deeplab_final_head, _deeplab_task_head),
}
HEAD_FAMILIES: dict[str, CTALHeadFamily] = {
    name: CTALHeadFamily(
        **{item.name: getattr(info, item.name) for item in fields(info)},
        final_head=HEAD_BUILDERS[name][0],
        task_head=HEAD_BUILDERS[name][1],
    )
    for name, info in HEAD_FAMILY_INFO.items()
}


def build_final_head(config: CTALConfig, in_channels: int, task: str) -> nn.Module:
    """The final head of `task` on `in_channels` features, of the config's head family."""
    return HEAD_FAMILIES[config.head_family].final_head(in_channels, config.task_channels(task), config)


def build_task_head(config: CTALConfig, backbone_channels: list[int], task: str) -> nn.Module:
    """The STL / MTL head of `task` on the backbone's maps, of the config's head family."""
    return HEAD_FAMILIES[config.head_family].task_head(list(backbone_channels), config.task_channels(task), config)


class CTALInitialHead(nn.Module):
    """Single-scale initial head: two bottlenecks (the first projects `in_channels` to `channels`) give the task
    features; a 1x1 conv gives the initial prediction."""

    def __init__(self, in_channels: int, channels: int, out_channels: int):
        super().__init__()
        self.blocks = nn.Sequential(CTALBottleneck(in_channels, channels), CTALBottleneck(channels, channels))
        self.classifier = CTALClassifier(channels, out_channels)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.blocks(hidden)
        return features, self.classifier(features)


class CTALNeck(nn.Module):
    """The decoder front shared by CTAL-SS and the single-scale distillation baselines (PAD-Net, PAP-Net, Concat):
    several backbone maps are fused at the finest (cross-scale fusion), a single map is used as is; then per task an
    initial head (two bottlenecks, `head_channels` out) whose 1x1 output is the deeply supervised initial prediction
    and whose features feed the cross-task step.

    Returns `(task_features, initial_predictions)`, both keyed by task, at the finest map's stride."""

    def __init__(self, config: CTALConfig, feature_info: CTALFeatureInfo):
        super().__init__()
        self.tasks = list(config.tasks)
        channels = list(feature_info.channels)
        self.fusion = CTALCrossScaleFusion(channels) if feature_info.is_multi_scale else None
        self.initial_heads = nn.ModuleDict(
            {
                task: CTALInitialHead(sum(channels), config.head_channels, config.task_channels(task))
                for task in self.tasks
            }
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        shared = self.fusion(features) if self.fusion is not None else features[0]
        task_features, initial = {}, {}
        for task in self.tasks:
            task_features[task], initial[task] = self.initial_heads[task](shared)
        return task_features, initial


class CTALScaleHead(nn.Module):
    """Initial head of one task at one scale of a multi-scale decoder: two basic blocks and a 1x1 prediction."""

    def __init__(self, in_channels: int, channels: int, out_channels: int):
        super().__init__()
        self.blocks = nn.Sequential(CTALBasicBlock(in_channels, channels), CTALBasicBlock(channels, channels))
        self.classifier = CTALClassifier(channels, out_channels)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.blocks(hidden)
        return features, self.classifier(features)


class CTALSqueezeExcitation(nn.Module):
    """Squeeze-and-excitation channel gate (global average pool -> 1x1 -> ReLU -> 1x1 -> sigmoid), with which each
    task of MTI-Net's feature propagation selects channels from the shared representation."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        gate = self.expand(F.relu(self.reduce(hidden.mean(dim=(2, 3), keepdim=True)), inplace=True))
        return hidden * torch.sigmoid(gate)


class CTALFeaturePropagation(nn.Module):
    """MTI-Net's feature propagation module (Vandenhende et al., ECCV 2020, section 3.3) between two scales.

    The T task features of the coarser scale (C channels each) are concatenated; a non-linear function (a basic block
    T*C -> T*C/4, a basic block, a 1x1 conv back to T*C) gives attention logits that a softmax across the tasks
    turns into per-task masks over the concatenation; a basic block reduces the masked features to one shared C
    channel representation; each task selects from it with its own squeeze-and-excitation gate and adds the result
    to its own features. The output is upsampled to the finer scale, where it joins the backbone map.

    `grouping` says which logits one softmax normalises (`config.fpm_grouping`): `"tasks"`, the T tasks' copies of
    each channel (masks per task, as the MTI-Net paper describes); `"consecutive"`, T consecutive channels of the
    concatenation (the authors' releases view the T*C logits as (C, T) and take the softmax over T, so one group
    mixes neighbouring channels of one task, or of two at a task boundary)."""

    def __init__(self, tasks: list[str], channels: int, grouping: str = "tasks"):
        super().__init__()
        check_choice("fpm_grouping", grouping, FPM_GROUPINGS)
        self.tasks = list(tasks)
        self.grouping = grouping
        shared = len(self.tasks) * channels
        hidden = max(shared // 4, 1)
        self.attention = nn.Sequential(
            CTALBasicBlock(shared, hidden), CTALBasicBlock(hidden, hidden), nn.Conv2d(hidden, shared, 1)
        )
        self.reduction = CTALBasicBlock(shared, channels)
        self.selection = nn.ModuleDict({task: CTALSqueezeExcitation(channels) for task in self.tasks})

    def forward(self, features: dict[str, torch.Tensor], size: torch.Size) -> dict[str, torch.Tensor]:
        stacked = torch.stack([features[task] for task in self.tasks], dim=1)  # (B, T, C, h, w)
        batch, num_tasks, channels, height, width = stacked.shape
        concat = stacked.reshape(batch, num_tasks * channels, height, width)
        logits = self.attention(concat)
        if self.grouping == "tasks":  # softmax across the tasks, per channel and pixel
            mask = torch.softmax(logits.reshape(batch, num_tasks, channels, height, width), dim=1)
        else:  # softmax over each run of T consecutive channels of the concatenation
            mask = torch.softmax(logits.reshape(batch, channels, num_tasks, height, width), dim=2)
        masked = mask.reshape(batch, num_tasks * channels, height, width) * concat
        shared = self.reduction(masked)
        return {task: upsample_to(features[task] + self.selection[task](shared), size) for task in self.tasks}


class CTALMultiScaleInitialHeads(nn.Module):
    """Coarse-to-fine initial predictions at every backbone scale (CTAL-MS and MTI-Net): at each scale a task head
    sees the backbone map and the features propagated from the coarser scale.

    Returns per task the list of features and the list of predictions, finest scale first."""

    def __init__(
        self, tasks: list[str], channels: list[int], out_channels: dict[str, int], fpm_grouping: str = "tasks"
    ):
        super().__init__()
        self.tasks = list(tasks)
        self.num_scales = len(channels)
        heads = []
        propagations = []
        for scale, width in enumerate(channels):
            coarser = channels[scale + 1] if scale + 1 < len(channels) else 0
            heads.append(
                nn.ModuleDict({task: CTALScaleHead(width + coarser, width, out_channels[task]) for task in self.tasks})
            )
            propagations.append(
                CTALFeaturePropagation(self.tasks, coarser, fpm_grouping) if coarser else nn.Identity()
            )
        self.heads = nn.ModuleList(heads)
        self.propagations = nn.ModuleList(propagations)

    def forward(
        self, features: list[torch.Tensor]
    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        task_features = {task: [None] * self.num_scales for task in self.tasks}
        predictions = {task: [None] * self.num_scales for task in self.tasks}
        propagated = None
        for scale in reversed(range(self.num_scales)):
            backbone_map = features[scale]
            current = {}
            for task in self.tasks:
                hidden = backbone_map if propagated is None else torch.cat([backbone_map, propagated[task]], dim=1)
                current[task], predictions[task][scale] = self.heads[scale][task](hidden)
            for task in self.tasks:
                task_features[task][scale] = current[task]
            if scale > 0:
                propagated = self.propagations[scale - 1](current, features[scale - 1].shape[-2:])
        return task_features, predictions


__all__ = [
    "CTALHeadFamily",
    "HEAD_BUILDERS",
    "HEAD_FAMILIES",
    "CTALFusedDeepLabHead",
    "build_final_head",
    "build_task_head",
    "CTALNeck",
    "CTALInitialHead",
    "CTALScaleHead",
    "CTALSqueezeExcitation",
    "CTALFeaturePropagation",
    "CTALMultiScaleInitialHeads",
]
