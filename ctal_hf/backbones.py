"""Backbones: the registry of the paper's named backbones (timm and torchvision), any transformers `AutoBackbone` through
`config.backbone_config`, and `CTALBackbone`, which turns either into a list of NCHW maps, finest first, with their
channels and strides (read from the built model, never hard-coded). See docs/design.md, "Backbones"."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import BACKBONE_INFO, HRNET_FUSE_UPSAMPLING, CTALBackboneInfo, affinity_stride

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
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("size mismatch for", mismatched),
        )
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

    @classmethod
    def from_info(cls, info: CTALBackboneInfo) -> CTALTimmBuilder:
        converter = KEY_CONVERTERS[info.foreign_weights] if info.foreign_weights else None
        return cls(
            info.model_name, kwargs=dict(info.model_kwargs), pass_image_size=info.pass_image_size,
            key_converter=converter,
        )  # fmt: skip

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
        """The features model's state dict from the full model's (timm renames and drops keys itself). Where the
        features model names its tensors as the full model does, the full model's head (which it has no place for)
        is left out first, so that timm's loader has no unexpected keys to warn about."""
        needed = set(self.create_features(config, pretrained=False).state_dict())
        if needed <= set(full):
            full = {key: value for key, value in full.items() if key in needed}
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

    @classmethod
    def from_info(cls, info: CTALBackboneInfo) -> CTALTorchvisionBuilder:
        return cls(info.model_name, info.weights)

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


# The builder class of each library a `registry.CTALBackboneInfo` names.
BACKBONE_BUILDERS: dict[str, type[CTALTimmBuilder] | type[CTALTorchvisionBuilder]] = {
    "timm": CTALTimmBuilder,
    "torchvision": CTALTorchvisionBuilder,
}


@dataclass(frozen=True)
class CTALBackboneSpec(CTALBackboneInfo):
    """A named backbone (`config.backbone`): its registry entry (`registry.BACKBONE_INFO`) and how it is built
    (`builder`: the features model, the full classification model whose state dict ImageNet weight files hold, and
    the download of those weights)."""

    builder: CTALTimmBuilder | CTALTorchvisionBuilder = field(kw_only=True)

    @classmethod
    def from_info(cls, info: CTALBackboneInfo) -> CTALBackboneSpec:
        values = {item.name: getattr(info, item.name) for item in fields(info)}
        return cls(**values, builder=BACKBONE_BUILDERS[info.library].from_info(info))

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


def hrnet_fuse_upsamplers(model: nn.Module) -> list[nn.Upsample]:
    """The `nn.Upsample` modules of an HRNet's fuse layers (timm's `HighResolutionModule.fuse_layers`), which bring
    each coarser branch to the finer one's size where the branches are summed."""
    upsamplers = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "fuse_layers":
            upsamplers += [m for m in module.modules() if isinstance(m, nn.Upsample)]
    return upsamplers


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


# timm builders convert a weights file with another library's key names (`CTALBackboneInfo.foreign_weights`).
KEY_CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "torchvision_mobilenet_v2": torchvision_mobilenet_v2_to_timm,
}


# The model side of `registry.BACKBONE_INFO`: each entry with its builder.
BACKBONES: dict[str, CTALBackboneSpec] = {
    name: CTALBackboneSpec.from_info(info) for name, info in BACKBONE_INFO.items()
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
        """Stride of the maps CTAL and PAP-Net diffuse on (`registry.affinity_stride`)."""
        return affinity_stride(affinity_scale, self.finest_stride)

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
        # Another input size (`interpolate_affinity`, `from_pretrained(..., image_size=...)`) must be a multiple of
        # the largest stride, and is refused for models fixed to their input size at creation.
        self.max_stride = max(strides)
        self.fixed_size_reason = self._fixed_size_reason(config)
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

    def _fixed_size_reason(self, config: CTALConfig) -> str | None:
        """Why the backbone cannot run at another input size than `config.image_size` (None when it can)."""
        if self.uses_backbone_config:
            if self._runs_at_double_size:
                return None
            return f"the backbone {self.name} does not run at twice its image_size (a model tied to its input size)."
        if BACKBONES[config.backbone].pass_image_size:
            return (
                f"{self.name} is built by timm with its attention windows and masks fixed to image_size "
                f"{list(config.image_size)} (`img_size` at creation). Use sliding windows "
                '(`resolution="sliding"`), or a torchvision SwinV2 entry (swin_v2_s, ...), which pads its windows.'
            )
        return None

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
        self._runs_at_double_size = doubled is not None
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


__all__ = [
    "BACKBONES",
    "CTALBackboneSpec",
    "CTALTimmBuilder",
    "CTALTorchvisionBuilder",
    "CTALFeatureInfo",
    "CTALBackbone",
    "BACKBONE_BUILDERS",
    "KEY_CONVERTERS",
    "torchvision_mobilenet_v2_to_timm",
]
