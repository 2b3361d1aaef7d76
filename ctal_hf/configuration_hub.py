"""What `CTALConfig` needs from transformers and the Hub besides its fields: the keywords `PreTrainedConfig` accepts
(so that a typo is refused), and the pipeline a saved folder declares in config.json and carries the code of."""

import copy
import dataclasses
import difflib
import os
import shutil
from pathlib import Path
from typing import Any

from transformers.dynamic_module_utils import get_relative_import_files

# The pipeline a saved folder declares in config.json (`custom_pipelines`) and carries the code of, for
# `transformers.pipeline(model=folder, trust_remote_code=True)` in a process without this package.
PIPELINE_TASK = "dense-multitask"
PIPELINE_FILE = "pipeline_ctal.py"
CUSTOM_PIPELINES: dict[str, dict[str, Any]] = {
    PIPELINE_TASK: {"impl": "pipeline_ctal.DenseMultitaskPipeline", "pt": ["AutoModel"], "type": "image"}
}

# Keyword arguments `PreTrainedConfig` (and `from_pretrained` / `from_dict`) accept besides its dataclass fields: what
# a config.json from transformers carries, and the legacy names it still reads (transformers keeps no list of them:
# its `__post_init__` pops them one by one). Anything else is a typo.
PRETRAINED_CONFIG_KWARGS: frozenset[str] = frozenset(
    {
        "auto_map", "custom_pipelines", "model_type", "name_or_path", "_name_or_path", "_commit_hash", "torch_dtype",
        "num_labels", "output_attentions", "attn_implementation", "experts_implementation", "per_layer_config",
        "_attn_implementation_internal", "_experts_implementation_internal", "rope_scaling", "rope_theta",
        "rope_parameters", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id",
        "sep_token_id", "decoder_start_token_id", "task_specific_params", "finetuning_task", "tie_word_embeddings",
        "torchscript", "pruned_heads", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
        "tie_encoder_decoder", "base_model_tp_plan", "base_model_pp_plan", "base_model_ep_plan", "use_cache",
    }
)  # fmt: skip


def check_unknown_kwargs(config_class: type, kwargs: dict[str, Any]) -> None:
    """Refuses a keyword that is neither a field of `config_class` nor one `PreTrainedConfig` knows (a typo such as
    `num_semseg_class=20` would otherwise become an unused attribute and leave the field at its default)."""
    from transformers.generation import GenerationConfig

    fields = [field.name for field in dataclasses.fields(config_class)]
    known = set(fields) | PRETRAINED_CONFIG_KWARGS | set(config_class.attribute_map)
    unknown = [name for name in kwargs if name not in known]
    if unknown:
        unknown = [name for name in unknown if name not in GenerationConfig._get_default_generation_params()]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            hints.append(f"`{name}`" + (f" (did you mean `{close[0]}`?)" if close else ""))
        raise TypeError(
            f"{config_class.__name__} got unknown keyword argument(s) {', '.join(hints)}; its fields are documented "
            f"in `help({config_class.__name__})`."
        )


def declared_custom_pipelines(declared: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The pipelines config.json declares, as `transformers.pipeline()` should read them: empty in a process where
    the task is registered (by `import ctal_hf`), since `pipeline()` then uses the registered class, where a declared
    pipeline would make it demand `trust_remote_code=True`."""
    if declared:
        from transformers.pipelines import PIPELINE_REGISTRY

        if any(task in PIPELINE_REGISTRY.supported_tasks for task in declared):
            return {}
    return copy.deepcopy(declared or {})  # `pipeline()` edits the dict it reads


def save_pipeline_code(save_directory: str | os.PathLike) -> dict[str, dict[str, Any]] | None:
    """Copies the code of `pipeline("dense-multitask")` (`pipeline_ctal.py` and the modules it imports) into
    `save_directory` and returns the `custom_pipelines` entry declaring it; `None` where this copy of the code lacks
    the pipeline file (a copy loaded as remote code may)."""
    pipeline_file = Path(__file__).with_name(PIPELINE_FILE)
    if not pipeline_file.is_file():
        return None
    os.makedirs(save_directory, exist_ok=True)
    for source in [pipeline_file, *map(Path, get_relative_import_files(pipeline_file))]:
        shutil.copyfile(source, Path(save_directory, source.name))
    return copy.deepcopy(CUSTOM_PIPELINES)


__all__ = [
    "PIPELINE_TASK",
    "PIPELINE_FILE",
    "CUSTOM_PIPELINES",
    "PRETRAINED_CONFIG_KWARGS",
    "check_unknown_kwargs",
    "declared_custom_pipelines",
    "save_pipeline_code",
]
