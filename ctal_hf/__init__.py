"""ctal_hf: cross-task affinity learning (CTAL) for multitask dense prediction, Hugging Face-compatible.

Importing the package registers the model (and its per-task views for the stock depth-estimation, semantic-segmentation
and normal-estimation Auto classes) and its image processor with the transformers Auto classes, and the
`pipeline("dense-multitask")` task. The import is cheap: the classes below are imported when first used, and each
registration is made when transformers first imports the registry it goes into (see `auto_registration`)."""

from typing import TYPE_CHECKING

from . import auto_registration
from .lazy_imports import lazy_module_attributes

# Public name -> the submodule that defines it, imported on first access (PEP 562 module `__getattr__`).
_LAZY_ATTRIBUTES = {
    "CTALConfig": "configuration_ctal",
    "PRESETS": "configuration_ctal",
    "PIPELINE_TASK": "configuration_ctal",
    "CTALForDenseMultitask": "modeling_ctal",
    "CTALPreTrainedModel": "modeling_ctal",
    "CTALDenseMultitaskOutput": "modeling_ctal",
    "CTALForDepthEstimation": "modeling_ctal",
    "CTALForSemanticSegmentation": "modeling_ctal",
    "CTALForNormalEstimation": "modeling_ctal",
    "CTALNormalEstimatorOutput": "modeling_ctal",
    "CTALImageProcessor": "image_processing_ctal",
    "DenseMultitaskPipeline": "pipeline_ctal",
    "MultiTaskEvaluator": "metrics",
    "delta_m": "metrics",
    "TASKS": "tasks",
    "LOWER_IS_BETTER": "tasks",
}

if TYPE_CHECKING:
    from .configuration_ctal import PIPELINE_TASK, PRESETS, CTALConfig
    from .image_processing_ctal import CTALImageProcessor
    from .metrics import MultiTaskEvaluator, delta_m
    from .modeling_ctal import (
        CTALDenseMultitaskOutput,
        CTALForDenseMultitask,
        CTALForDepthEstimation,
        CTALForNormalEstimation,
        CTALForSemanticSegmentation,
        CTALNormalEstimatorOutput,
        CTALPreTrainedModel,
    )
    from .pipeline_ctal import DenseMultitaskPipeline
    from .tasks import LOWER_IS_BETTER, TASKS

auto_registration.install()

__version__ = "0.1.0"


__getattr__, __dir__ = lazy_module_attributes(__name__, globals(), _LAZY_ATTRIBUTES)


__all__ = [
    "CTALConfig",
    "CTALForDenseMultitask",
    "CTALPreTrainedModel",
    "CTALDenseMultitaskOutput",
    "CTALForDepthEstimation",
    "CTALForSemanticSegmentation",
    "CTALForNormalEstimation",
    "CTALNormalEstimatorOutput",
    "PRESETS",
    "PIPELINE_TASK",
    "TASKS",
    "LOWER_IS_BETTER",
    "CTALImageProcessor",
    "DenseMultitaskPipeline",
    "MultiTaskEvaluator",
    "delta_m",
]
