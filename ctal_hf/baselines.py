"""The paper's baselines as decoders in the same config space as CTAL (`config.decoder`), so that every comparison of
the paper (Tables 1-5) is a config change: STL, MTL (hard sharing), PAD-Net, PAP-Net, MTI-Net and the Concat
ablation.

Each decoder follows the interface of `decoders.py`: `__init__(config, feature_info)` and
`forward(features) -> (predictions, initial_predictions)` at the decoder's own resolution. STL is the exception: it
owns one backbone per task (`owns_backbones` in `DECODERS`), is built from the config alone and reads `pixel_values`.

Heads (docs/design.md, "Heads"; they make the paper's parameter counts add up): STL / MTL end in the head family's
task head (MTI-Net's high-resolution head for the bottleneck family, a DeepLab head for the deeplab family); the
distillation baselines share CTAL-SS's front (`CTALNeck`: cross-scale fusion of several maps, then per-task initial
heads of 256 channels) and end in the same final heads as CTAL, on 256 channels for PAD-Net and 128 for PAP-Net and
Concat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .affinity_resampling import affinity_size_of
from .backbones import CTALBackbone
from .blocks import CTALHighResolutionHead, upsample_to
from .ctal_module import CTALTaskProjection
from .heads import HEAD_FAMILIES, CTALMultiScaleInitialHeads, CTALNeck, build_final_head, build_task_head
from .registry import PAPNET_AFFINITY_NORMALIZATIONS, PAPNET_FEATURE_NORMALIZATIONS, check_choice

if TYPE_CHECKING:
    from .backbones import CTALFeatureInfo
    from .configuration_ctal import CTALConfig


class CTALSingleTaskDecoder(nn.Module):
    """STL: one independent network (backbone + head) per task inside one model, so that its parameters and FLOPs
    count like the paper's STL row and `from_pretrained` / `from_config_with_backbone_weights` work as for the
    multitask models (every `CTALBackbone` inside receives the pretrained weights). No parameter is shared."""

    def __init__(self, config: CTALConfig):
        super().__init__()
        self.tasks = list(config.tasks)
        self.backbones = nn.ModuleDict({task: CTALBackbone(config) for task in self.tasks})
        self.heads = nn.ModuleDict(
            {task: build_task_head(config, self.backbones[task].channels, task) for task in self.tasks}
        )

    @property
    def feature_info(self) -> CTALFeatureInfo:
        return self.backbones[self.tasks[0]].feature_info

    def forward(self, pixel_values: torch.Tensor) -> tuple[dict, dict]:
        predictions = {task: self.heads[task](self.backbones[task](pixel_values)) for task in self.tasks}
        return predictions, {}


class CTALHardSharingDecoder(nn.Module):
    """MTL (hard parameter sharing): the shared backbone's maps go to one head per task, the same heads as STL."""

    def __init__(self, config: CTALConfig, feature_info: CTALFeatureInfo):
        super().__init__()
        self.tasks = list(config.tasks)
        self.heads = nn.ModuleDict({task: build_task_head(config, feature_info.channels, task) for task in self.tasks})

    def forward(self, features: list[torch.Tensor]) -> tuple[dict, dict]:
        return {task: self.heads[task](features) for task in self.tasks}, {}


class CTALSpatialAttention(nn.Module):
    """PAD-Net's message from one task to another: `conv3x3(F) * sigmoid(conv3x3(F))` (no bias, no norm)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gate = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden) * torch.sigmoid(self.gate(hidden))


class CTALMultiTaskDistillation(nn.Module):
    """PAD-Net's multi-modal distillation (Xu et al., CVPR 2018), also MTI-Net's per-scale distillation:
    `out_t = F_t + sum_{a != t} SA_{a -> t}(F_a)`, one spatial-attention block per ordered task pair."""

    def __init__(self, tasks: list[str], channels: int):
        super().__init__()
        self.tasks = list(tasks)
        self.attention = nn.ModuleDict(
            {
                target: nn.ModuleDict(
                    {source: CTALSpatialAttention(channels) for source in self.tasks if source != target}
                )
                for target in self.tasks
            }
        )

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = {}
        for target in self.tasks:
            hidden = features[target]
            for source, block in self.attention[target].items():
                hidden = hidden + block(features[source])
            outputs[target] = hidden
        return outputs


class CTALPADNetDecoder(nn.Module):
    """PAD-Net: neck (initial heads) -> multi-modal distillation on the 256-channel task features -> final heads (on
    256 channels, at the finest map's stride)."""

    def __init__(self, config: CTALConfig, feature_info: CTALFeatureInfo):
        super().__init__()
        self.tasks = list(config.tasks)
        self.neck = CTALNeck(config, feature_info)
        self.distillation = CTALMultiTaskDistillation(self.tasks, config.head_channels)
        self.final_heads = nn.ModuleDict(
            {task: build_final_head(config, config.head_channels, task) for task in self.tasks}
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[dict, dict]:
        task_features, initial = self.neck(features)
        distilled = self.distillation(task_features)
        return {task: self.final_heads[task](distilled[task]) for task in self.tasks}, initial


class CTALPatternAffinityDiffusion(nn.Module):
    """PAP-Net's cross-task and task-specific propagation (Zhang et al., CVPR 2019) on `{task: (B, C, h, w)}`.

    Per task a similarity `S_t[i, j] = <x_t,i , x_t,j>` of normalised features, turned into an affinity `A_t`; per
    target task a learned softmax-weighted sum of the T affinities; then `diffusion_steps` steps of
    `X <- beta * X A^T + (1 - beta) X_0`, i.e. pixel i receives `sum_j A[i, j] x_j` (one step, beta = 0.05, in the
    authors' configs). Two choices (config fields `papnet_feature_normalization` and
    `papnet_affinity_normalization`):

    - `feature_normalization="channels"`: every pixel vector has unit length, so `S` holds cosine similarities;
      `"pixels"`: every channel has unit length over the pixels (the authors' release normalises its (B, N, C)
      features over N), so `S` is not a cosine similarity of pixel pairs.
    - `affinity_normalization="rows"`: negative similarities are clipped and every row sums to one, so each pixel
      receives a weighted average (the diagonal is 1, the row sum at least 1); `"columns"`: `A[i, j] = S[i, j] /
      sum_k S[k, j]` without clipping, what the release computes (its comment says rows)."""

    def __init__(
        self,
        tasks: list[str],
        beta: float = 0.05,
        diffusion_steps: int = 1,
        affinity_normalization: str = "rows",
        feature_normalization: str = "channels",
    ):
        super().__init__()
        check_choice("papnet_affinity_normalization", affinity_normalization, PAPNET_AFFINITY_NORMALIZATIONS)
        check_choice("papnet_feature_normalization", feature_normalization, PAPNET_FEATURE_NORMALIZATIONS)
        self.tasks = list(tasks)
        self.beta = beta
        self.diffusion_steps = diffusion_steps
        self.affinity_normalization = affinity_normalization
        self.feature_normalization = feature_normalization
        num_tasks = len(self.tasks)
        self.task_weights = nn.ParameterDict(
            {task: nn.Parameter(torch.full((num_tasks,), 1.0 / num_tasks)) for task in self.tasks}
        )

    def affinity(self, features: torch.Tensor) -> torch.Tensor:
        """The affinity (B, N, N) of features (B, C, h, w): `A[b, i, j]` is what pixel i takes from pixel j."""
        flat = features.flatten(2)  # (B, C, N)
        normalized = F.normalize(flat, dim=1 if self.feature_normalization == "channels" else 2)
        similarity = torch.bmm(normalized.transpose(1, 2), normalized)
        if self.affinity_normalization == "rows":
            similarity = similarity.clamp_min(0.0)
            return similarity / similarity.sum(dim=-1, keepdim=True).clamp_min(1e-6)
        return similarity / similarity.sum(dim=1, keepdim=True)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        affinities = [self.affinity(features[task]) for task in self.tasks]
        outputs = {}
        for target in self.tasks:
            weights = torch.softmax(self.task_weights[target], dim=0)
            combined = sum(weight * affinity for weight, affinity in zip(weights, affinities, strict=True))
            source = features[target].flatten(2)  # (B, C, N)
            diffused = source
            for _ in range(self.diffusion_steps):
                diffused = self.beta * torch.bmm(diffused, combined.transpose(1, 2)) + (1.0 - self.beta) * source
            outputs[target] = diffused.view_as(features[target])
        return outputs


class CTALPAPNetDecoder(nn.Module):
    """PAP-Net: neck (initial heads) -> per task a 1x1 projection 256 -> `ctal_channels` (128) -> affinity diffusion
    on CTAL's affinity map size -> final heads on the 128 diffused channels."""

    def __init__(self, config: CTALConfig, feature_info: CTALFeatureInfo):
        super().__init__()
        self.tasks = list(config.tasks)
        self.neck = CTALNeck(config, feature_info)
        self.size = feature_info.affinity_map_size(config.affinity_scale)
        self.strides = (feature_info.finest_stride, feature_info.affinity_stride(config.affinity_scale))
        # A plain 1x1 conv with bias, as in the authors' PAP-Net for both backbones.
        self.projections = nn.ModuleDict(
            {
                task: CTALTaskProjection(config.head_channels, config.ctal_channels, with_norm=False)
                for task in self.tasks
            }
        )
        self.diffusion = CTALPatternAffinityDiffusion(
            self.tasks,
            beta=0.05,
            diffusion_steps=config.papnet_diffusion_steps,
            affinity_normalization=config.papnet_affinity_normalization,
            feature_normalization=config.papnet_feature_normalization,
        )
        self.final_heads = nn.ModuleDict(
            {task: build_final_head(config, config.ctal_channels, task) for task in self.tasks}
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[dict, dict]:
        task_features, initial = self.neck(features)
        size = affinity_size_of(features[0], *self.strides)  # `self.size` at the model's image_size
        projected = {task: upsample_to(self.projections[task](task_features[task]), size) for task in self.tasks}
        diffused = self.diffusion(projected)
        return {task: self.final_heads[task](diffused[task]) for task in self.tasks}, initial


class CTALMTINetDecoder(nn.Module):
    """MTI-Net (Vandenhende et al., ECCV 2020) on a backbone's scales (HRNet's four): initial predictions at every
    scale, coarse to fine, with the feature propagation module between scales (deeply supervised at every scale);
    PAD-Net distillation at every scale; then per task the high-resolution head aggregates the distilled scales."""

    def __init__(self, config: CTALConfig, feature_info: CTALFeatureInfo):
        super().__init__()
        if not feature_info.is_multi_scale:
            raise ValueError(
                f"decoder 'mtinet' needs a multi-scale backbone (its feature propagation runs between scales); "
                f"{config.backbone_description} gives one map."
            )
        backbone_channels = list(feature_info.channels)
        self.tasks = list(config.tasks)
        out_channels = {task: config.task_channels(task) for task in self.tasks}
        self.initial_heads = CTALMultiScaleInitialHeads(
            self.tasks, backbone_channels, out_channels, config.fpm_grouping
        )
        self.distillations = nn.ModuleList(
            [CTALMultiTaskDistillation(self.tasks, width) for width in backbone_channels]
        )
        self.final_heads = nn.ModuleDict(
            {task: CTALHighResolutionHead(backbone_channels, out_channels[task]) for task in self.tasks}
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[dict, dict]:
        task_features, initial = self.initial_heads(features)
        distilled = [
            distillation({task: task_features[task][scale] for task in self.tasks})
            for scale, distillation in enumerate(self.distillations)
        ]
        predictions = {
            task: self.final_heads[task]([per_scale[task] for per_scale in distilled]) for task in self.tasks
        }
        return predictions, initial


class CTALConcatDecoder(nn.Module):
    """The Concat ablation (paper Table 4): CTAL-SS with the cross-task step replaced by concatenation. Per task, the T
    initial feature maps are concatenated, projected by a 1x1 conv to `ctal_channels` (CTAL's input projection,
    widened to T x 256 inputs) and decoded by the same final head as CTAL-SS, at the initial heads' resolution."""

    def __init__(self, config: CTALConfig, feature_info: CTALFeatureInfo):
        super().__init__()
        self.tasks = list(config.tasks)
        self.neck = CTALNeck(config, feature_info)
        in_channels = len(self.tasks) * config.head_channels
        with_norm = HEAD_FAMILIES[config.head_family].projection_norm
        self.projections = nn.ModuleDict(
            {task: CTALTaskProjection(in_channels, config.ctal_channels, with_norm=with_norm) for task in self.tasks}
        )
        self.final_heads = nn.ModuleDict(
            {task: build_final_head(config, config.ctal_channels, task) for task in self.tasks}
        )

    def forward(self, features: list[torch.Tensor]) -> tuple[dict, dict]:
        task_features, initial = self.neck(features)
        concat = torch.cat([task_features[task] for task in self.tasks], dim=1)
        return {task: self.final_heads[task](self.projections[task](concat)) for task in self.tasks}, initial


__all__ = [
    "CTALSingleTaskDecoder",
    "CTALHardSharingDecoder",
    "CTALSpatialAttention",
    "CTALMultiTaskDistillation",
    "CTALPADNetDecoder",
    "CTALPatternAffinityDiffusion",
    "CTALPAPNetDecoder",
    "CTALMTINetDecoder",
    "CTALConcatDecoder",
]
