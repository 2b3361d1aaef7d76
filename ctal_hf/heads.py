"""Initial task heads: the per-task features that CTAL (or a baseline's distillation) consumes, and the initial,
deeply supervised predictions made from them."""

import torch
from torch import nn

from .blocks import CTALBasicBlock, CTALBottleneck, CTALClassifier, CTALConvBnAct, upsample_to


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


class CTALScaleHead(nn.Module):
    """Initial head of one task at one scale of a multi-scale decoder: two basic blocks and a 1x1 prediction."""

    def __init__(self, in_channels: int, channels: int, out_channels: int):
        super().__init__()
        self.blocks = nn.Sequential(CTALBasicBlock(in_channels, channels), CTALBasicBlock(channels, channels))
        self.classifier = CTALClassifier(channels, out_channels)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.blocks(hidden)
        return features, self.classifier(features)


class CTALFeaturePropagation(nn.Module):
    """MTI-Net's feature propagation module: the task features of a coarser scale are merged into one shared
    representation, from which each task selects what it needs with a sigmoid gate driven by its own features; the
    result is upsampled to the next, finer scale."""

    def __init__(self, tasks: list[str], channels: int):
        super().__init__()
        self.tasks = list(tasks)
        self.shared = nn.Sequential(
            CTALConvBnAct(len(self.tasks) * channels, channels, 1), CTALBasicBlock(channels, channels)
        )
        self.gates = nn.ModuleDict({task: nn.Conv2d(channels, channels, 1) for task in self.tasks})

    def forward(self, features: dict[str, torch.Tensor], size: torch.Size) -> dict[str, torch.Tensor]:
        shared = self.shared(torch.cat([features[task] for task in self.tasks], dim=1))
        return {
            task: upsample_to(shared * torch.sigmoid(self.gates[task](features[task])), size) for task in self.tasks
        }


class CTALMultiScaleInitialHeads(nn.Module):
    """Coarse-to-fine initial predictions at every backbone scale (CTAL-MS and MTI-Net): at each scale a task head
    sees the backbone map and the features propagated from the coarser scale.

    Returns per task the list of features and the list of predictions, finest scale first."""

    def __init__(self, tasks: list[str], channels: list[int], out_channels: dict[str, int]):
        super().__init__()
        self.tasks = list(tasks)
        self.num_scales = len(channels)
        heads = []
        propagations = []
        for scale, width in enumerate(channels):
            coarser = channels[scale + 1] if scale + 1 < len(channels) else 0
            heads.append(
                nn.ModuleDict(
                    {task: CTALScaleHead(width + coarser, width, out_channels[task]) for task in self.tasks}
                )
            )
            propagations.append(CTALFeaturePropagation(self.tasks, coarser) if coarser else nn.Identity())
        self.heads = nn.ModuleList(heads)
        self.propagations = nn.ModuleList(propagations)

    def forward(
        self, features: list[torch.Tensor], refine=None
    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
        """`refine(scale, task_features) -> task_features`, if given, runs on each scale's task features before
        they are propagated (MTI-Net's per-scale distillation)."""
        task_features = {task: [None] * self.num_scales for task in self.tasks}
        predictions = {task: [None] * self.num_scales for task in self.tasks}
        propagated = None
        for scale in reversed(range(self.num_scales)):
            backbone_map = features[scale]
            current = {}
            for task in self.tasks:
                hidden = backbone_map if propagated is None else torch.cat([backbone_map, propagated[task]], dim=1)
                current[task], predictions[task][scale] = self.heads[scale][task](hidden)
            if refine is not None:
                current = refine(scale, current)
            for task in self.tasks:
                task_features[task][scale] = current[task]
            if scale > 0:
                propagated = self.propagations[scale - 1](current, features[scale - 1].shape[-2:])
        return task_features, predictions


__all__ = ["CTALInitialHead", "CTALScaleHead", "CTALFeaturePropagation", "CTALMultiScaleInitialHeads"]
