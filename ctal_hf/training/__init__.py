"""Training machinery for CTAL models, composed by `examples/train.py` (not carried into saved model folders).

- `arguments`: the command line and the checks that need no heavy import (`train.py --help` answers at once).
- `recipes`: the paper's hyper-parameters per dataset and the CPU recipe.
- `building`: recipe, config, model and learning-rate schedule from the arguments.
- `data_loading`: the splits of a dataset with their checks, the deterministic resumable sampler.
- `checkpointing`: atomic checkpoints, rotation, and `resume_training`, the one resume path (checks, `latest` with
  fallback).
- `evaluation`: evaluation over exact shards (metrics and per-task losses), prediction pictures.
- `loss_weighting`, `aggregation`: multitask loss balancing and TorchJD gradient aggregation.
- `model_card`, `hub`: the model card of a trained model and uploads to the Hub.

Submodules load on first use, so importing `ctal_hf.training.arguments` stays light."""

import importlib

_SUBMODULES = (
    "aggregation",
    "arguments",
    "building",
    "checkpointing",
    "data_loading",
    "evaluation",
    "hub",
    "loss_weighting",
    "model_card",
    "recipes",
)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_SUBMODULES)
