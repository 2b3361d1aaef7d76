"""Training recipes for `examples/train.py`: the paper's hyper-parameters per dataset (its Appendix F and the
authors' release) and a small CPU recipe for the offline synthetic dataset.

A recipe fixes what the paper fixes (optimizer, learning rate, weight decay, epochs, scheduler, batch size,
augmentation, the model preset with its loss weights); every field can be overridden on the command line."""

from dataclasses import asdict, dataclass, field, replace
from typing import Any

# Decoders whose initial predictions are multi-scale: on Cityscapes the paper trains them with warm restarts.
MULTI_SCALE_DECODERS: tuple[str, ...] = ("ctal_ms", "mtinet")
SCHEDULERS: tuple[str, ...] = ("cosine", "cosine_warm_restarts", "constant")


@dataclass(frozen=True)
class CTALRecipe:
    """One training setting.

    Args:
        name: the recipe's name (`--recipe`).
        dataset: the dataset it was written for (`--dataset` default when this recipe is chosen).
        preset: `CTALConfig.from_preset` name: tasks, classes, input size and loss weights of the model.
        model_overrides: config fields that differ from the preset (e.g. the synthetic dataset's 7 classes).
        learning_rate, weight_decay: Adam's (weight decay as Adam's L2 term, as in the paper).
        num_train_epochs: epochs; `max_train_steps` (optimizer steps) wins when set.
        lr_scheduler: `"cosine"`, `"cosine_warm_restarts"` or `"constant"`, stepped once per optimizer step.
        multi_scale_lr_scheduler: scheduler used instead for multi-scale decoders (`ctal_ms`, `mtinet`).
        restart_epochs_divisor, restart_mult: warm restarts use `T_0 = epochs // divisor` epochs and `T_mult`.
        per_device_train_batch_size, per_device_eval_batch_size: batch sizes.
        flip, scale_crop: training augmentations (random horizontal flip; MTAN's random scale-crop).
        fit: how samples reach the model size: `"resize"` or `"pad"` (PASCAL's centred padding).
        normalize: ImageNet mean / std normalisation (stored in the saved image processor).
        num_train_images, num_validation_images: synthetic dataset only: how many scenes to render.
    """

    name: str
    dataset: str
    preset: str
    model_overrides: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = 1e-4
    weight_decay: float = 1e-4
    num_train_epochs: int = 200
    max_train_steps: int | None = None
    lr_scheduler: str = "cosine"
    multi_scale_lr_scheduler: str | None = None
    restart_epochs_divisor: int = 3
    restart_mult: int = 2
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    flip: bool = True
    scale_crop: bool = False
    fit: str = "resize"
    normalize: bool = True
    num_train_images: int | None = None
    num_validation_images: int | None = None

    def scheduler_for(self, decoder: str) -> str:
        """The scheduler this recipe uses for `decoder`."""
        if decoder in MULTI_SCALE_DECODERS and self.multi_scale_lr_scheduler is not None:
            return self.multi_scale_lr_scheduler
        return self.lr_scheduler

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes) -> "CTALRecipe":
        return replace(self, **changes)


RECIPES: dict[str, CTALRecipe] = {
    # CPU default: CTAL-SS on 64x96 synthetic rooms (semseg 7 classes, depth, normals; CTAL runs at 16x24), about
    # 150 optimizer steps of batch 8. A larger learning rate than the paper's, since the backbone starts from scratch
    # and the budget is a few minutes.
    "synthetic": CTALRecipe(
        name="synthetic",
        dataset="synthetic",
        preset="nyuv2",
        model_overrides={"num_semseg_classes": 7, "image_size": [64, 96]},
        learning_rate=1e-3,
        weight_decay=1e-4,
        num_train_epochs=6,
        lr_scheduler="cosine",
        num_train_images=200,
        num_validation_images=50,
    ),
    # The paper (Appendix F): Adam, batch 8, cosine annealing; flip only (scale-crop is an option).
    "nyuv2": CTALRecipe(
        name="nyuv2", dataset="nyuv2", preset="nyuv2", learning_rate=1e-4, weight_decay=1e-4, num_train_epochs=200
    ),
    "cityscapes": CTALRecipe(
        name="cityscapes",
        dataset="cityscapes",
        preset="cityscapes",
        learning_rate=5e-4,
        weight_decay=1e-4,
        num_train_epochs=75,
        multi_scale_lr_scheduler="cosine_warm_restarts",
    ),
    "pascal_context": CTALRecipe(
        name="pascal_context",
        dataset="pascal_context",
        preset="pascal_context",
        learning_rate=2e-5,
        weight_decay=1e-5,
        num_train_epochs=70,
        fit="pad",
    ),
}


def get_recipe(name: str) -> CTALRecipe:
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose from {sorted(RECIPES)}.")
    return RECIPES[name]


__all__ = ["CTALRecipe", "RECIPES", "MULTI_SCALE_DECODERS", "SCHEDULERS", "get_recipe"]
