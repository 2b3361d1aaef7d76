"""CTAL for multitask dense prediction: backbone -> decoder (fusion, initial heads, cross-task distillation, final
heads) -> full-resolution predictions, with the paper's losses when labels are given."""

import dataclasses
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import DepthEstimatorOutput, SemanticSegmenterOutput
from transformers.utils import ModelOutput, logging

from .affinity_resampling import DEFAULT_AFFINITY_RESAMPLING, affinity_size_for, check_input_size
from .backbone_weights import pretrained_backbone_state_dict
from .backbones import CTALBackbone
from .blocks import CTALClassifier, upsample_to
from .configuration_ctal import CTALConfig
from .ctal_module import CTALAffinityModule, CTALFusionConv
from .decoders import DECODERS
from .input_checks import (
    check_checkpoint_matches,
    check_not_exported_folder,
    check_pixel_values,
    held_load_report,
    saved_config_matches,
    shape_mismatch_message,
    weights_file_error,
)
from .losses import CTALCriterion
from .registry import check_affinity_stride
from .tasks import serving_task

logger = logging.get_logger(__name__)


@dataclass
class CTALDenseMultitaskOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
        Sum over the labelled tasks of `loss_weights[task] * (initial loss + final loss)`.
    task_losses (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` are given):
        The weighted loss of each labelled task.
    predictions (`dict[str, torch.FloatTensor]`):
        Final predictions at the input size, per task, `(batch, channels, H, W)`: class logits (`semseg` /
        `parts`), regression values (`depth`: one channel), normals (3 channels, not normalised), binary logits
        (`saliency` / `edge`: one channel).
    initial_predictions (`dict[str, torch.FloatTensor | list[torch.FloatTensor]]`, *optional*):
        The deeply supervised initial predictions at the input size, same layouts; for multi-scale decoders a list
        with one map per backbone scale, finest first. Empty for decoders without initial heads (STL, MTL).
    """

    loss: torch.FloatTensor | None = None
    task_losses: dict[str, torch.FloatTensor] | None = None
    predictions: dict[str, torch.FloatTensor] | None = None
    initial_predictions: dict[str, torch.FloatTensor | list[torch.FloatTensor]] | None = None


@dataclass
class CTALNormalEstimatorOutput(ModelOutput):
    r"""
    Output of [`CTALForNormalEstimation`], with the field name of transformers' normal estimators.

    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are given):
        The normals task's weighted loss (initial + final).
    normals (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
        Raw normal predictions at the input size (not normalised; `post_process_normal_estimation` normalises).
    """

    loss: torch.FloatTensor | None = None
    normals: torch.FloatTensor | None = None


def _to_float32(maps: dict[str, torch.Tensor | list[torch.Tensor]]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Reduced-precision (autocast) maps as float32, for the losses; float32 and float64 maps as they are."""

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.float() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor

    return {task: [cast(m) for m in value] if isinstance(value, list) else cast(value) for task, value in maps.items()}


class CTALPreTrainedModel(PreTrainedModel):
    config: CTALConfig
    config_class = CTALConfig
    base_model_prefix = "ctal"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["CTALAffinityModule"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with two checks: a weights file safetensors cannot read (empty,
        truncated, random bytes) raises an `OSError` naming the file, and a checkpoint whose tensors do not fit the
        architecture of the config saved with it (say, an edited `decoder`) raises a short `ValueError` instead of
        leaving the missing parts randomly initialised. A `config=` that differs from the saved one (fine-tuning into
        another architecture on purpose) keeps transformers' behaviour: a load report, as a warning.

        `image_size=[H, W]` builds the model at another input size: the checkpoint loads strictly at its own size,
        then `resize_image_size` resamples the per-pixel CTAL fusion parameters (logged as a warning; sides must be
        multiples of the backbone's largest stride; docs/any-resolution.md)."""
        from safetensors import SafetensorError

        check_not_exported_folder(pretrained_model_name_or_path)
        image_size = kwargs.pop("image_size", None)
        output_loading_info = kwargs.pop("output_loading_info", False)
        if image_size is not None:
            model, info = cls.from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
            model.resize_image_size(image_size)
            return (model, info) if output_loading_info else model
        given = kwargs.get("config")
        check = given is None or saved_config_matches(cls.config_class, given, pretrained_model_name_or_path, kwargs)
        with held_load_report(hold=check) as report:
            try:
                model, info = super().from_pretrained(
                    pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
                )
            except SafetensorError as error:
                report.drop()
                raise OSError(weights_file_error(pretrained_model_name_or_path, error)) from None
            except RuntimeError as error:
                if "ignore_mismatched_sizes" not in str(error):
                    raise
                report.drop()
                config = (
                    given if given is not None else cls.config_class.from_pretrained(pretrained_model_name_or_path)
                )
                message = shape_mismatch_message(cls, config, pretrained_model_name_or_path, error)
                raise ValueError(message) from None
            if check:
                check_checkpoint_matches(model.config, info, pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; a model saved with its code (`import ctal_hf` registers the classes
        for the Auto classes) also lists every per-task view in `auto_map` (`AUTO_CLASSES`), so the folder loads with
        `AutoModelForDepthEstimation` / `...ForSemanticSegmentation` / `...ForNormalEstimation` and
        `trust_remote_code=True` in a process without this package."""
        if self._auto_class is not None:
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update({auto: f"{module}.{cls.__name__}" for auto, cls in AUTO_CLASSES.items()})
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _backbone_module_ids(self) -> frozenset[int]:
        """Ids of the modules inside the backbone(s), which `decoder_init` does not apply to (computed once)."""
        ids = self.__dict__.get("_ctal_backbone_module_ids")
        if ids is None:
            ids = frozenset(
                id(inner) for outer in self.modules() if isinstance(outer, CTALBackbone) for inner in outer.modules()
            )
            self.__dict__["_ctal_backbone_module_ids"] = ids
        return ids

    def _init_weights(self, module):
        """He initialisation for convolutions (the backbones and heads are ReLU CNNs) and N(0, `initializer_range`)
        for the prediction convs; with `config.decoder_init="pytorch"` every decoder layer keeps PyTorch's default
        initialisation instead, as the authors' release does (the backbone is He-initialised either way). The grouped
        fusion conv of CTAL (`CTALFusionConv`) starts as `config.fusion_init` says (PyTorch's default unless set) in
        both. timm modules with non-persistent buffers (SwinV2's relative position tables and attention masks)
        recompute them: `from_pretrained` leaves such buffers empty, since they are not in the checkpoint."""
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
        if isinstance(module, CTALFusionConv):
            module.reset_parameters()
        elif (
            self.config.decoder_init == "pytorch"
            and isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
            and id(module) not in self._backbone_module_ids()
        ):
            module.reset_parameters()
        elif isinstance(module, CTALClassifier):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class CTALForDenseMultitask(CTALPreTrainedModel):
    """A multitask dense prediction model; `config.decoder` selects CTAL-SS, CTAL-MS or one of the baselines."""

    def __init__(self, config: CTALConfig):
        super().__init__(config)
        spec = DECODERS[config.decoder]
        # STL owns one backbone per task; every other decoder shares one.
        if spec.owns_backbones:
            self.backbone = None
            self.decoder = spec.decoder_class(config)
        else:
            self.backbone = CTALBackbone(config)
            feature_info = self.backbone.feature_info
            # `CTALConfig` refuses a multi-scale decoder on a single map (`needs_multi_scale`) for every backbone; the
            # affinity map is checked here for backbones measured only now (named ones when the config is made).
            check_affinity_stride(config.image_size, config.affinity_scale, feature_info.finest_stride)
            self.decoder = spec.decoder_class(config, feature_info)
        self.criterion = CTALCriterion(config)
        self.post_init()
        # Plain attributes (not submodules): the CTAL modules, checked up front for memory, and the name of the
        # first spatial conv weight, whose layout says whether the model runs channels-last.
        self._affinity_modules = [module for module in self.modules() if isinstance(module, CTALAffinityModule)]
        self._layout_probe = next(
            (name for name, param in self.named_parameters() if param.dim() == 4 and param.shape[-1] > 1), None
        )

    @property
    def _backbones(self) -> list[CTALBackbone]:
        return [module for module in self.modules() if isinstance(module, CTALBackbone)]

    def check_input_size(self, image_size: tuple[int, int] | list[int]) -> None:
        """Refuses, with the reason, an input size the model cannot run at with resampled CTAL parameters
        (`interpolate_affinity=True`, `resize_image_size`): a side that is not a multiple of the backbone's largest
        stride (the error lists the nearest sizes that work), or any other size for a backbone fixed to its
        `image_size` at creation (timm's windowed SwinV2)."""
        image_size = tuple(int(side) for side in image_size)
        if image_size == tuple(self.config.image_size):
            return
        check_input_size(image_size, self.input_stride, self.fixed_size_reason, what="This CTAL model")

    @property
    def fixed_size_reason(self) -> str | None:
        """Why the model cannot run at another input size than its `image_size` (None when it can)."""
        return next((backbone.fixed_size_reason for backbone in self._backbones if backbone.fixed_size_reason), None)

    @property
    def input_stride(self) -> int:
        """The backbone's largest stride: inputs at another size than `image_size` must be multiples of it."""
        return max(backbone.max_stride for backbone in self._backbones)

    def _affinity_size(self, image_size: tuple[int, int]) -> tuple[int, int] | None:
        feature_info = self.backbone.feature_info if self.backbone is not None else None
        if feature_info is None:
            return None
        return affinity_size_for(image_size, feature_info.affinity_stride(self.config.affinity_scale))

    def resize_image_size(
        self, image_size: tuple[int, int] | list[int], method: str = DEFAULT_AFFINITY_RESAMPLING
    ) -> None:
        """Rebuilds the model, in place, for inputs of `image_size` = [H, W]: the per-pixel fusion weight and bias of
        every CTAL module are resampled to the new affinity size (`ctal_hf.affinity_resampling`, `method` one of
        `AFFINITY_RESAMPLINGS`) and `config.image_size` is updated, so `save_pretrained` writes a model of the new
        size. Every other parameter is size-independent and kept. The same size changes nothing."""
        image_size = tuple(int(side) for side in image_size)
        old = tuple(self.config.image_size)
        if image_size == old:
            return
        self.check_input_size(image_size)
        affinity_size = self._affinity_size(image_size)
        for module in self._affinity_modules:
            logger.warning(
                f"Building the model at image_size {list(image_size)} (trained at {list(old)}): CTAL's fusion weights "
                f"were resampled from {module.size[0]}x{module.size[1]} to {affinity_size[0]}x{affinity_size[1]} "
                f"affinity pixels ({method}); check the accuracy at this size, or fine-tune."
            )
            module.resize(affinity_size, method)
        if not self._affinity_modules:
            logger.warning(f"Building the model at image_size {list(image_size)} (trained at {list(old)}).")
        for backbone in self._backbones:
            backbone.feature_info = dataclasses.replace(backbone.feature_info, image_size=image_size)
        if affinity_size is not None and hasattr(self.decoder, "size"):
            self.decoder.size = affinity_size
        self.config.image_size = list(image_size)

    @property
    def is_channels_last(self) -> bool:
        """Whether the weights are channels-last (`model.to(memory_format=torch.channels_last)`); the model then
        converts `pixel_values` to channels-last too, so activations stay channels-last end to end. Outputs match
        the NCHW model's within float tolerance; `save_pretrained` writes the same (contiguous) weights."""
        if self._layout_probe is None:
            return False
        weight = self.get_parameter(self._layout_probe)
        return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    @classmethod
    def from_config_with_backbone_weights(
        cls, config: CTALConfig, backbone_weights: str | os.PathLike | None = None
    ) -> "CTALForDenseMultitask":
        """Builds a randomly initialised model, then loads pretrained weights into its backbone(s).

        Named backbones: `backbone_weights` is `None` (the building library's pretrained weights: timm's from the Hub,
        torchvision's from its download path), a `.safetensors` file or a torch state dict file of the full timm /
        torchvision model (`timm.create_model(name).state_dict()`, `torchvision.models.swin_v2_s().state_dict()`). With
        `backbone_config`: a timm backbone takes the same, a folder holding such a file or a timm Hub id
        (`"timm/resnet50.a1_in1k"`); a transformers backbone a Hub id or folder (`AutoBackbone.from_pretrained`), or a
        state dict file of the backbone (`None`: where `backbone_config` was loaded from, if it was). Loading happens
        after `post_init()`, so the weights are not re-initialised; every backbone tensor must be found, or a
        `ValueError` names the missing ones."""
        state_dict = pretrained_backbone_state_dict(config, backbone_weights)  # first: a bad source fails fast
        model = cls(config)
        for module in model.modules():
            if isinstance(module, CTALBackbone):
                module.load_pretrained(state_dict)
        return model

    def _check_inputs(
        self, pixel_values: torch.Tensor, labels: dict[str, torch.Tensor] | None, interpolate_affinity: bool = False
    ) -> None:
        check_pixel_values(pixel_values, self.dtype)
        expected = tuple(pixel_values.shape[-2:])
        if expected != tuple(self.config.image_size):
            if not interpolate_affinity:
                raise ValueError(
                    f"`pixel_values` are {expected} but this model is tied to image_size "
                    f"{tuple(self.config.image_size)} (CTAL's grouped conv has one group per pixel); resize with "
                    "CTALImageProcessor, or pass `interpolate_affinity=True` to resample CTAL's weights to this size."
                )
            self.check_input_size(expected)
        affinity_size = self._affinity_size(expected)
        for module in self._affinity_modules:
            module.check_memory(pixel_values.shape[0], affinity_size)
        if labels is None:
            return
        if not isinstance(labels, dict):
            raise ValueError(
                f"`labels` must be a dict task -> label tensor, got {type(labels).__name__}; pass `labels=None` for "
                "inference."
            )
        if not labels:
            raise ValueError(
                f"`labels` is an empty dict: pass a label for at least one of the tasks {list(self.config.tasks)}, or "
                "`labels=None` for inference."
            )
        unknown = set(labels) - set(self.config.tasks)
        if unknown:
            raise ValueError(f"`labels` has tasks the model does not predict: {sorted(unknown)}.")
        batch = pixel_values.shape[0]
        for task, target in labels.items():
            self.criterion.task_objects[task].check_label(target, batch, expected)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: dict[str, torch.Tensor] | None = None,
        return_dict: bool | None = None,
        interpolate_affinity: bool = False,
        **kwargs,
    ) -> CTALDenseMultitaskOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
            Normalised images at `config.image_size` (see [`CTALImageProcessor`]), or at another size with
            `interpolate_affinity=True`.
        labels (`dict[str, torch.Tensor]`, *optional*):
            Targets per task (torch tensors), in the layouts of [`CTALDenseMultitaskOutput`]: classification tasks
            (`semseg` / `parts`) `(batch, H, W)` int64 class ids with the ignore index, regression tasks `(batch, C,
            H, W)` (`depth`: 0 = missing), normals `(batch, 3, H, W)` (zero = missing), binary tasks (`saliency` /
            `edge`) `(batch, 1, H, W)` in {0, 1}. Non-finite values count as missing. Tasks left out are not
            trained. Labels of the wrong layout, or class ids outside the classes, raise a `ValueError`.
        interpolate_affinity (`bool`, *optional*, defaults to `False`):
            Run at the size of `pixel_values` when it differs from `config.image_size`, with CTAL's per-pixel fusion
            weight and bias resampled to that size (`ctal_hf.affinity_resampling`, as `interpolate_pos_encoding` of
            ViT models). Sides must be multiples of the backbone's largest stride; a backbone fixed to its input
            size (timm's SwinV2) is refused. Same predictions as `from_pretrained(folder, image_size=[H, W])`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_inputs(pixel_values, labels, interpolate_affinity)
        if self.is_channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        size = pixel_values.shape[-2:]
        features = pixel_values if self.backbone is None else self.backbone(pixel_values)
        predictions, initial = self.decoder(features)
        predictions = {task: upsample_to(pred, size) for task, pred in predictions.items()}
        initial = {
            task: [upsample_to(p, size) for p in pred] if isinstance(pred, list) else upsample_to(pred, size)
            for task, pred in initial.items()
        }
        loss, task_losses = None, None
        if labels is not None:
            # In float32 even under autocast: the losses normalise, take logs and reduce over every pixel.
            losses = self.criterion(_to_float32(predictions), _to_float32(initial), labels)
            loss = losses.pop("loss")
            task_losses = losses
        if not return_dict:
            return tuple(value for value in (loss, task_losses, predictions, initial) if value is not None)
        return CTALDenseMultitaskOutput(
            loss=loss, task_losses=task_losses, predictions=predictions, initial_predictions=initial
        )


class _CTALTaskView(CTALForDenseMultitask):
    """One task of a CTAL checkpoint behind a stock transformers interface. The model is the whole multitask model
    (CTAL distils across all its tasks, so every head runs): same modules, same state-dict keys, so the folder
    `CTALForDenseMultitask` saved loads strictly, and `save_pretrained` writes a folder it loads. Subclasses set
    `view` (a key of `ctal_hf.tasks.STOCK_TASK_VIEWS`) and `_output` (the prediction -> the stock output)."""

    view: str = ""

    def __init__(self, config: CTALConfig):
        task = serving_task(config.get_tasks(), self.view)
        if task is None:
            raise ValueError(
                f"{type(self).__name__} serves {self.view}, but this CTAL checkpoint has no such task: its tasks are "
                f"{list(config.tasks)}. Load it with CTALForDenseMultitask (AutoModel) or the class of one of its tasks."
            )
        super().__init__(config)
        self.task = task

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        interpolate_affinity: bool = False,
        **kwargs,
    ):
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
            Normalised images at `config.image_size` (see [`CTALImageProcessor`]); other sizes with
            `interpolate_affinity=True`, as [`CTALForDenseMultitask.forward`].
        labels (`torch.Tensor`, *optional*):
            Targets of the served task in its layout (see [`CTALForDenseMultitask.forward`]); the loss is that task's.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = super().forward(
            pixel_values,
            labels=None if labels is None else {self.task: labels},
            return_dict=True,
            interpolate_affinity=interpolate_affinity,
        )
        result = self._output(outputs.loss, outputs.predictions[self.task])
        return result if return_dict else result.to_tuple()

    def _output(self, loss: torch.Tensor | None, prediction: torch.Tensor) -> ModelOutput:
        raise NotImplementedError


class CTALForDepthEstimation(_CTALTaskView):
    """The depth task of a CTAL checkpoint as a depth estimator (`AutoModelForDepthEstimation`,
    `pipeline("depth-estimation")`): `predicted_depth` `(batch, height, width)` at the input size, in the unit the
    config states for the task (`config.get_tasks()[task].unit`)."""

    view = "depth-estimation"

    def _output(self, loss, prediction):
        return DepthEstimatorOutput(loss=loss, predicted_depth=prediction[:, 0])


class CTALForSemanticSegmentation(_CTALTaskView):
    """The segmentation task of a CTAL checkpoint (`config.semantic_segmentation_task`: `semseg` before `parts`) as a
    semantic segmenter (`AutoModelForSemanticSegmentation`, `pipeline("image-segmentation")`): `logits` `(batch,
    classes, height, width)` at the input size; class names in `config.id2label`."""

    view = "semantic-segmentation"

    def _output(self, loss, prediction):
        return SemanticSegmenterOutput(loss=loss, logits=prediction)


class CTALForNormalEstimation(_CTALTaskView):
    """The surface-normals task of a CTAL checkpoint as a normal estimator (`AutoModelForNormalEstimation`):
    `normals` `(batch, 3, height, width)`, not normalised (`post_process_normal_estimation` normalises)."""

    view = "normal-estimation"

    def _output(self, loss, prediction):
        return CTALNormalEstimatorOutput(loss=loss, normals=prediction)


# The Auto class each model class is registered with, and the `auto_map` a saved folder carries for all of them, so
# `AutoModelFor...from_pretrained(folder, trust_remote_code=True)` finds its class without this package.
AUTO_CLASSES: dict[str, type[CTALPreTrainedModel]] = {
    "AutoModel": CTALForDenseMultitask,
    "AutoModelForDepthEstimation": CTALForDepthEstimation,
    "AutoModelForSemanticSegmentation": CTALForSemanticSegmentation,
    "AutoModelForNormalEstimation": CTALForNormalEstimation,
}


__all__ = [
    "CTALPreTrainedModel",
    "CTALForDenseMultitask",
    "CTALDenseMultitaskOutput",
    "CTALForDepthEstimation",
    "CTALForSemanticSegmentation",
    "CTALForNormalEstimation",
    "CTALNormalEstimatorOutput",
    "AUTO_CLASSES",
]
