"""Backbones: the registry of the paper's named backbones (timm and torchvision), any transformers `AutoBackbone` through
`config.backbone_config`, and `CTALBackbone`, which turns either into a list of NCHW maps, finest first, with their
channels and strides (read from the built model, never hard-coded). See docs/design.md, "Backbones"."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .configuration_ctal import CTALConfig


def _timm():
    # Imported lazily: timm pulls in torchvision, which a config-only import should not pay for.
    import timm

    return timm


def _check_state_dict(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], source: str, what: str):
    """Every key of `expected` present with its shape and nothing else, or a `ValueError` naming `source`."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    problems = [
        f"{label} {keys[:10]}"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("size mismatch for", mismatched))
        if keys
    ]
    if problems:
        raise ValueError(f"{source!r} does not match {what}: {', '.join(problems)}.")


@dataclass(frozen=True)
class CTALTimmBuilder:
    """Builds a registry entry with `timm.create_model(name, features_only=True, ...)`.

    Args:
        name: the `timm.create_model` name.
        kwargs: keyword arguments of the features model (which maps, which representation); `config.backbone_kwargs`
            is added on top.
        pass_image_size: whether timm must be told the input size (`img_size=config.image_size`): windowed
            transformers fix their attention masks to it.
        key_converter: renames the keys of another library's checkpoint of the same network to timm's (e.g.
            torchvision's MobileNetV2), applied to a weights file whose keys are not timm's.
    """

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    pass_image_size: bool = False
    key_converter: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    library = "timm"

    @property
    def description(self) -> str:
        return f"timm's {self.name}"

    def create_features(self, config: CTALConfig, **overrides) -> nn.Module:
        kwargs = dict(features_only=True, pretrained=False, **self.kwargs, **config.backbone_kwargs)
        if self.pass_image_size:
            kwargs["img_size"] = tuple(config.image_size)
        kwargs.update(overrides)
        return _timm().create_model(self.name, **kwargs)

    def create_reference(self, config: CTALConfig) -> nn.Module:
        kwargs = {"img_size": tuple(config.image_size)} if self.pass_image_size else {}
        return _timm().create_model(self.name, pretrained=False, **kwargs)

    def download_state_dict(self, config: CTALConfig) -> dict[str, torch.Tensor]:
        """The full model's ImageNet weights, from the Hub (timm's default checkpoint of `name`)."""
        return _timm().create_model(self.name, pretrained=True).state_dict()

    def check_state_dict(self, config: CTALConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
        with torch.device("meta"):  # names and shapes only
            expected = self.create_reference(config).state_dict()
        _check_state_dict(expected, state_dict, source, self.description)

    def convert_state_dict(self, config: CTALConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state_dict` with timm's key names: converted by `key_converter` when its keys are not timm's."""
        if self.key_converter is None:
            return state_dict
        with torch.device("meta"):
            expected = self.create_reference(config).state_dict()
        return state_dict if set(state_dict) == set(expected) else self.key_converter(state_dict)

    def features_state_dict(self, config: CTALConfig, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The features model's state dict from the full model's (timm renames and drops keys itself)."""
        return self.create_features(config, pretrained=True, pretrained_cfg_overlay={"state_dict": full}).state_dict()


class CTALTorchvisionFeatures(nn.Module):
    """torchvision's `features` of a Swin model (NHWC map of the last stage), as a list of one map: the state-dict
    keys (`features.*`) are those of the full torchvision model."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.features = features

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        return [self.features(pixel_values)]


@dataclass(frozen=True)
class CTALTorchvisionBuilder:
    """Builds a registry entry from a torchvision classification model, keeping its `features` (the authors' release
    builds its Swin backbones so: `features -> norm -> permute`).

    Args:
        name: the `torchvision.models` builder, e.g. `"swin_v2_s"`.
        weights: the ImageNet weights (`torchvision.models.get_weight` name) the training recipes download.
    """

    name: str
    weights: str
    library = "torchvision"

    @property
    def description(self) -> str:
        return f"torchvision's {self.name}"

    def create_reference(self, config: CTALConfig) -> nn.Module:
        import torchvision

        return getattr(torchvision.models, self.name)(weights=None)

    def create_features(self, config: CTALConfig, **overrides) -> nn.Module:
        if overrides or config.backbone_kwargs:
            raise ValueError(
                f"`backbone_kwargs` {config.backbone_kwargs or overrides} apply to timm backbones; {self.description} "
                "takes none."
            )
        return CTALTorchvisionFeatures(self.create_reference(config).features)

    def download_state_dict(self, config: CTALConfig) -> dict[str, torch.Tensor]:
        """The full model's ImageNet weights from torchvision's download path (cached under `$TORCH_HOME`)."""
        import torchvision

        return torchvision.models.get_weight(self.weights).get_state_dict(progress=False, check_hash=True)

    def check_state_dict(self, config: CTALConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
        with torch.device("meta"):
            expected = self.create_reference(config).state_dict()
        _check_state_dict(expected, state_dict, source, self.description)

    def convert_state_dict(self, config: CTALConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state_dict

    def features_state_dict(self, config: CTALConfig, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value for key, value in full.items() if key.startswith("features.")}


@dataclass(frozen=True)
class CTALBackboneSpec:
    """A named backbone (`config.backbone`): how it is built (`builder`) and what the decoders need to know before it
    is built.

    Args:
        builder: builds the features model, the full (classification) model whose state dict ImageNet weight files
            hold, and downloads those weights (`CTALTimmBuilder`, `CTALTorchvisionBuilder`).
        display_name: how tables and model cards name it.
        strides: output stride of each feature map the decoders read, finest first (checked against the built model).
        channels_last_output: whether the features model returns NHWC maps (permuted to NCHW here).
        head_family: the decoder head family these models use by default (`config.head_family`).
        normals_loss: the surface-normal loss of the paper's recipe for this backbone (`CTALConfig.from_preset`).
        final_norm: whether the full model ends with a LayerNorm `norm` over the last map's channels, which
            `config.backbone_final_norm` applies to the map (the SwinV2 models).
        hrnet_fuse_layers: whether the model has HRNet fuse layers, whose upsampling `config.hrnet_fuse_upsampling`
            chooses.
    """

    builder: CTALTimmBuilder | CTALTorchvisionBuilder
    display_name: str
    strides: tuple[int, ...]
    channels_last_output: bool = False
    head_family: str = "bottleneck"
    normals_loss: str = "cosine"
    final_norm: bool = False
    hrnet_fuse_layers: bool = False

    @property
    def num_maps(self) -> int:
        return len(self.strides)

    @property
    def timm_name(self) -> str | None:
        """The `timm.create_model` name (`None` for a backbone built by another library)."""
        return self.builder.name if self.builder.library == "timm" else None

    def create_model(self, config: CTALConfig, **overrides) -> nn.Module:
        """The features model (random weights unless `overrides` ask timm for pretrained ones), with the config's
        fuse-layer upsampling applied (`hrnet_fuse_upsampling`)."""
        model = self.builder.create_features(config, **overrides)
        if self.hrnet_fuse_layers:
            mode, align_corners = HRNET_FUSE_UPSAMPLING[config.hrnet_fuse_upsampling]
            for upsample in hrnet_fuse_upsamplers(model):
                upsample.mode, upsample.align_corners = mode, align_corners
        return model

    def create_reference_model(self, config: CTALConfig) -> nn.Module:
        """The full model (classifier included), whose state dict is what ImageNet weight files hold."""
        return self.builder.create_reference(config)

    def uses_final_norm(self, config: CTALConfig) -> bool:
        return self.final_norm and config.backbone_final_norm


# `hrnet_fuse_upsampling` -> (nn.Upsample mode, align_corners): the release's `F.interpolate(mode="bilinear")`
# leaves align_corners at its default, False.
HRNET_FUSE_UPSAMPLING: dict[str, tuple[str, bool | None]] = {"nearest": ("nearest", None), "bilinear": ("bilinear", False)}


def hrnet_fuse_upsamplers(model: nn.Module) -> list[nn.Upsample]:
    """The `nn.Upsample` modules of an HRNet's fuse layers (timm's `HighResolutionModule.fuse_layers`), which bring
    each coarser branch to the finer one's size where the branches are summed."""
    upsamplers = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "fuse_layers":
            upsamplers += [m for m in module.modules() if isinstance(m, nn.Upsample)]
    return upsamplers


def _swinv2(builder, display_name: str) -> CTALBackboneSpec:
    # The last stage only (768 or 1024 channels at 1/32), NHWC, with the full model's final LayerNorm. timm fixes
    # its attention windows to the input size (`pass_image_size`); torchvision pads them (any input size).
    return CTALBackboneSpec(
        builder=builder,
        display_name=display_name,
        strides=(32,),
        channels_last_output=True,
        head_family="deeplab",
        normals_loss="l1",
        final_norm=True,
    )


def _swinv2_timm(name: str, display_name: str) -> CTALBackboneSpec:
    return _swinv2(CTALTimmBuilder(name, kwargs={"out_indices": (3,)}, pass_image_size=True), display_name)


def _swinv2_torchvision(name: str, weights: str, display_name: str) -> CTALBackboneSpec:
    return _swinv2(CTALTorchvisionBuilder(name, weights), display_name)


# torchvision's MobileNetV2 (`features.<i>`) -> timm's `mobilenetv2_100`: the stem, 17 inverted-residual blocks in
# stages of (1, 2, 3, 4, 3, 3, 1), the 1x1 head conv and the classifier. Within a block torchvision numbers its layers
# (`conv.0.0` ...); timm names them (the first block has no expansion conv).
_MOBILENET_V2_STAGE_DEPTHS = (1, 2, 3, 4, 3, 3, 1)
_MOBILENET_V2_LAYERS = {
    "first": {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"},
    "other": {
        "conv.0.0": "conv_pw", "conv.0.1": "bn1", "conv.1.0": "conv_dw", "conv.1.1": "bn2", "conv.2": "conv_pwl",
        "conv.3": "bn3",
    },
}  # fmt: skip


def torchvision_mobilenet_v2_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision's `mobilenet_v2` state dict with the key names of timm's `mobilenetv2_100` (the same network)."""
    blocks = [(stage, index) for stage, depth in enumerate(_MOBILENET_V2_STAGE_DEPTHS) for index in range(depth)]
    fixed = {"features.0.0": "conv_stem", "features.0.1": "bn1", "features.18.0": "conv_head", "features.18.1": "bn2"}
    fixed["classifier.1"] = "classifier"
    converted = {}
    for key, value in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in fixed:
            converted[f"{fixed[prefix]}.{leaf}"] = value
            continue
        match = re.fullmatch(r"features\.(\d+)\.(conv(?:\.\d+)+)", prefix)
        number = int(match.group(1)) if match else 0
        layers = _MOBILENET_V2_LAYERS["first" if number == 1 else "other"]
        if not match or not 1 <= number <= len(blocks) or match.group(2) not in layers:
            raise ValueError(f"{key!r} is not a key of torchvision's mobilenet_v2 (or of timm's mobilenetv2_100).")
        stage, index = blocks[number - 1]
        converted[f"blocks.{stage}.{index}.{layers[match.group(2)]}.{leaf}"] = value
    return converted


BACKBONES: dict[str, CTALBackboneSpec] = {
    # Raw branch outputs 18/36/72/144 at strides 4..32 (`feature_location=""`), not timm's default "incre"
    # 128..1024 channels.
    "hrnet_w18_small_v2": CTALBackboneSpec(
        builder=CTALTimmBuilder("hrnet_w18_small_v2", kwargs={"feature_location": "", "out_indices": (1, 2, 3, 4)}),
        display_name="HRNet-W18-small-v2",
        strides=(4, 8, 16, 32),
        hrnet_fuse_layers=True,
    ),
    # MobileNetV2 (not in the paper: a small ImageNet backbone for CPU runs); its stages at strides 4..32 (24, 32,
    # 96, 320 channels). Takes timm's weights or torchvision's IMAGENET1K_V1 file (docs/efficacy.md).
    "mobilenet_v2": CTALBackboneSpec(
        builder=CTALTimmBuilder(
            "mobilenetv2_100", kwargs={"out_indices": (1, 2, 3, 4)}, key_converter=torchvision_mobilenet_v2_to_timm
        ),
        display_name="MobileNetV2",
        strides=(4, 8, 16, 32),
    ),
    "swinv2_small": _swinv2_timm("swinv2_small_window8_256", "SwinV2-S"),
    "swinv2_tiny": _swinv2_timm("swinv2_tiny_window8_256", "SwinV2-T"),
    "swinv2_base": _swinv2_timm("swinv2_base_window8_256", "SwinV2-B"),
    # The authors' release: torchvision's models with their IMAGENET1K_V1 weights.
    "swin_v2_s": _swinv2_torchvision("swin_v2_s", "Swin_V2_S_Weights.IMAGENET1K_V1", "SwinV2-S (torchvision)"),
    "swin_v2_t": _swinv2_torchvision("swin_v2_t", "Swin_V2_T_Weights.IMAGENET1K_V1", "SwinV2-T (torchvision)"),
    "swin_v2_b": _swinv2_torchvision("swin_v2_b", "Swin_V2_B_Weights.IMAGENET1K_V1", "SwinV2-B (torchvision)"),
}


def _is_timm_backbone_config(backbone_config) -> bool:
    return getattr(backbone_config, "model_type", None) == "timm_backbone"


def _timm_features_kwargs(backbone_config) -> dict[str, Any]:
    """The `timm.create_model` arguments transformers' `TimmBackbone` uses for a `TimmBackboneConfig`."""
    return dict(
        features_only=backbone_config.features_only,
        in_chans=backbone_config.num_channels,
        out_indices=tuple(backbone_config.out_indices),
        output_stride=backbone_config.output_stride,
    )


@dataclass(frozen=True)
class CTALFeatureInfo:
    """What the decoders read from a built backbone: channels and output strides of its maps (finest first),
    the input size and the head family."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    image_size: tuple[int, int]
    head_family: str

    @property
    def num_maps(self) -> int:
        return len(self.channels)

    @property
    def is_multi_scale(self) -> bool:
        """Whether there are several maps (fused by the cross-scale fusion) rather than one map used as is."""
        return len(self.channels) > 1

    @property
    def finest_stride(self) -> int:
        return self.strides[0]

    def affinity_stride(self, affinity_scale: int) -> int:
        """Stride of the maps CTAL and PAP-Net diffuse on: max(`affinity_scale`, the finest map's stride), i.e. the
        finest map itself unless `affinity_scale` asks for a coarser one (paper Table 5)."""
        return max(affinity_scale, self.finest_stride)

    def affinity_map_size(self, affinity_scale: int) -> tuple[int, int]:
        """Size (h, w) of the maps CTAL and PAP-Net diffuse on."""
        stride = self.affinity_stride(affinity_scale)
        return self.image_size[0] // stride, self.image_size[1] // stride


class CTALBackbone(nn.Module):
    """A backbone as a list of NCHW feature maps, finest first: a named timm model (`config.backbone`) or any
    transformers `AutoBackbone` (`config.backbone_config`, built with `load_backbone`, random weights).

    `channels` and `strides` are measured on a meta-device forward pass at `config.image_size` when the module is
    built, so a map that does not divide the input, or a backbone with no maps, is refused before any real work."""

    def __init__(self, config: CTALConfig):
        super().__init__()
        self.uses_backbone_config = config.backbone_config is not None
        if self.uses_backbone_config:
            from transformers.backbone_utils import load_backbone

            self.model = load_backbone(config)
            timm_model = getattr(self.model, "_backbone", None)
            fmt = (
                getattr(timm_model, "output_fmt", "NCHW")
                if _is_timm_backbone_config(config.backbone_config)
                else "NCHW"
            )
            self.channels_last_output = fmt == "NHWC"
            self.name = config.backbone_description
        else:
            spec = BACKBONES[config.backbone]
            self.model = spec.create_model(config)
            self.channels_last_output = spec.channels_last_output
            self.name = spec.display_name
        if config.backbone_bn_momentum is not None:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = config.backbone_bn_momentum
        self.upsample_factor = 1
        channels, strides = self._measure(config)
        # The full model's final LayerNorm on the last map (`backbone_final_norm`; SwinV2), weights `norm.*` of the
        # full model; eps 1e-5 in timm and torchvision.
        use_norm = not self.uses_backbone_config and BACKBONES[config.backbone].uses_final_norm(config)
        self.final_norm = nn.LayerNorm(channels[-1], eps=1e-5) if use_norm else None
        if not self.uses_backbone_config and strides != BACKBONES[config.backbone].strides:
            raise RuntimeError(
                f"BACKBONES[{config.backbone!r}].strides is {BACKBONES[config.backbone].strides}, but the built model "
                f"gives {strides}: fix the registry entry."
            )
        # A single map read at a finer stride (`decoder_stride`, e.g. SwinV2's 1/32 map at 1/16): upsampled here.
        if config.decoder_stride is not None and config.decoder_stride != strides[-1]:
            if len(strides) > 1:
                raise ValueError(
                    f"`decoder_stride` applies to single-map backbones (SwinV2, ViTs); {self.name} gives "
                    f"{len(strides)} maps (strides {list(strides)}) that the decoders fuse at stride {strides[0]}. "
                    "Leave `decoder_stride` unset."
                )
            if strides[0] % config.decoder_stride or strides[0] // config.decoder_stride != 2:
                raise ValueError(
                    f"`decoder_stride` must be the map's stride {strides[0]} or half of it ({strides[0] // 2}, a x2 "
                    f"bilinear upsampling), got {config.decoder_stride}."
                )
            self.upsample_factor = strides[0] // config.decoder_stride
            strides = (config.decoder_stride,)
        self.channels: list[int] = list(channels)
        self.strides: list[int] = list(strides)
        self.feature_info = CTALFeatureInfo(
            channels=tuple(channels),
            strides=tuple(strides),
            image_size=tuple(config.image_size),
            head_family=config.head_family,
        )
        # Set by `model.gradient_checkpointing_enable()`: recompute the backbone in the backward pass (timm's
        # HRNet has no per-stage checkpointing of its own).
        self.gradient_checkpointing = False

    @property
    def reductions(self) -> list[int]:
        """timm's name for `strides`."""
        return self.strides

    def _raw_maps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        features = self.model(pixel_values)
        if not isinstance(features, (list, tuple)):  # a transformers `BackboneOutput`
            features = features.feature_maps
        return list(features)

    def _map_shapes(self, height: int, width: int) -> list[tuple[int, ...]]:
        """Shapes of the maps for a (1, 3, height, width) input, from a forward pass on the meta device (shapes
        only, no compute), in eval mode (batch statistics of one 1x1 map are undefined in training mode)."""
        meta = {name: torch.empty_like(tensor, device="meta") for name, tensor in self.model.named_parameters()}
        meta.update({name: torch.empty_like(tensor, device="meta") for name, tensor in self.model.named_buffers()})
        training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                features = torch.func.functional_call(
                    self.model, meta, (torch.empty(1, 3, height, width, device="meta"),)
                )
        finally:
            self.model.train(training)
        if not isinstance(features, (list, tuple)):
            features = features.feature_maps
        return [tuple(feature.shape) for feature in features or ()]

    def _measure(self, config: CTALConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Channels and strides of the maps, with the checks that the maps exist and divide the input."""
        height, width = config.image_size
        try:
            shapes = self._map_shapes(height, width)
        except Exception as error:  # any failure of a foreign model on this input: say which model and input
            raise ValueError(
                f"The backbone {self.name} cannot run on image_size {list(config.image_size)}: "
                f"{type(error).__name__}: {error}"
            ) from error
        if not shapes:
            raise ValueError(
                f"The backbone {self.name} returns no feature maps; list the stages the decoder should read "
                "(`out_features` / `out_indices` of `backbone_config`)."
            )
        # A map of an input that is not a multiple of its stride can still divide it (DINOv2 with patch 8 makes a 4x4
        # map of 36x36): the strides must also hold at twice the size. Models that only run at their own input size
        # (timm's windowed transformers) skip this second look.
        try:
            doubled = self._map_shapes(2 * height, 2 * width) if self.uses_backbone_config else None
        except Exception:  # a model tied to one input size: the first look stands
            doubled = None
        channels, strides = [], []
        for index, shape in enumerate(shapes):
            if len(shape) != 4:
                raise ValueError(
                    f"The backbone {self.name} returns a map of shape {shape} (feature {index}); CTAL decoders need "
                    "4-D (batch, channels, height, width) maps (a ViT backbone must reshape its tokens: "
                    "`reshape_hidden_states=True`)."
                )
            map_height, map_width, map_channels = (
                (shape[1], shape[2], shape[3]) if self.channels_last_output else (shape[2], shape[3], shape[1])
            )
            stride = height // map_height
            fits = not (height % map_height or width % map_width or width // map_width != stride)
            if fits and doubled is not None:
                fits = tuple(doubled[index][-2:] if not self.channels_last_output else doubled[index][1:3]) == (
                    2 * map_height,
                    2 * map_width,
                )
            if not fits:
                raise ValueError(
                    f"image_size {list(config.image_size)} does not fit the backbone {self.name}: its map {index} is "
                    f"{map_height}x{map_width}, not the input divided by the map's stride. Use an image_size "
                    "divisible by the backbone's largest stride (e.g. a multiple of 32 for most CNNs, of the patch "
                    "size for ViTs)."
                )
            channels.append(map_channels)
            strides.append(stride)
        if strides != sorted(strides):
            raise ValueError(
                f"The backbone {self.name} returns maps with strides {strides}; list them finest first "
                "(`out_features` in stage order)."
            )
        return tuple(channels), tuple(strides)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            features = torch.utils.checkpoint.checkpoint(self._raw_maps, pixel_values, use_reentrant=False)
        else:
            features = self._raw_maps(pixel_values)
        if self.final_norm is not None:
            last = features[-1]
            features[-1] = (
                self.final_norm(last)
                if self.channels_last_output
                else self.final_norm(last.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            )
        if self.channels_last_output:
            # NHWC is already the channels-last layout of the NCHW view: copy only for NCHW input.
            channels_last = (
                pixel_values.is_contiguous(memory_format=torch.channels_last) and not pixel_values.is_contiguous()
            )
            layout = torch.channels_last if channels_last else torch.contiguous_format
            features = [feature.permute(0, 3, 1, 2).contiguous(memory_format=layout) for feature in features]
        if self.upsample_factor > 1:
            features[-1] = F.interpolate(
                features[-1], scale_factor=self.upsample_factor, mode="bilinear", align_corners=False
            )
        return features

    def load_pretrained(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copies a state dict of this module (`model.*`, and `final_norm.*` with a final norm; from
        `pretrained_backbone_state_dict`); every tensor must be used."""
        self.load_state_dict(state_dict, strict=True)


# ------------------------------------------------------------------------------------------ pretrained weights
def _read_state_dict_file(source: str) -> dict[str, torch.Tensor]:
    """A `.safetensors` file or a torch state dict file (read with `weights_only=True`, so a file holding code is
    refused); a checkpoint that nests its weights under "state_dict" or "model" is unwrapped."""
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
    return state_dict


def read_backbone_state_dict(config: CTALConfig, source: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """A named backbone's full ImageNet state dict (timm's or torchvision's classification model), checked against
    the architecture.

    `source` is `None` (the building library's own pretrained weights: timm's from the Hub, torchvision's from its
    download path), a `.safetensors` file, or a torch state dict file. A missing, unexpected or mis-shaped key raises,
    naming the file."""
    spec = BACKBONES[config.backbone]
    if source is None:
        return spec.builder.download_state_dict(config)
    source = os.fspath(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"Backbone weights file {source!r} does not exist.")
    state_dict = spec.builder.convert_state_dict(config, _read_state_dict_file(source))
    spec.builder.check_state_dict(config, state_dict, source)
    return state_dict


def _weights_file_in(folder: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"Backbone weights folder {folder!r} holds no model.safetensors or pytorch_model.bin.")


def _timm_backbone_state_dict(backbone_config, source: str | None) -> dict[str, torch.Tensor]:
    """Pretrained weights of a `TimmBackboneConfig` backbone, as a state dict of transformers' `TimmBackbone`."""
    overlay = {}
    if source is not None:
        if os.path.isdir(source):
            source = _weights_file_in(source)
        if os.path.isfile(source):
            state_dict = _read_state_dict_file(source)
            # timm loads a features-only model leniently (it drops the classifier): check against the full model.
            reference = _timm().create_model(
                backbone_config.backbone, pretrained=False, in_chans=backbone_config.num_channels
            )
            try:
                reference.load_state_dict(state_dict, strict=True)
            except RuntimeError as error:
                raise ValueError(f"{source!r} does not match timm's {backbone_config.backbone}: {error}") from None
            overlay = {"state_dict": state_dict}
        elif source.count("/") == 1 and not source.startswith((".", "/")):
            overlay = {"hf_hub_id": source}  # a timm checkpoint on the Hub, e.g. "timm/resnet18.a1_in1k"
        else:
            raise FileNotFoundError(
                f"Backbone weights {source!r}: no such file or folder (and not a Hub id org/name)."
            )
    model = _timm().create_model(
        backbone_config.backbone,
        pretrained=True,
        pretrained_cfg_overlay=overlay or None,
        **_timm_features_kwargs(backbone_config),
    )
    return {f"_backbone.{key}": value for key, value in model.state_dict().items()}


def _auto_backbone_state_dict(backbone_config, source: str | None) -> dict[str, torch.Tensor]:
    """Pretrained weights of a transformers backbone: a Hub id or folder (`AutoBackbone.from_pretrained`) or a state
    dict file of the backbone; every tensor of the backbone must be in it."""
    from transformers import AutoBackbone

    if source is None:
        source = backbone_config.name_or_path or None
        if source is None:
            raise ValueError(
                f"`backbone_config` ({backbone_config.model_type}) names no checkpoint: pass `backbone_weights` (a Hub "
                "id, a folder saved with `save_pretrained`, or a state dict file)."
            )
    reference = AutoBackbone.from_config(backbone_config)
    expected = reference.state_dict()
    if os.path.isfile(source):
        state_dict = _read_state_dict_file(source)
    else:
        # The concrete class: `AutoBackbone.from_pretrained` takes anything that is not a Hub repo for a timm name.
        try:
            pretrained, info = type(reference).from_pretrained(
                source, config=backbone_config, output_loading_info=True
            )
        except OSError as error:
            raise FileNotFoundError(f"Backbone weights {source!r}: {error}") from None
        if info["missing_keys"] or info["mismatched_keys"]:
            raise ValueError(
                f"{source!r} lacks tensors of the {backbone_config.model_type} backbone: missing "
                f"{sorted(info['missing_keys'])[:10]}, mis-shaped {list(info['mismatched_keys'])[:10]}."
            )
        state_dict = pretrained.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    mismatched = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or mismatched:
        raise ValueError(
            f"{source!r} does not match the {backbone_config.model_type} backbone: missing keys {missing[:10]}, "
            f"size mismatch for {mismatched[:10]}."
        )
    return {key: state_dict[key] for key in expected}


def pretrained_backbone_state_dict(config: CTALConfig, source: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """The state dict of a `CTALBackbone` (`model.*`, and `final_norm.*` with a final norm) holding pretrained weights,
    read once for every backbone of a model.

    Named backbones: `source` is `None` (the building library's weights: timm's from the Hub, torchvision's download)
    or a file of the full timm / torchvision model. With
    `backbone_config`: a timm backbone takes the same, a folder, or a timm Hub id; a transformers backbone a Hub id,
    a folder saved with `save_pretrained`, or a state dict file (`None`: where `backbone_config` was loaded from)."""
    source = None if source is None else os.fspath(source)
    if config.backbone_config is None:
        full = read_backbone_state_dict(config, source)
        spec = BACKBONES[config.backbone]
        state_dict = {f"model.{key}": value for key, value in spec.builder.features_state_dict(config, full).items()}
        if spec.uses_final_norm(config):
            state_dict.update({f"final_norm.{name}": full[f"norm.{name}"] for name in ("weight", "bias")})
        return state_dict
    if _is_timm_backbone_config(config.backbone_config):
        state_dict = _timm_backbone_state_dict(config.backbone_config, source)
    else:
        state_dict = _auto_backbone_state_dict(config.backbone_config, source)
    return {f"model.{key}": value for key, value in state_dict.items()}


__all__ = [
    "BACKBONES",
    "CTALBackboneSpec",
    "CTALTimmBuilder",
    "CTALTorchvisionBuilder",
    "CTALFeatureInfo",
    "CTALBackbone",
    "read_backbone_state_dict",
    "torchvision_mobilenet_v2_to_timm",
    "pretrained_backbone_state_dict",
]
