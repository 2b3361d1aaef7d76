"""Feature extractors: timm's HRNet-W18-small-v2 (four raw branches) and SwinV2-S (its last 1/32 map, optionally
upsampled to 1/16: `config.decoder_stride`), NCHW."""

import os

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_ctal import CTALConfig


def _timm():
    # Imported lazily: timm pulls in torchvision, which a config-only import should not pay for.
    import timm

    return timm


def create_timm_backbone(config: CTALConfig, **overrides) -> nn.Module:
    """The timm feature model described by `config` (random weights unless `overrides` ask for pretrained)."""
    kwargs = dict(features_only=True, pretrained=False, **config.backbone_kwargs)
    if config.is_cnn:
        # Raw branch outputs 18/36/72/144 at strides 4..32, not timm's default "incre" 128..1024 channels.
        kwargs.update(feature_location="", out_indices=(1, 2, 3, 4))
    else:
        kwargs.update(img_size=tuple(config.image_size), out_indices=(3,))
    kwargs.update(overrides)
    return _timm().create_model(config.timm_model_name, **kwargs)


def read_backbone_state_dict(config: CTALConfig, source: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """A full timm model's ImageNet state dict, checked against the architecture.

    `source` is `None` (timm's own pretrained weights, from the Hub), a `.safetensors` file, or a torch state dict
    file (read with `weights_only=True`, so a file holding code is refused). A missing, unexpected or mis-shaped
    key raises, naming the file."""
    timm = _timm()
    if source is None:
        return timm.create_model(config.timm_model_name, pretrained=True).state_dict()
    source = os.fspath(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"Backbone weights file {source!r} does not exist.")
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(source)
    else:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{source!r} does not hold a state dict (found {type(state_dict).__name__}).")
    kwargs = {"img_size": tuple(config.image_size)} if not config.is_cnn else {}
    reference = timm.create_model(config.timm_model_name, pretrained=False, **kwargs)
    try:
        reference.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{source!r} does not match timm's {config.timm_model_name}: {error}") from None
    return state_dict


class CTALBackbone(nn.Module):
    """Wraps a timm feature model; `channels` and `reductions` describe its output maps, finest first."""

    def __init__(self, config: CTALConfig):
        super().__init__()
        self.is_cnn = config.is_cnn
        self.model = create_timm_backbone(config)
        self.channels: list[int] = list(self.model.feature_info.channels())
        self.reductions: list[int] = list(self.model.feature_info.reduction())
        # SwinV2 with `decoder_stride=16`: the decoder reads the last map upsampled by this factor.
        self.upsample_factor = 1 if self.is_cnn else self.reductions[-1] // config.decoder_stride
        self.reductions[-1] //= self.upsample_factor
        # Set by `model.gradient_checkpointing_enable()`: recompute the backbone in the backward pass (timm's
        # HRNet has no per-stage checkpointing of its own).
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            features = torch.utils.checkpoint.checkpoint(self.model, pixel_values, use_reentrant=False)
        else:
            features = self.model(pixel_values)
        if not self.is_cnn:
            # timm Swin is NHWC, which is already the channels-last layout of the NCHW view: copy only for NCHW input
            channels_last = (
                pixel_values.is_contiguous(memory_format=torch.channels_last) and not pixel_values.is_contiguous()
            )
            layout = torch.channels_last if channels_last else torch.contiguous_format
            features = [feature.permute(0, 3, 1, 2).contiguous(memory_format=layout) for feature in features]
        if self.upsample_factor > 1:
            features[-1] = F.interpolate(
                features[-1], scale_factor=self.upsample_factor, mode="bilinear", align_corners=False
            )
        return list(features)

    def load_pretrained(self, config: CTALConfig, state_dict: dict[str, torch.Tensor]) -> None:
        """Copies ImageNet weights (a full timm state dict) into this backbone; every tensor must be used."""
        pretrained = create_timm_backbone(config, pretrained=True, pretrained_cfg_overlay={"state_dict": state_dict})
        self.model.load_state_dict(pretrained.state_dict(), strict=True)


__all__ = ["CTALBackbone", "create_timm_backbone", "read_backbone_state_dict"]
