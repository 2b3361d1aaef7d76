"""ctal_hf: cross-task affinity learning (CTAL) for multitask dense prediction, Hugging Face-compatible.

Importing the package registers the model and its image processor with the transformers Auto classes, and the
`pipeline("dense-multitask")` task."""

from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_ctal import PIPELINE_TASK, PRESETS, CTALConfig
from .image_processing_ctal import CTALImageProcessor
from .metrics import MultiTaskEvaluator, delta_m
from .modeling_ctal import CTALDenseMultitaskOutput, CTALForDenseMultitask, CTALPreTrainedModel
from .pipeline_ctal import DenseMultitaskPipeline
from .tasks import LOWER_IS_BETTER, TASKS

AutoConfig.register("ctal", CTALConfig, exist_ok=True)
AutoModel.register(CTALConfig, CTALForDenseMultitask, exist_ok=True)
# Saved folders carry the modelling code (and the pipeline's), so they load with `trust_remote_code=True` without
# this package.
CTALConfig.register_for_auto_class()
CTALForDenseMultitask.register_for_auto_class("AutoModel")
AutoImageProcessor.register(CTALConfig, image_processor_classes={"torchvision": CTALImageProcessor}, exist_ok=True)
CTALImageProcessor.register_for_auto_class("AutoImageProcessor")
# Registered here, not in pipeline_ctal.py: the copy of that file a saved folder carries must not register itself when
# `pipeline(..., trust_remote_code=True)` loads it, since a registered task hides the folder's `custom_pipelines`.
if PIPELINE_REGISTRY.supported_tasks.get(PIPELINE_TASK, {}).get("impl") is not DenseMultitaskPipeline:
    PIPELINE_REGISTRY.register_pipeline(
        PIPELINE_TASK, pipeline_class=DenseMultitaskPipeline, pt_model=AutoModel, type="image"
    )

__version__ = "0.1.0"

__all__ = [
    "CTALConfig",
    "CTALForDenseMultitask",
    "CTALPreTrainedModel",
    "CTALDenseMultitaskOutput",
    "PRESETS",
    "TASKS",
    "LOWER_IS_BETTER",
    "CTALImageProcessor",
    "DenseMultitaskPipeline",
    "MultiTaskEvaluator",
    "delta_m",
]
