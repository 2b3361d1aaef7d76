"""Decoders: everything between the backbone maps and the task predictions.

A decoder takes the backbone maps (finest first) and returns `(predictions, initial_predictions)`, both dicts
keyed by task, at the decoder's own resolution; the model upsamples them to the input size. `DECODER_CLASSES`
maps `config.decoder` to its class: the one place where the name is resolved."""

import torch
from torch import nn

from .baselines import BASELINE_DECODER_CLASSES
from .blocks import CTALCrossScaleFusion, CTALDeepLabHead, CTALResidualHead, upsample_to
from .configuration_ctal import CTALConfig
from .ctal_module import CTALAffinityModule
from .heads import CTALInitialHead, CTALMultiScaleInitialHeads


def build_final_head(config: CTALConfig, in_channels: int, task: str) -> nn.Module:
    """CNN models end in two bottlenecks + 1x1; SwinV2 models in a DeepLab head."""
    if config.is_cnn:
        return CTALResidualHead(in_channels, config.task_channels(task))
    return CTALDeepLabHead(in_channels, config.task_channels(task), dropout=config.aspp_dropout)


class CTALSingleScaleDecoder(nn.Module):
    """CTAL-SS: backbone -> cross-scale fusion -> initial heads -> CTAL -> final heads."""

    def __init__(self, config: CTALConfig, backbone_channels: list[int]):
        super().__init__()
        self.tasks = list(config.tasks)
        self.size = config.affinity_map_size
        # A CNN's four maps are fused at 1/4; SwinV2 gives one map (1/32 or 1/16) that the heads read directly.
        self.fusion = CTALCrossScaleFusion(backbone_channels) if config.is_cnn else None
        in_channels = sum(backbone_channels)
        self.initial_heads = nn.ModuleDict(
            {
                task: CTALInitialHead(in_channels, config.head_channels, config.task_channels(task))
                for task in self.tasks
            }
        )
        self.ctal = CTALAffinityModule(config, config.head_channels, self.size)
        self.final_heads = nn.ModuleDict(
            {task: build_final_head(config, config.ctal_channels, task) for task in self.tasks}
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[dict, dict]:
        shared = self.fusion(features) if self.fusion is not None else features[-1]
        task_features, initial = {}, {}
        for task in self.tasks:
            task_features[task], initial[task] = self.initial_heads[task](shared)
        # Table 5's 1/6 and 1/8 variants run CTAL on resized features.
        task_features = {task: upsample_to(hidden, self.size) for task, hidden in task_features.items()}
        refined = self.ctal(task_features)
        predictions = {task: self.final_heads[task](refined[task]) for task in self.tasks}
        return predictions, initial


class CTALMultiScaleDecoder(nn.Module):
    """CTAL-MS: initial predictions at every scale (coarse to fine, deeply supervised) -> per-task cross-scale
    fusion -> ONE CTAL -> final heads."""

    def __init__(self, config: CTALConfig, backbone_channels: list[int]):
        super().__init__()
        self.tasks = list(config.tasks)
        self.size = config.affinity_map_size
        out_channels = {task: config.task_channels(task) for task in self.tasks}
        self.initial_heads = CTALMultiScaleInitialHeads(
            self.tasks, backbone_channels, out_channels, config.fpm_grouping
        )
        self.fusions = nn.ModuleDict({task: CTALCrossScaleFusion(backbone_channels) for task in self.tasks})
        self.ctal = CTALAffinityModule(config, sum(backbone_channels), self.size)
        self.final_heads = nn.ModuleDict(
            {task: build_final_head(config, config.ctal_channels, task) for task in self.tasks}
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[dict, dict]:
        task_features, initial = self.initial_heads(features)
        fused = {task: upsample_to(self.fusions[task](task_features[task]), self.size) for task in self.tasks}
        refined = self.ctal(fused)
        predictions = {task: self.final_heads[task](refined[task]) for task in self.tasks}
        return predictions, initial


DECODER_CLASSES: dict[str, type[nn.Module]] = {
    "ctal_ss": CTALSingleScaleDecoder,
    "ctal_ms": CTALMultiScaleDecoder,
    **BASELINE_DECODER_CLASSES,
}

__all__ = ["CTALSingleScaleDecoder", "CTALMultiScaleDecoder", "DECODER_CLASSES"]
