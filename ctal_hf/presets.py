"""The paper's settings per dataset (`CTALConfig.from_preset`) and the behaviours of the authors' release that
every preset turns on. Data only (docs/design.md, "Presets")."""

from typing import Any

from .dataset_classes import DATASET_TASK_DESCRIPTIONS

# What `from_preset` sets for every dataset: the release's behaviour.
RELEASE_BEHAVIOUR: dict[str, Any] = {
    "fpm_grouping": "consecutive",
    "papnet_affinity_normalization": "columns",
    "papnet_feature_normalization": "pixels",
    "aspp_dropout": 0.5,
    "decoder_init": "pytorch",
    "hrnet_fuse_upsampling": "bilinear",
    "backbone_bn_momentum": 0.01,
    "backbone_final_norm": True,
}

# The paper's settings (docs/design.md, "Presets"): tasks in order, classes (with their names: `id2label`), units,
# input size (H, W), loss weights.
PRESETS: dict[str, dict[str, Any]] = {
    "nyuv2": {
        "task_specs": DATASET_TASK_DESCRIPTIONS["nyuv2"],
        "tasks": ["semseg", "depth", "normals"],
        "num_semseg_classes": 13,
        "image_size": [288, 384],
        "loss_weights": {"semseg": 1.0, "depth": 1.0, "normals": 1.0},
        "backbone": "hrnet_w18_small_v2",
    },
    "cityscapes": {
        "task_specs": DATASET_TASK_DESCRIPTIONS["cityscapes"],
        "tasks": ["semseg", "depth"],
        "num_semseg_classes": 19,
        "image_size": [128, 256],
        "loss_weights": {"semseg": 1.0, "depth": 10.0},
        "backbone": "hrnet_w18_small_v2",
    },
    "pascal_context": {
        "task_specs": DATASET_TASK_DESCRIPTIONS["pascal_context"],
        "tasks": ["semseg", "parts", "saliency", "normals", "edge"],
        "num_semseg_classes": 21,
        "num_parts_classes": 7,
        "image_size": [512, 512],
        "loss_weights": {"semseg": 2.0, "parts": 2.0, "saliency": 5.0, "normals": 10.0, "edge": 50.0},
        "backbone": "swinv2_small",
    },
    # Full resolution, CTAL at 1/4 (affinity maps 120 x 160 and 128 x 256, N = 19,200 and 32,768): only the
    # factorised diffusion fits (the dense form would need tens of GB of N x N maps per step).
    "nyuv2_full": {
        "task_specs": DATASET_TASK_DESCRIPTIONS["nyuv2"],
        "tasks": ["semseg", "depth", "normals"],
        "num_semseg_classes": 13,
        "image_size": [480, 640],
        "loss_weights": {"semseg": 1.0, "depth": 1.0, "normals": 1.0},
        "backbone": "hrnet_w18_small_v2",
        "attention_impl": "factorized",
    },
    "cityscapes_full": {
        "task_specs": DATASET_TASK_DESCRIPTIONS["cityscapes"],
        "tasks": ["semseg", "depth"],
        "num_semseg_classes": 19,
        "image_size": [512, 1024],
        "loss_weights": {"semseg": 1.0, "depth": 10.0},
        "backbone": "hrnet_w18_small_v2",
        "attention_impl": "factorized",
    },
}

__all__ = ["PRESETS", "RELEASE_BEHAVIOUR"]
