"""Decoders: everything between the backbone maps and the task predictions, and `DECODERS`, the model side of
`registry.DECODER_INFO` (the decoder names of `config.decoder` with what each needs): name -> class.

A decoder is built from the config and the backbone's `CTALFeatureInfo` (channels and strides of its maps, finest
first), takes the maps and returns `(predictions, initial_predictions)`, both dicts keyed by task, at the decoder's
own resolution; the model upsamples them to the input size."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from .affinity_resampling import affinity_size_of
from .baselines import (
    CTALConcatDecoder,
    CTALHardSharingDecoder,
    CTALMTINetDecoder,
    CTALPADNetDecoder,
    CTALPAPNetDecoder,
    CTALSingleTaskDecoder,
)
from .blocks import CTALCrossScaleFusion, upsample_to
from .ctal_module import CTALAffinityModule
from .heads import CTALMultiScaleInitialHeads, CTALNeck, build_final_head
from .registry import DECODER_INFO, DECODER_NAMES, CTALDecoderInfo

if TYPE_CHECKING:
    from .backbones import CTALFeatureInfo
    from .configuration_ctal import CTALConfig


class CTALSingleScaleDecoder(nn.Module):
    """CTAL-SS: backbone -> neck (cross-scale fusion, initial heads) -> CTAL -> final heads."""

    def __init__(self, config: CTALConfig, feature_info: CTALFeatureInfo):
        super().__init__()
        self.tasks = list(config.tasks)
        self.size = feature_info.affinity_map_size(config.affinity_scale)
        self.strides = (feature_info.finest_stride, feature_info.affinity_stride(config.affinity_scale))
        self.neck = CTALNeck(config, feature_info)
        self.ctal = CTALAffinityModule(config, config.head_channels, self.size)
        self.final_heads = nn.ModuleDict(
            {task: build_final_head(config, config.ctal_channels, task) for task in self.tasks}
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[dict, dict]:
        task_features, initial = self.neck(features)
        # Table 5's 1/6 and 1/8 variants run CTAL on resized features.
        size = affinity_size_of(features[0], *self.strides)  # `self.size` at the model's image_size
        task_features = {task: upsample_to(hidden, size) for task, hidden in task_features.items()}
        refined = self.ctal(task_features)
        predictions = {task: self.final_heads[task](refined[task]) for task in self.tasks}
        return predictions, initial


class CTALMultiScaleDecoder(nn.Module):
    """CTAL-MS: initial predictions at every scale (coarse to fine, deeply supervised) -> per-task cross-scale
    fusion -> ONE CTAL -> final heads."""

    def __init__(self, config: CTALConfig, feature_info: CTALFeatureInfo):
        super().__init__()
        self.tasks = list(config.tasks)
        self.size = feature_info.affinity_map_size(config.affinity_scale)
        self.strides = (feature_info.finest_stride, feature_info.affinity_stride(config.affinity_scale))
        channels = list(feature_info.channels)
        out_channels = {task: config.task_channels(task) for task in self.tasks}
        self.initial_heads = CTALMultiScaleInitialHeads(self.tasks, channels, out_channels, config.fpm_grouping)
        self.fusions = nn.ModuleDict({task: CTALCrossScaleFusion(channels) for task in self.tasks})
        self.ctal = CTALAffinityModule(config, sum(channels), self.size)
        self.final_heads = nn.ModuleDict(
            {task: build_final_head(config, config.ctal_channels, task) for task in self.tasks}
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[dict, dict]:
        task_features, initial = self.initial_heads(features)
        size = affinity_size_of(features[0], *self.strides)  # `self.size` at the model's image_size
        fused = {task: upsample_to(self.fusions[task](task_features[task]), size) for task in self.tasks}
        refined = self.ctal(fused)
        predictions = {task: self.final_heads[task](refined[task]) for task in self.tasks}
        return predictions, initial


# The model side of `registry.DECODER_INFO`: the class each decoder name builds.
DECODER_CLASSES: dict[str, type[nn.Module]] = {
    "ctal_ss": CTALSingleScaleDecoder,
    "ctal_ms": CTALMultiScaleDecoder,
    "stl": CTALSingleTaskDecoder,
    "mtl": CTALHardSharingDecoder,
    "padnet": CTALPADNetDecoder,
    "papnet": CTALPAPNetDecoder,
    "mtinet": CTALMTINetDecoder,
    "concat": CTALConcatDecoder,
}


@dataclass(frozen=True)
class CTALDecoderSpec(CTALDecoderInfo):
    """One entry of `DECODERS`: the registry entry (`registry.DECODER_INFO`: name and flags) and its class, built as
    `decoder_class(config, feature_info)`, or `decoder_class(config)` when it `owns_backbones`."""

    decoder_class: type[nn.Module] = field(kw_only=True)


DECODERS: dict[str, CTALDecoderSpec] = {
    name: CTALDecoderSpec(
        **{item.name: getattr(info, item.name) for item in fields(info)}, decoder_class=DECODER_CLASSES[name]
    )
    for name, info in DECODER_INFO.items()
}

__all__ = [
    "CTALSingleScaleDecoder",
    "CTALMultiScaleDecoder",
    "CTALDecoderSpec",
    "DECODER_CLASSES",
    "DECODERS",
    "DECODER_NAMES",
]
