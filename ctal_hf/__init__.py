"""ctal_hf: cross-task affinity learning (CTAL) for multitask dense prediction, Hugging Face-compatible.

Importing the package registers the model with the transformers Auto classes."""

from transformers import AutoConfig, AutoModel

from .configuration_ctal import PRESETS, CTALConfig
from .modeling_ctal import CTALDenseMultitaskOutput, CTALForDenseMultitask, CTALPreTrainedModel
from .tasks import LOWER_IS_BETTER, TASKS

AutoConfig.register("ctal", CTALConfig, exist_ok=True)
AutoModel.register(CTALConfig, CTALForDenseMultitask, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "CTALConfig",
    "CTALForDenseMultitask",
    "CTALPreTrainedModel",
    "CTALDenseMultitaskOutput",
    "PRESETS",
    "TASKS",
    "LOWER_IS_BETTER",
]
