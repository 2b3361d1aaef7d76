"""CTAL for multitask dense prediction: backbone -> decoder (fusion, initial heads, cross-task distillation, final
heads) -> full-resolution predictions, with the paper's losses when labels are given."""

import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput, logging

from .backbones import CTALBackbone, pretrained_backbone_state_dict
from .blocks import CTALClassifier, upsample_to
from .configuration_ctal import CTALConfig
from .ctal_module import CTALAffinityModule, CTALFusionConv
from .decoders import DECODERS
from .input_checks import (
    check_checkpoint_matches,
    check_pixel_values,
    held_load_report,
    saved_config_matches,
    weights_file_error,
)
from .losses import CTALCriterion

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
        another architecture on purpose) keeps transformers' behaviour: a load report, as a warning."""
        from safetensors import SafetensorError

        output_loading_info = kwargs.pop("output_loading_info", False)
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
            if check:
                check_checkpoint_matches(model.config, info, pretrained_model_name_or_path)
        return (model, info) if output_loading_info else model

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
            if spec.needs_multi_scale and not feature_info.is_multi_scale:
                raise ValueError(
                    f"decoder {config.decoder!r} needs a multi-scale backbone; {self.backbone.name} gives one map."
                )
            affinity_stride = feature_info.affinity_stride(config.affinity_scale)
            if min(config.image_size) < affinity_stride:
                raise ValueError(
                    f"The affinity map does not fit: `image_size` {list(config.image_size)} is smaller than its "
                    f"stride {affinity_stride} (max of `affinity_scale` {config.affinity_scale} and the finest "
                    f"backbone map's stride {feature_info.finest_stride})."
                )
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

    def _check_inputs(self, pixel_values: torch.Tensor, labels: dict[str, torch.Tensor] | None) -> None:
        expected = tuple(self.config.image_size)
        check_pixel_values(pixel_values, self.dtype)
        if tuple(pixel_values.shape[-2:]) != expected:
            raise ValueError(
                f"`pixel_values` are {tuple(pixel_values.shape[-2:])} but this model is tied to image_size "
                f"{expected} (CTAL's grouped conv has one group per pixel); resize with CTALImageProcessor."
            )
        for module in self._affinity_modules:
            module.check_memory(pixel_values.shape[0])
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
        **kwargs,
    ) -> CTALDenseMultitaskOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, 3, height, width)`):
            Normalised images at `config.image_size` (see [`CTALImageProcessor`]).
        labels (`dict[str, torch.Tensor]`, *optional*):
            Targets per task (torch tensors), in the layouts of [`CTALDenseMultitaskOutput`]: classification tasks
            (`semseg` / `parts`) `(batch, H, W)` int64 class ids with the ignore index, regression tasks `(batch, C,
            H, W)` (`depth`: 0 = missing), normals `(batch, 3, H, W)` (zero = missing), binary tasks (`saliency` /
            `edge`) `(batch, 1, H, W)` in {0, 1}. Non-finite values count as missing. Tasks left out are not
            trained. Labels of the wrong layout, or class ids outside the classes, raise a `ValueError`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_inputs(pixel_values, labels)
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


__all__ = ["CTALPreTrainedModel", "CTALForDenseMultitask", "CTALDenseMultitaskOutput"]
