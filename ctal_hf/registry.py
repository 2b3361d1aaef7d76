"""Names and metadata of everything a `CTALConfig` field can name, as data: decoders and their flags, the named
backbones (library, strides, head family, ...), the head families, and every field's allowed values. No torch and
no model code: the configuration reads this module to check a config, the model side keeps its own name -> class
tables (`decoders.DECODERS`, `backbones.BACKBONES`, `heads.HEAD_FAMILIES`) built from or checked against it (the
test `tests/test_structure.py` asserts the two halves agree), and callers read flags, never compare names
(docs/design.md, "Package layout").

transformers splits its Auto registries the same way (`CONFIG_MAPPING_NAMES` next to the classes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------- allowed values
# The allowed values of config fields; where a field has a plain default and a value the authors' release uses, the
# plain default comes first (docs/design.md, "Parity with the authors' release").
ATTENTION_IMPLEMENTATIONS: tuple[str, ...] = ("auto", "dense", "factorized")
NORMALS_LOSSES: tuple[str, ...] = ("cosine", "l1")
REGRESSION_LOSSES: tuple[str, ...] = ("l1", "mse", "smooth_l1")
BINARY_LOSSES: tuple[str, ...] = ("bce", "balanced_bce")
FPM_GROUPINGS: tuple[str, ...] = ("tasks", "consecutive")
PAPNET_AFFINITY_NORMALIZATIONS: tuple[str, ...] = ("rows", "columns")
PAPNET_FEATURE_NORMALIZATIONS: tuple[str, ...] = ("channels", "pixels")
DECODER_INITS: tuple[str, ...] = ("he", "pytorch")
# `hrnet_fuse_upsampling` -> (nn.Upsample mode, align_corners): the release's `F.interpolate(mode="bilinear")`
# leaves align_corners at its default, False.
HRNET_FUSE_UPSAMPLING: dict[str, tuple[str, bool | None]] = {
    "nearest": ("nearest", None),
    "bilinear": ("bilinear", False),
}
HRNET_FUSE_UPSAMPLINGS: tuple[str, ...] = tuple(HRNET_FUSE_UPSAMPLING)
# CTAL's (and PAP-Net's) resolution as a fraction of the input (paper Table 5).
AFFINITY_SCALES: tuple[int, ...] = (4, 6, 8)

# The input normalisation of ImageNet-pretrained backbones (the image processor's and the data transforms' default).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The paper's six tasks (`ctal_hf.tasks` builds them; any other task is defined by a spec).
BUILTIN_TASK_NAMES: tuple[str, ...] = ("semseg", "parts", "depth", "normals", "saliency", "edge")

# Training: loss weighting methods (`ctal_hf.training.loss_weighting`) by command-line name.
LOSS_WEIGHTINGS: tuple[str, ...] = ("fixed", "uncertainty", "dwa", "famo")
# TorchJD gradient aggregators by command-line name -> (TorchJD class, keyword arguments, the `torchjd[...]` extra
# its solver needs or None); `"none"` sums the task losses instead.
GRADIENT_AGGREGATOR_SPECS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "upgrad": ("UPGrad", {}, None),
    "mgda": ("MGDA", {}, None),
    "cagrad": ("CAGrad", {"c": 0.5}, "cagrad"),
    "nashmtl": ("NashMTL", {}, "nash-mtl"),
    "pcgrad": ("PCGrad", {}, None),
    "imtl_g": ("IMTLG", {}, None),
    "aligned_mtl": ("AlignedMTL", {}, None),
}
GRADIENT_AGGREGATORS: tuple[str, ...] = ("none", *GRADIENT_AGGREGATOR_SPECS)


def check_choice(field_name: str, value: Any, allowed: Sequence[Any], what: str | None = None) -> None:
    """The one check of a name against its allowed values: a `ValueError` naming the field and the choices."""
    if value not in allowed:
        label = what or f"`{field_name}`"
        raise ValueError(f"Unknown {label} {value!r}; choose from {list(allowed)}.")


# ------------------------------------------------------------------------------------------------------ decoders
RELEASE_LOSS_WEIGHTS: tuple[str, ...] = ("preset", "uniform", "baseline", "baseline_doubled")


@dataclass(frozen=True)
class CTALDecoderInfo:
    """What a decoder needs and gives, before it is built (`config.decoder`).

    Args:
        display_name: how the paper (tables, model cards, logs) names it.
        needs_multi_scale: whether it reads several backbone maps at different scales (a single-map backbone is
            refused with a `ValueError`).
        owns_backbones: whether it builds its own backbones (STL: one per task) and reads `pixel_values`.
        multi_scale_initial: whether its initial predictions are a list (one per backbone map, finest first); the
            paper's Cityscapes recipe trains these decoders with warm restarts (`CTALRecipe.scheduler_for`).
        release_loss_weights: how the authors' release weighs this decoder's task losses (`RELEASE_LOSS_WEIGHTS`,
            read by the recipes' `"release"` loss-weight rule): `"preset"` (the preset's weights), `"uniform"` (all
            1: STL), `"baseline"` (the recipe's baseline weights: PAD-Net, PAP-Net) or `"baseline_doubled"` (twice
            those: hard sharing, whose release adds the same loss as its initial and its final term).
    """

    display_name: str
    needs_multi_scale: bool = False
    owns_backbones: bool = False
    multi_scale_initial: bool = False
    release_loss_weights: str = "preset"


DECODER_INFO: dict[str, CTALDecoderInfo] = {
    "ctal_ss": CTALDecoderInfo("CTAL-SS"),
    "ctal_ms": CTALDecoderInfo("CTAL-MS", needs_multi_scale=True, multi_scale_initial=True),
    "stl": CTALDecoderInfo("STL", owns_backbones=True, release_loss_weights="uniform"),
    "mtl": CTALDecoderInfo("MTL", release_loss_weights="baseline_doubled"),
    "padnet": CTALDecoderInfo("PAD-Net", release_loss_weights="baseline"),
    "papnet": CTALDecoderInfo("PAP-Net", release_loss_weights="baseline"),
    "mtinet": CTALDecoderInfo("MTI-Net", needs_multi_scale=True, multi_scale_initial=True),
    "concat": CTALDecoderInfo("Concat"),
}

# How the paper names each decoder (tables, model cards, logs).
DECODER_NAMES: dict[str, str] = {name: info.display_name for name, info in DECODER_INFO.items()}


# What an unknown decoder name reads (callers that accept any name, e.g. a recipe asked about a decoder it does not
# know): no flag set.
_UNKNOWN_DECODER = CTALDecoderInfo("")


def decoder_info(decoder: str) -> CTALDecoderInfo:
    """The registry entry of `decoder`; a decoder this registry does not know has every flag unset."""
    return DECODER_INFO.get(decoder, _UNKNOWN_DECODER)


def decoder_display_name(decoder: str) -> str:
    """The paper's name of `decoder`, or the name itself for a decoder this registry does not know."""
    return DECODER_NAMES.get(decoder, decoder)


# ------------------------------------------------------------------------------------------------- head families
@dataclass(frozen=True)
class CTALHeadFamilyInfo:
    """How the decoders of a head family end (`config.head_family`); the head builders are in `heads.HEAD_FAMILIES`.

    Args:
        description: the heads in words.
        projection_norm: whether the CTAL / PAP-Net projections have BatchNorm + ReLU after the 1x1 conv.
    """

    description: str
    projection_norm: bool


HEAD_FAMILY_INFO: dict[str, CTALHeadFamilyInfo] = {
    "bottleneck": CTALHeadFamilyInfo(
        "final heads of two bottlenecks + 1x1, MTI-Net's high-resolution STL / MTL heads (the paper's HRNet models)",
        projection_norm=False,
    ),
    "deeplab": CTALHeadFamilyInfo("DeepLab-v3 heads (the paper's SwinV2 models)", projection_norm=True),
}


def default_head_family(num_maps: int) -> str:
    """The head family of a `backbone_config` backbone: bottleneck heads for several maps, DeepLab for one."""
    return "bottleneck" if num_maps > 1 else "deeplab"


# ---------------------------------------------------------------------------------------------------- backbones
@dataclass(frozen=True)
class CTALBackboneInfo:
    """A named backbone (`config.backbone`) as data: which library builds it and what the decoders need to know
    before it is built. `backbones.BACKBONES` adds the builder.

    Args:
        library: `"timm"` (`timm.create_model(model_name, features_only=True, **model_kwargs)`) or `"torchvision"`
            (the `features` of `torchvision.models.<model_name>`).
        model_name: the library's model name.
        display_name: how tables and model cards name it.
        strides: output stride of each feature map the decoders read, finest first (checked against the built model).
        model_kwargs: timm: keyword arguments of the features model (which maps, which representation).
        pass_image_size: timm: whether the model must be told the input size (windowed transformers fix their
            attention masks to it).
        weights: torchvision: the ImageNet weights (`torchvision.models.get_weight` name).
        channels_last_output: whether the features model returns NHWC maps (permuted to NCHW).
        head_family: the decoder head family these models use by default (`config.head_family`).
        normals_loss: the surface-normal loss of the paper's recipe for this backbone (`CTALConfig.from_preset`).
        final_norm: whether the full model ends with a LayerNorm `norm` over the last map's channels, which
            `config.backbone_final_norm` applies to the map (the SwinV2 models).
        hrnet_fuse_layers: whether the model has HRNet fuse layers, whose upsampling `config.hrnet_fuse_upsampling`
            chooses.
        foreign_weights: timm: another library's checkpoint of the same network that a weights file may hold, whose
            keys are renamed to timm's (`backbones.KEY_CONVERTERS`), e.g. `"torchvision_mobilenet_v2"`.
    """

    library: str
    model_name: str
    display_name: str
    strides: tuple[int, ...]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    pass_image_size: bool = False
    weights: str | None = None
    channels_last_output: bool = False
    head_family: str = "bottleneck"
    normals_loss: str = "cosine"
    final_norm: bool = False
    hrnet_fuse_layers: bool = False
    foreign_weights: str | None = None

    @property
    def num_maps(self) -> int:
        return len(self.strides)

    @property
    def timm_name(self) -> str | None:
        """The `timm.create_model` name (`None` for a backbone built by another library)."""
        return self.model_name if self.library == "timm" else None

    @property
    def description(self) -> str:
        return f"{self.library}'s {self.model_name}"

    def uses_final_norm(self, config) -> bool:
        return self.final_norm and config.backbone_final_norm


def _swinv2(library: str, model_name: str, display_name: str, **kwargs) -> CTALBackboneInfo:
    # The last stage only (768 or 1024 channels at 1/32), NHWC, with the full model's final LayerNorm. timm fixes
    # its attention windows to the input size (`pass_image_size`); torchvision pads them (any input size).
    return CTALBackboneInfo(
        library,
        model_name,
        display_name,
        strides=(32,),
        channels_last_output=True,
        head_family="deeplab",
        normals_loss="l1",
        final_norm=True,
        **kwargs,
    )


def _swinv2_timm(model_name: str, display_name: str) -> CTALBackboneInfo:
    return _swinv2("timm", model_name, display_name, model_kwargs={"out_indices": (3,)}, pass_image_size=True)


BACKBONE_INFO: dict[str, CTALBackboneInfo] = {
    # Raw branch outputs 18/36/72/144 at strides 4..32 (`feature_location=""`), not timm's default "incre"
    # 128..1024 channels.
    "hrnet_w18_small_v2": CTALBackboneInfo(
        "timm",
        "hrnet_w18_small_v2",
        "HRNet-W18-small-v2",
        strides=(4, 8, 16, 32),
        model_kwargs={"feature_location": "", "out_indices": (1, 2, 3, 4)},
        hrnet_fuse_layers=True,
    ),
    # MobileNetV2 (not in the paper: a small ImageNet backbone for CPU runs), stages at strides 4..32 (24, 32, 96,
    # 320 channels); reads timm's weights or torchvision's IMAGENET1K_V1 file (docs/efficacy.md).
    "mobilenet_v2": CTALBackboneInfo(
        "timm",
        "mobilenetv2_100",
        "MobileNetV2",
        strides=(4, 8, 16, 32),
        model_kwargs={"out_indices": (1, 2, 3, 4)},
        foreign_weights="torchvision_mobilenet_v2",
    ),
    "swinv2_small": _swinv2_timm("swinv2_small_window8_256", "SwinV2-S"),
    "swinv2_tiny": _swinv2_timm("swinv2_tiny_window8_256", "SwinV2-T"),
    "swinv2_base": _swinv2_timm("swinv2_base_window8_256", "SwinV2-B"),
    # The authors' release: torchvision's models with their IMAGENET1K_V1 weights.
    "swin_v2_s": _swinv2(
        "torchvision", "swin_v2_s", "SwinV2-S (torchvision)", weights="Swin_V2_S_Weights.IMAGENET1K_V1"
    ),
    "swin_v2_t": _swinv2(
        "torchvision", "swin_v2_t", "SwinV2-T (torchvision)", weights="Swin_V2_T_Weights.IMAGENET1K_V1"
    ),
    "swin_v2_b": _swinv2(
        "torchvision", "swin_v2_b", "SwinV2-B (torchvision)", weights="Swin_V2_B_Weights.IMAGENET1K_V1"
    ),
}
BACKBONE_LIBRARIES: tuple[str, ...] = ("timm", "torchvision")


# ------------------------------------------------------------------------------------------ the affinity stride
def affinity_stride(affinity_scale: int, finest_stride: int) -> int:
    """Stride of the maps CTAL and PAP-Net diffuse on: max(`affinity_scale`, the finest map's stride), i.e. the
    finest map itself unless `affinity_scale` asks for a coarser one (paper Table 5)."""
    return max(affinity_scale, finest_stride)


def check_affinity_stride(image_size: Sequence[int], affinity_scale: int, finest_stride: int) -> int:
    """The one check that CTAL's affinity map fits the input (for a named backbone when the config is made, for any
    other when the backbone is built and its maps measured); returns the stride."""
    stride = affinity_stride(affinity_scale, finest_stride)
    if min(image_size) < stride:
        raise ValueError(
            f"The affinity map does not fit: `image_size` {list(image_size)} is smaller than its stride {stride} "
            f"(max of `affinity_scale` {affinity_scale} and the finest backbone map's stride {finest_stride})."
        )
    return stride


__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "NORMALS_LOSSES",
    "REGRESSION_LOSSES",
    "BINARY_LOSSES",
    "FPM_GROUPINGS",
    "PAPNET_AFFINITY_NORMALIZATIONS",
    "PAPNET_FEATURE_NORMALIZATIONS",
    "DECODER_INITS",
    "HRNET_FUSE_UPSAMPLING",
    "HRNET_FUSE_UPSAMPLINGS",
    "AFFINITY_SCALES",
    "IMAGENET_MEAN",
    "BUILTIN_TASK_NAMES",
    "IMAGENET_STD",
    "LOSS_WEIGHTINGS",
    "GRADIENT_AGGREGATOR_SPECS",
    "GRADIENT_AGGREGATORS",
    "check_choice",
    "RELEASE_LOSS_WEIGHTS",
    "CTALDecoderInfo",
    "DECODER_INFO",
    "DECODER_NAMES",
    "decoder_info",
    "decoder_display_name",
    "CTALHeadFamilyInfo",
    "HEAD_FAMILY_INFO",
    "default_head_family",
    "CTALBackboneInfo",
    "BACKBONE_INFO",
    "BACKBONE_LIBRARIES",
    "affinity_stride",
    "check_affinity_stride",
]
