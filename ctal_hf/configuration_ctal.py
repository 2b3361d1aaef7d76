"""CTAL model configuration."""

import math
import os
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.utils import logging

from .configuration_hub import (
    PIPELINE_TASK,
    check_unknown_kwargs,
    declared_custom_pipelines,
    save_pipeline_code,
)
from .presets import PRESETS, RELEASE_BEHAVIOUR
from .registry import (
    AFFINITY_SCALES,
    ATTENTION_IMPLEMENTATIONS,
    BACKBONE_INFO,
    DECODER_INFO,
    DECODER_INITS,
    DECODER_NAMES,
    FPM_GROUPINGS,
    HEAD_FAMILY_INFO,
    HRNET_FUSE_UPSAMPLINGS,
    NORMALS_LOSSES,
    PAPNET_AFFINITY_NORMALIZATIONS,
    PAPNET_FEATURE_NORMALIZATIONS,
    affinity_stride,
    check_affinity_stride,
    check_choice,
    default_head_family,
)
from .tasks import CLASS_COUNT_FIELDS, CTALTask, resolve_tasks, serving_task

# CTAL's fusion conv: how it starts (`fusion_init`) and whether the fused map is divided by N (`affinity_normalization`).
FUSION_INITS: tuple[str, ...] = ("default", "zero", "scaled")
AFFINITY_NORMALIZATIONS: tuple[str, ...] = ("none", "num_pixels")

logger = logging.get_logger(__name__)


@strict
class CTALConfig(PreTrainedConfig):
    r"""
    Configuration of a [`CTALForDenseMultitask`] model: which tasks it predicts, which backbone and decoder it
    uses, and the hyper-parameters of the cross-task affinity learning (CTAL) module.

    tasks (`list[str]`, *optional*, defaults to `["semseg", "depth", "normals"]`):
        The tasks, in order: the paper's `semseg`, `parts`, `depth`, `normals`, `saliency`, `edge`, or any task
        defined in `task_specs`. The order is the order of the interleaved affinity channels, so it is part of the
        architecture.
    task_specs (`dict[str, dict]`, *optional*):
        Specs of the tasks that are not built in, by name, e.g. `{"albedo": {"kind": "regression",
        "num_channels": 3}}`: `kind` (`"classification"`, `"regression"`, `"normals"` or `"binary"`) and
        optional `num_channels`, `loss`, `ignore_value`, `pos_weight`, `flip_negate_channels`, `divide_by_zoom`, `positive`,
        `metric`, `lower_is_better`, `value_range`, `title`, `hub_task_type`, `class_names`, `unit` (see
        `ctal_hf.tasks`). For a built-in task only the descriptive keys `title`, `short_title`, `class_names` and
        `unit`, e.g. `{"semseg": {"class_names": [...]}, "depth": {"unit": "metres"}}` (the presets set these).
        Saved in config.json, so a model folder carries its tasks. The class names of the segmentation task become
        `id2label` / `label2id`.
    num_semseg_classes (`int`, *optional*, defaults to 13):
        Number of semantic classes (NYUv2 13, Cityscapes 19, PASCAL-Context 21).
    num_parts_classes (`int`, *optional*, defaults to 7):
        Number of human-part classes, background included (PASCAL-Context 7).
    backbone (`str`, *optional*, defaults to `"hrnet_w18_small_v2"`):
        A named backbone (`registry.BACKBONE_INFO`): `"hrnet_w18_small_v2"` (four maps, strides 4-32, timm), `"swinv2_small"`
        (timm `swinv2_small_window8_256`, one map at 1/32), `"swinv2_tiny"` / `"swinv2_base"` (timm's window-8
        SwinV2-T / -B), or the authors' release's torchvision models `"swin_v2_s"`, `"swin_v2_t"`, `"swin_v2_b"`
        (`features`, one map at 1/32). Set to `None` when `backbone_config` is given.
    backbone_config (`dict` or `PreTrainedConfig`, *optional*):
        Any transformers backbone instead of a named one, built with `transformers.backbone_utils.load_backbone`
        (random weights; see `from_config_with_backbone_weights`): a backbone config such as
        `TimmBackboneConfig(backbone="resnet50", out_indices=(1, 2, 3, 4))`, `ConvNextConfig(out_features=[...])`,
        `Dinov2Config(out_features=["stage12"])`, or its dict with a `"model_type"`. Several maps are fused at the
        finest; a single map is read at its own stride.
    backbone_kwargs (`dict`, *optional*):
        Extra keyword arguments for `timm.create_model` of a named backbone (for example `drop_path_rate`).
    head_family (`str`, *optional*):
        How the decoders end (`registry.HEAD_FAMILY_INFO`): `"bottleneck"` (final heads of two bottlenecks + 1x1, MTI-Net's
        high-resolution STL / MTL heads, plain CTAL projections: the paper's HRNet models) or `"deeplab"` (DeepLab-v3
        heads, CTAL projections with BatchNorm + ReLU: its SwinV2 models). Defaults to the named backbone's family;
        with `backbone_config`, `"bottleneck"` for several maps and `"deeplab"` for a single map.
    image_size (`list[int]`, *optional*, defaults to `[288, 384]`):
        Input height and width. The CTAL grouped convolution has one group per affinity pixel, so a model is tied
        to this size; the image processor resizes to it.
    decoder (`str`, *optional*, defaults to `"ctal_ss"`):
        `"ctal_ss"` (single-scale CTAL), `"ctal_ms"` (multi-scale CTAL) or one of the paper's baselines
        (`"stl"`, `"mtl"`, `"padnet"`, `"papnet"`, `"mtinet"`, `"concat"`).
    ctal_channels (`int`, *optional*, defaults to 128):
        Channels C of the features the affinities are computed from and diffused into.
    head_channels (`int`, *optional*, defaults to 256):
        Channels of the initial task heads (the CTAL input).
    gamma (`float`, *optional*, defaults to 0.05):
        Blending factor of the diffused features (paper Eq. 2).
    kernel_size (`int`, *optional*, defaults to 3):
        Kernel of the grouped convolution that fuses the task affinities; odd.
    fusion_init (`str`, *optional*, defaults to `"default"`):
        How CTAL's fusion conv (the grouped conv that makes the fused map `M`) starts; the paper does not say, the
        release keeps PyTorch's default. `"default"`: PyTorch's default (the release; `D = V M^T` sums over all
        N affinity pixels, so `gamma * D` starts several times larger than the task features it is blended with);
        `"zero"`: weights and bias zero (`M = 0`: CTAL starts as its blend with no diffusion, `(1 - gamma) X`, and
        learns how much cross-task affinity to use); `"scaled"`: PyTorch's default divided by N (`D` starts at the
        scale of the features). Same module and parameters in all three, only the starting point differs
        (docs/efficacy.md).
    affinity_normalization (`str`, *optional*, defaults to `"none"`):
        `"none"`: the fused map `M` as the paper (Eq. 1) and the release; `"num_pixels"`: `M` divided by N in the
        forward (a departure from the paper: the diffusion averages over the affinity pixels instead of summing).
    affinity_scale (`int`, *optional*, defaults to 4):
        CTAL (and PAP-Net) run at 1/max(`affinity_scale`, stride of the finest backbone map) of the input: HRNet's
        1/4 map at 4, 6 or 8 (paper Table 5; the map is resized to floor(input / 6) for 6); a single 1/32 map at
        1/32.
    decoder_stride (`int`, *optional*):
        Single-map backbones only: stride of the map the decoder reads. Unset (or the map's stride) reads the map as
        is; half of it upsamples the map x2 (bilinear) first, so every decoder stage runs on a 4x larger map (at
        288 x 384 SwinV2's 1/32 map is 9 x 12, too small for the ASPP's dilated taps). The printed FLOPs of the
        paper's NYUv2 SwinV2 baselines (Table 2) fit 16 for STL, MTL, PAD-Net and PAP-Net and 32 for CTAL-SS; its
        PASCAL-Context models (Table 3) fit 32.
    papnet_diffusion_steps (`int`, *optional*, defaults to 1):
        PAP-Net only: number of diffusion steps `X <- beta X A^T + (1 - beta) X_0`. One step is the authors'
        setting (`num_iters: 1`); the printed FLOPs of the NYUv2 HRNet PAP-Net (Table 5) fit 2.
    attention_impl (`str`, *optional*, defaults to `"auto"`):
        How the affinity diffusion is computed: `"dense"` (N x N maps, as the paper's release), `"factorized"`
        (exact, never builds an N x N map) or `"auto"` (the cheaper of the two for the map size).
    loss_weights (`dict[str, float]`, *optional*):
        Weight per task of its (initial + final) loss; tasks not listed weigh 1.
    ignore_index (`int`, *optional*, defaults to 255):
        Label value ignored by the classification losses and metrics (and by saliency / edge labels).
    normals_loss (`str`, *optional*, defaults to `"cosine"`):
        `"cosine"` (1 - cosine similarity, the CNN recipe) or `"l1"` (L1 on normalised predictions, the Swin
        recipe).
    edge_pos_weight (`float`, *optional*, defaults to 0.95):
        Weight of edge pixels in the balanced binary cross-entropy of the edge task.
    initializer_range (`float`, *optional*, defaults to 0.02):
        Standard deviation of the normal initialiser of linear layers and (with `decoder_init="he"`) of the 1x1
        prediction convs.
    fpm_grouping (`str`, *optional*, defaults to `"tasks"`):
        CTAL-MS / MTI-Net feature propagation: which channels of the T concatenated task features (T x C) one
        softmax runs over. `"tasks"`: the T tasks' copies of each channel (per-task masks, as MTI-Net's paper
        describes); `"consecutive"`: T consecutive channels of the concatenation, as the authors' release does
        (`view(B, C, T, h, w)`, softmax over T). `from_preset` sets `"consecutive"`.
    papnet_affinity_normalization (`str`, *optional*, defaults to `"rows"`):
        PAP-Net: `"rows"` clips negative similarities and makes every row of the affinity sum to one (each pixel
        receives a weighted average); `"columns"` divides by column sums without clipping
        (`A[i, j] = S[i, j] / sum_k S[k, j]`), as the authors' release does. `from_preset` sets `"columns"`.
    papnet_feature_normalization (`str`, *optional*, defaults to `"channels"`):
        PAP-Net: the similarity `S[i, j]` is between pixel vectors normalised to unit length over the channels
        (`"channels"`, cosine similarities) or between features normalised over the pixels of each channel
        (`"pixels"`, what the authors' release computes). `from_preset` sets `"pixels"`.
    aspp_dropout (`float`, *optional*, defaults to 0.0):
        Dropout after the ASPP projection of the DeepLab heads (SwinV2 models); the release uses 0.5, which
        `from_preset` sets.
    decoder_init (`str`, *optional*, defaults to `"he"`):
        Initialisation of the decoder (everything but the backbone): `"he"` (He-normal convs, N(0,
        `initializer_range`) prediction convs, zero biases) or `"pytorch"` (PyTorch's default initialisation of
        every layer, as the release). The backbone is He-initialised in both (ImageNet weights replace it in the
        paper recipes). `from_preset` sets `"pytorch"`.
    hrnet_fuse_upsampling (`str`, *optional*, defaults to `"nearest"`):
        HRNet backbones: how the fuse layers bring a coarser branch to the finer one's size before the branches are
        summed: `"nearest"` (timm's, as the ImageNet classification model) or `"bilinear"` (`align_corners=False`,
        the authors' release). The weights are the same either way. `from_preset` sets `"bilinear"`; other backbones
        ignore it.
    backbone_bn_momentum (`float`, *optional*):
        Momentum of every BatchNorm of the backbone's running statistics; `None` keeps the backbone's own (timm's
        HRNet: 0.1). The authors' release uses 0.01, which `from_preset` sets; backbones without BatchNorm (SwinV2)
        are unaffected.
    backbone_final_norm (`bool`, *optional*, defaults to `False`):
        Named backbones that end with a LayerNorm (the SwinV2 ones): apply it to the last map, with the ImageNet
        weights of the full model's `norm` (as the authors' release's `features -> norm -> permute`). `from_preset`
        sets `True`; HRNet ignores it.

    Examples:

    ```python
    >>> from ctal_hf import CTALConfig, CTALForDenseMultitask

    >>> config = CTALConfig.from_preset("nyuv2", decoder="ctal_ss")
    >>> model = CTALForDenseMultitask(config)

    >>> # Any transformers backbone, e.g. a timm ResNet-50 with its four stages:
    >>> from transformers import TimmBackboneConfig

    >>> backbone_config = TimmBackboneConfig(backbone="resnet50", out_indices=(1, 2, 3, 4))
    >>> model = CTALForDenseMultitask(CTALConfig.from_preset("nyuv2", backbone_config=backbone_config))
    ```"""

    model_type = "ctal"
    # Resolved by model type in `_resolve_backbone` (transformers never reads the class of a `backbone_config` spec;
    # `AutoConfig` here would import the Auto mappings while this module loads, which `ctal_hf`'s lazy registration
    # of the Auto classes hooks).
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(config_class=PreTrainedConfig, model_type="timm_backbone", optional=True)
    }

    tasks: list[str] | tuple[str, ...] = ("semseg", "depth", "normals")
    task_specs: dict[str, Any] | None = None
    num_semseg_classes: int = 13
    num_parts_classes: int = 7
    backbone: str | None = "hrnet_w18_small_v2"
    backbone_config: dict | PreTrainedConfig | None = None
    backbone_kwargs: dict[str, Any] | None = None
    head_family: str | None = None
    image_size: list[int] | tuple[int, ...] = (288, 384)
    decoder: str = "ctal_ss"
    ctal_channels: int = 128
    head_channels: int = 256
    gamma: float = 0.05
    kernel_size: int = 3
    fusion_init: str = "default"
    affinity_normalization: str = "none"
    affinity_scale: int = 4
    decoder_stride: int | None = None
    papnet_diffusion_steps: int = 1
    attention_impl: str = "auto"
    loss_weights: dict[str, float] | None = None
    ignore_index: int = 255
    normals_loss: str = "cosine"
    edge_pos_weight: float = 0.95
    initializer_range: float = 0.02
    fpm_grouping: str = "tasks"
    papnet_affinity_normalization: str = "rows"
    papnet_feature_normalization: str = "channels"
    aspp_dropout: float = 0.0
    decoder_init: str = "he"
    hrnet_fuse_upsampling: str = "nearest"
    backbone_bn_momentum: float | None = None
    backbone_final_norm: bool = False

    def __post_init__(self, **kwargs):
        self.tasks = list(self.tasks)
        self.task_specs = {
            name: dict(spec) if isinstance(spec, dict) else spec for name, spec in (self.task_specs or {}).items()
        }
        self.image_size = list(self.image_size)
        self.backbone_kwargs = dict(self.backbone_kwargs or {})
        self._resolve_backbone()
        self._check_fields()
        weights = self.loss_weights or {}
        self.loss_weights = {task: float(weights.get(task, 1.0)) for task in self.tasks}
        self._check_unknown_kwargs(kwargs)
        self._set_labels(kwargs)
        super().__post_init__(**kwargs)

    def _set_labels(self, kwargs: dict[str, Any]) -> None:
        """`id2label` / `label2id` are the classes of the segmentation task the stock `image-segmentation` pipeline
        serves (`semantic_segmentation_task`): its `class_names`, else `LABEL_{i}`. An `id2label` given (or read
        from config.json) names the classes when it has one name per class and the task states no names; otherwise
        it is replaced, with a warning (the names belong in `task_specs`)."""
        task_name = self.semantic_segmentation_task
        if task_name is None:
            return
        task = self.get_tasks()[task_name]
        names = task.class_names or tuple(f"LABEL_{index}" for index in range(task.num_channels))
        if self.id2label is not None:
            given = {int(key): value for key, value in self.id2label.items()}
            given_names = tuple(given[i] for i in sorted(given))
            if sorted(given) == list(range(task.num_channels)) and task.class_names in (None, given_names):
                names = given_names
            elif given_names != names and given_names != tuple(f"LABEL_{i}" for i in range(len(given))):
                logger.warning(
                    f"`id2label` {given} does not name the {task.num_channels} classes of the segmentation task "
                    f"{task_name!r}; using {list(names)}. Set class names with `task_specs={{{task_name!r}: "
                    "{'class_names': [...]}}`."
                )
        kwargs.pop("num_labels", None)  # follows from the classes
        self.id2label = dict(enumerate(names))
        self.label2id = {name: index for index, name in self.id2label.items()}

    @property
    def semantic_segmentation_task(self) -> str | None:
        """The task `AutoModelForSemanticSegmentation` / `pipeline("image-segmentation")` serve: the first
        classification task with Hub task type `image-segmentation` (`semseg` before `parts`), or `None`."""
        return serving_task(self.get_tasks(), "semantic-segmentation")

    @classmethod
    def _check_unknown_kwargs(cls, kwargs: dict[str, Any]) -> None:
        check_unknown_kwargs(cls, kwargs)

    def _check_fields(self):
        """Checks that the fields describe a model that can be built, naming the field that is wrong. Runs in
        `__post_init__` (not as a `@strict` validator) so that users get a plain `ValueError`."""
        if not self.tasks:
            raise ValueError("`tasks` is empty: a CTAL model needs at least one task.")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"`tasks` lists a task twice: {self.tasks}.")
        for name, allowed in (
            ("decoder", DECODER_INFO),
            ("head_family", HEAD_FAMILY_INFO),
            ("attention_impl", ATTENTION_IMPLEMENTATIONS),
            ("normals_loss", NORMALS_LOSSES),
            ("fpm_grouping", FPM_GROUPINGS),
            ("papnet_affinity_normalization", PAPNET_AFFINITY_NORMALIZATIONS),
            ("papnet_feature_normalization", PAPNET_FEATURE_NORMALIZATIONS),
            ("decoder_init", DECODER_INITS),
            ("hrnet_fuse_upsampling", HRNET_FUSE_UPSAMPLINGS),
            ("fusion_init", FUSION_INITS),
            ("affinity_normalization", AFFINITY_NORMALIZATIONS),
        ):
            check_choice(name, getattr(self, name), allowed)
        momentum = self.backbone_bn_momentum
        if momentum is not None and not (isinstance(momentum, (int, float)) and 0.0 < momentum <= 1.0):
            raise ValueError(
                f"`backbone_bn_momentum` is a BatchNorm momentum in (0, 1] or None (the backbone's own), got "
                f"{momentum!r}."
            )
        if not 0.0 <= self.aspp_dropout < 1.0:
            raise ValueError(f"`aspp_dropout` is a dropout probability in [0, 1), got {self.aspp_dropout}.")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be a positive odd number, got {self.kernel_size}.")
        if len(self.image_size) != 2 or min(self.image_size) <= 0:
            raise ValueError(f"`image_size` must be [height, width] with positive values, got {self.image_size}.")
        if self.affinity_scale not in AFFINITY_SCALES:
            raise ValueError(
                f"`affinity_scale` must be 4, 6 or 8 (paper Table 5), got {self.affinity_scale}; CTAL runs at "
                "1/max(affinity_scale, finest map stride)."
            )
        if self.decoder_stride is not None and self.decoder_stride < 1:
            raise ValueError(f"`decoder_stride` must be a positive stride, got {self.decoder_stride}.")
        if self.backbone is not None:
            self._check_named_backbone_fits()
        if DECODER_INFO[self.decoder].needs_multi_scale and self.num_backbone_maps < 2:
            raise ValueError(
                f"decoder {self.decoder!r} needs a multi-scale backbone (it predicts and propagates between scales); "
                f"{self.backbone_description} gives one map. Use a backbone with several maps (e.g. "
                "`out_indices=(1, 2, 3, 4)`) or a single-scale decoder (ctal_ss, padnet, papnet, concat, mtl, stl)."
            )
        if self.papnet_diffusion_steps < 1:
            raise ValueError(f"`papnet_diffusion_steps` must be at least 1, got {self.papnet_diffusion_steps}.")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"`gamma` blends two feature maps and must lie in [0, 1], got {self.gamma}.")
        for name in ("num_semseg_classes", "num_parts_classes", "ctal_channels", "head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        self.get_tasks()  # every task known and every spec valid, or a ValueError naming the task and field
        extra = set(self.loss_weights or {}) - set(self.tasks)
        if extra:
            raise ValueError(f"`loss_weights` names tasks the model does not predict: {sorted(extra)}.")
        for task, weight in (self.loss_weights or {}).items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ValueError(
                    f"`loss_weights[{task!r}]` must be a finite number >= 0 (0 switches the task's loss off), got "
                    f"{weight!r}."
                )
        if not 0.0 < self.edge_pos_weight < 1.0:
            raise ValueError(
                f"`edge_pos_weight` is the weight of edge pixels in a balanced BCE (the rest get 1 - it) and must lie "
                f"in (0, 1), got {self.edge_pos_weight}."
            )
        if not (math.isfinite(self.initializer_range) and self.initializer_range > 0):
            raise ValueError(
                f"`initializer_range` must be a positive standard deviation, got {self.initializer_range}."
            )
        classes = max(self.num_semseg_classes, self.num_parts_classes, 2)
        if 0 <= self.ignore_index < classes:
            raise ValueError(
                f"`ignore_index` {self.ignore_index} is a valid class id (classes are 0..{classes - 1}, binary labels 0 "
                "and 1), so those pixels would be ignored; use 255 or a negative value."
            )

    def _resolve_backbone(self) -> None:
        """Turns `backbone_config` into a backbone config instance (as `SubConfigSpec` does, with errors that name the
        problem) and sets the defaults that follow from the backbone (`head_family`)."""
        backbone_config = self.backbone_config
        if isinstance(backbone_config, dict):
            model_type = backbone_config.get("model_type")
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING

            if model_type not in CONFIG_MAPPING:
                raise ValueError(
                    f'`backbone_config` needs a known "model_type" (e.g. "timm_backbone", "convnext", '
                    f'"dinov2"), got {model_type!r}.'
                )
            backbone_config = CONFIG_MAPPING[model_type].from_dict(dict(backbone_config))
        elif backbone_config is not None and not isinstance(backbone_config, PreTrainedConfig):
            raise TypeError(
                f'`backbone_config` must be a backbone config, its dict (with "model_type") or None, got '
                f"{type(backbone_config).__name__}; for a Hub id or folder pass `AutoConfig.from_pretrained(...)`."
            )
        self.backbone_config = backbone_config
        if backbone_config is not None:
            from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

            if backbone_config.model_type not in MODEL_FOR_BACKBONE_MAPPING_NAMES:
                raise ValueError(
                    f"`backbone_config` is a {type(backbone_config).__name__}, which `AutoBackbone` cannot build; "
                    f"use one of the backbone model types: {sorted(MODEL_FOR_BACKBONE_MAPPING_NAMES)}."
                )
            if not getattr(backbone_config, "out_indices", None):
                raise ValueError(
                    f"`backbone_config` ({backbone_config.model_type}) selects no feature maps: set `out_features` "
                    "or `out_indices` to the stages the decoder should read, finest first."
                )
            if self.backbone_kwargs:
                raise ValueError(
                    f"`backbone_kwargs` {self.backbone_kwargs} apply to named timm backbones; with `backbone_config` "
                    "set the options on the backbone config."
                )
            self.backbone = None  # `backbone_config` replaces the named backbone (e.g. a preset's)
        elif self.backbone not in BACKBONE_INFO:
            raise ValueError(
                f"Unknown `backbone` {self.backbone!r}; choose from {sorted(BACKBONE_INFO)}, or pass any transformers "
                "backbone as `backbone_config` (e.g. `TimmBackboneConfig(backbone=...)`)."
            )
        if self.backbone is not None and self.decoder_stride == BACKBONE_INFO[self.backbone].strides[-1]:
            self.decoder_stride = None  # the deepest map's own stride: nothing to resample (configs saved with 32)
        if self.head_family is None:
            if self.backbone is not None:
                self.head_family = BACKBONE_INFO[self.backbone].head_family
            else:
                self.head_family = default_head_family(self.num_backbone_maps)

    def _check_named_backbone_fits(self) -> None:
        """The input-size checks a named backbone allows before it is built (`CTALBackbone` checks any backbone's
        maps when it is built)."""
        spec = BACKBONE_INFO[self.backbone]
        if any(side % spec.strides[-1] for side in self.image_size):
            raise ValueError(
                f"`image_size` {self.image_size} is not divisible by the {self.backbone} backbone's stride "
                f"{spec.strides[-1]}."
            )
        if self.decoder_stride is not None and self.decoder_stride != spec.strides[-1]:
            if spec.num_maps > 1:
                raise ValueError(
                    f"`decoder_stride` applies to single-map backbones (SwinV2); {self.backbone}'s decoders read all "
                    f"{spec.num_maps} scales (CTAL runs at 1/`affinity_scale`)."
                )
            if spec.strides[0] != 2 * self.decoder_stride:
                raise ValueError(
                    f"`decoder_stride` must be {spec.strides[0]} (the map as is) or {spec.strides[0] // 2} (upsampled "
                    f"x2) for {self.backbone}, got {self.decoder_stride}."
                )
        finest = self.decoder_stride or spec.strides[0]
        if self.affinity_scale != AFFINITY_SCALES[0] and self.affinity_scale < finest:
            raise ValueError(
                f"`affinity_scale` {self.affinity_scale} is finer than {self.backbone}'s map (stride {finest}): CTAL "
                "runs on the finest map or coarser. Leave it at 4."
            )
        check_affinity_stride(self.image_size, self.affinity_scale, finest)

    @property
    def custom_pipelines(self) -> dict[str, dict[str, Any]]:
        """The pipelines config.json declares (see `save_pretrained`), which `transformers.pipeline()` loads from the
        folder's code. Empty in a process where the task is registered (by `import ctal_hf`): `pipeline()` then uses
        the registered class, where a declared pipeline would make it demand `trust_remote_code=True`."""
        return declared_custom_pipelines(self.__dict__.get("custom_pipelines"))

    @custom_pipelines.setter
    def custom_pipelines(self, value: dict[str, dict[str, Any]]) -> None:
        self.__dict__["custom_pipelines"] = value  # saved by `to_dict`, like any attribute

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Saves config.json. A config saved with its code (`import ctal_hf` registers it for `AutoConfig`) also saves
        the code of `pipeline("dense-multitask")` (`pipeline_ctal.py` and the modules it imports) and declares it in
        `custom_pipelines`, so `transformers.pipeline(model=folder, trust_remote_code=True)` works without this
        package. Done here rather than in the model's `save_pretrained`, which saves its config before uploading
        with `push_to_hub=True`, so the files are uploaded too."""
        if self._auto_class is not None:
            declared = save_pipeline_code(save_directory)
            if declared is not None:
                self.custom_pipelines = declared
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @property
    def num_backbone_maps(self) -> int:
        """How many feature maps the backbone gives the decoders (several are fused at the finest)."""
        if self.backbone_config is not None:
            return len(self.backbone_config.out_indices)
        return BACKBONE_INFO[self.backbone].num_maps

    @property
    def backbone_description(self) -> str:
        """The backbone in words, for messages and model cards: a named backbone's display name, else the backbone
        config's model type (and timm model name)."""
        if self.backbone_config is None:
            return BACKBONE_INFO[self.backbone].display_name
        timm_name = getattr(self.backbone_config, "backbone", None)
        model_type = self.backbone_config.model_type
        return f"timm {timm_name}" if model_type == "timm_backbone" and timm_name else model_type

    @property
    def affinity_map_size(self) -> tuple[int, int]:
        """Size (h, w) of the maps CTAL and PAP-Net diffuse on, for a named backbone (with `backbone_config` it is
        known once the model is built: `model.decoder.ctal.size`)."""
        if self.backbone_config is not None:
            raise ValueError(
                "`affinity_map_size` of a `backbone_config` model is measured on the built backbone: read "
                "`model.backbone.feature_info.affinity_map_size(config.affinity_scale)`."
            )
        finest = self.decoder_stride or BACKBONE_INFO[self.backbone].strides[0]
        stride = affinity_stride(self.affinity_scale, finest)
        height, width = self.image_size
        return height // stride, width // stride

    @property
    def timm_model_name(self) -> str | None:
        """The timm model name of a named backbone (`None` with `backbone_config` or a torchvision backbone)."""
        return None if self.backbone is None else BACKBONE_INFO[self.backbone].timm_name

    def get_tasks(self) -> dict[str, CTALTask]:
        """The task objects of `tasks`, in order (`ctal_hf.tasks`): built-in tasks set by this config's fields, the
        others by `task_specs`. Each owns its channels, loss, metric, label checks and post-processing."""
        return resolve_tasks(
            self.tasks,
            self.task_specs,
            num_semseg_classes=self.num_semseg_classes,
            num_parts_classes=self.num_parts_classes,
            ignore_index=self.ignore_index,
            normals_loss=self.normals_loss,
            edge_pos_weight=self.edge_pos_weight,
        )

    def task_channels(self, task: str) -> int:
        """Number of output channels of `task`'s prediction."""
        return self.get_tasks()[task].num_channels

    @staticmethod
    def _preset_task_specs(name: str, fields: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
        """The preset's task descriptions (class names, units) under the `task_specs` given: class names are kept
        only where the class count is still the preset's (`num_semseg_classes=5` drops the 13 NYUv2 names)."""
        counts = {task: fields[field] for task, field in CLASS_COUNT_FIELDS.items() if field in fields}
        described = {}
        for task, spec in PRESETS[name].get("task_specs", {}).items():
            spec = dict(spec)
            if "class_names" in spec and len(spec["class_names"]) != counts.get(task, len(spec["class_names"])):
                del spec["class_names"]
            if spec:
                described[task] = spec
        for task, spec in (given or {}).items():
            described[task] = {**described.get(task, {}), **spec} if task in described else spec
        return described

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "CTALConfig":
        """The paper's setting for a dataset (`"nyuv2"`, `"cityscapes"` or `"pascal_context"`), or NYUv2 / Cityscapes at
        full resolution (`"nyuv2_full"` 480 x 640, `"cityscapes_full"` 512 x 1024, CTAL at 1/4, factorised), with the
        authors' release's behaviours (`RELEASE_BEHAVIOUR`); keyword arguments override any field, e.g.
        `decoder="ctal_ms"`, `backbone="swin_v2_s"`, `backbone_config=...` or `decoder_init="he"`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose from {sorted(PRESETS)}.")
        fields = {**RELEASE_BEHAVIOUR, **PRESETS[name], **kwargs}
        fields["task_specs"] = cls._preset_task_specs(name, fields, kwargs.get("task_specs"))
        if fields.get("backbone_config") is None and fields.get("backbone") in BACKBONE_INFO:
            fields.setdefault("normals_loss", BACKBONE_INFO[fields["backbone"]].normals_loss)
        return cls(**fields)


__all__ = ["CTALConfig", "PRESETS", "RELEASE_BEHAVIOUR", "DECODER_NAMES", "PIPELINE_TASK"]
