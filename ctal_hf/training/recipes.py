"""Training recipes for `examples/train.py`: the paper's hyper-parameters per dataset (its Appendix F and the
authors' release) and a small CPU recipe for the offline synthetic dataset.

A recipe fixes what the paper fixes (optimizer, learning rate, weight decay, epochs, scheduler, batch size,
augmentation, the model preset with its loss weights); every field can be overridden on the command line. Where the
paper and the authors' release differ, the paper recipes follow the release, which produced the paper's numbers
(docs/reproducing-the-paper.md, "Parity with the authors' release"): schedulers stepped once per epoch,
`drop_last`, [0, 1] inputs for the HRNet recipes, the PASCAL-Context augmentation, the loss weights per decoder and
ImageNet backbone weights."""

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..dataset_classes import DATASET_TASK_DESCRIPTIONS
from ..registry import decoder_info

# How a recipe derives each decoder's loss weights from the preset's (`CTALRecipe.loss_weights_for`).
LOSS_WEIGHT_RULES: tuple[str, ...] = ("preset", "release")

SCHEDULERS: tuple[str, ...] = ("cosine", "cosine_warm_restarts", "poly", "step", "constant")
SCHEDULER_INTERVALS: tuple[str, ...] = ("step", "epoch")
# How CTAL's fusion conv learns relative to the rest (`CTALRecipe.fusion_lr_scale`).
FUSION_LR_SCALES: tuple[str, ...] = ("none", "num_pixels")


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
        lr_scheduler: `"cosine"`, `"cosine_warm_restarts"`, `"poly"` (`(1 - t / T)^2`, torch's `PolynomialLR` with
            power 2), `"step"` (halved after half the run, torch's `StepLR(T // 2, 0.5)`) or `"constant"`.
        lr_scheduler_interval: `"epoch"` (the learning rate changes once per epoch, as the release steps its
            schedulers) or `"step"` (once per optimizer step, a smooth version of the same curve).
        multi_scale_lr_scheduler: scheduler used instead for decoders with multi-scale initial predictions
            (`multi_scale_initial` in `ctal_hf.registry.DECODER_INFO`: CTAL-MS, MTI-Net).
        restart_epochs_divisor, restart_mult: warm restarts use `T_0 = epochs // divisor` epochs and `T_mult`.
        per_device_train_batch_size, per_device_eval_batch_size: batch sizes.
        drop_last: drop the last incomplete training batch of each epoch (the release does).
        flip, scale_crop: training augmentations (random horizontal flip; MTAN's random scale-crop).
        rescale_range, crop, cat_max_ratio, photometric: the PASCAL-Context augmentation of the release (random
            rescale in a continuous range, random crop of the model size avoiding windows one class dominates,
            photometric distortion); see `ctal_hf.data.CTALTransform`.
        fit: how samples reach the model size: `"resize"` or `"pad"` (PASCAL's centred padding).
        normalize: ImageNet mean / std normalisation (stored in the saved image processor); the release's HRNet
            recipes feed [0, 1] images.
        loss_weight_rule: `"preset"` (every decoder trains with the preset's loss weights) or `"release"` (the
            release's: STL unweighted, hard sharing twice the weights, since the release adds the same loss as its
            initial and its final term, PAD-Net / PAP-Net with `baseline_loss_weights` replacing the preset's).
        baseline_loss_weights: with the `"release"` rule, weights of the baselines that differ from CTAL's (PASCAL:
            semseg 1.0 where CTAL has 2.0).
        pretrained_backbone: ImageNet weights the backbone starts from (`--pretrained_backbone`): `"timm"` (timm's
            own, downloaded from the Hub), a file, a Hub id, or `None` (random weights).
        num_train_images, num_validation_images: synthetic dataset only: how many scenes to render.
        fusion_lr_scale: `"none"` (every parameter trains with `learning_rate`, as the release) or `"num_pixels"`:
            the parameters of CTAL's fusion conv (`CTALFusionConv`, one weight per affinity pixel and task, summed
            over all N pixels in `D = V M^T`) train with `learning_rate / N`, so each Adam step moves `D` as much as
            a step moves the other layers' outputs. With `fusion_init="scaled"` this trains exactly the model that
            `affinity_normalization="num_pixels"` trains (up to weight decay), keeping the paper's
            parametrisation (docs/efficacy.md). Models without a CTAL module are unaffected.
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
    lr_scheduler_interval: str = "step"
    multi_scale_lr_scheduler: str | None = None
    restart_epochs_divisor: int = 3
    restart_mult: int = 2
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    drop_last: bool = False
    flip: bool = True
    scale_crop: bool = False
    rescale_range: tuple[float, float] | None = None
    crop: bool = False
    cat_max_ratio: float = 1.0
    photometric: bool = False
    fit: str = "resize"
    normalize: bool = True
    loss_weight_rule: str = "preset"
    baseline_loss_weights: dict[str, float] = field(default_factory=dict)
    pretrained_backbone: str | None = None
    num_train_images: int | None = None
    num_validation_images: int | None = None
    fusion_lr_scale: str = "none"

    def __post_init__(self):
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown lr_scheduler {self.lr_scheduler!r}; choose from {list(SCHEDULERS)}.")
        if self.lr_scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(
                f"Unknown lr_scheduler_interval {self.lr_scheduler_interval!r}; choose from {list(SCHEDULER_INTERVALS)}."
            )
        if self.fusion_lr_scale not in FUSION_LR_SCALES:
            raise ValueError(
                f"Unknown fusion_lr_scale {self.fusion_lr_scale!r}; choose from {list(FUSION_LR_SCALES)}."
            )
        if self.loss_weight_rule not in LOSS_WEIGHT_RULES:
            raise ValueError(
                f"Unknown loss_weight_rule {self.loss_weight_rule!r}; choose from {list(LOSS_WEIGHT_RULES)}."
            )

    def loss_weights_for(self, decoder: str, preset_weights: dict[str, float]) -> dict[str, float]:
        """The task loss weights `decoder` trains with, from the preset's (see `loss_weight_rule`)."""
        weights = {task: float(weight) for task, weight in preset_weights.items()}
        rule = decoder_info(decoder).release_loss_weights  # `ctal_hf.registry.RELEASE_LOSS_WEIGHTS`
        if self.loss_weight_rule == "preset" or rule == "preset":
            return weights
        if rule == "uniform":
            return dict.fromkeys(weights, 1.0)
        baseline = {task: float(self.baseline_loss_weights.get(task, weight)) for task, weight in weights.items()}
        if rule == "baseline_doubled":
            return {task: 2.0 * weight for task, weight in baseline.items()}
        return baseline

    def augmentation_name(self) -> str:
        """A short description of the training augmentations (for logs and model cards)."""
        parts = []
        if self.rescale_range is not None:
            parts.append(f"rescale {self.rescale_range[0]:g}-{self.rescale_range[1]:g}")
        if self.crop:
            parts.append("crop" + (f" (cat_max_ratio {self.cat_max_ratio:g})" if self.cat_max_ratio < 1 else ""))
        parts += [name for name, on in (("flip", self.flip), ("scale_crop", self.scale_crop)) if on]
        if self.photometric:
            parts.append("photometric")
        return "+".join(parts) or "none"

    def scheduler_for(self, decoder: str) -> str:
        """The scheduler this recipe uses for `decoder`."""
        # Decoders whose initial predictions are multi-scale: on Cityscapes the paper trains them with warm restarts.
        if decoder_info(decoder).multi_scale_initial and self.multi_scale_lr_scheduler is not None:
            return self.multi_scale_lr_scheduler
        return self.lr_scheduler

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes) -> "CTALRecipe":
        return replace(self, **changes)


# The release's training settings shared by the paper recipes.
_RELEASE = dict(lr_scheduler_interval="epoch", drop_last=True, pretrained_backbone="timm", loss_weight_rule="release")

RECIPES: dict[str, CTALRecipe] = {
    # CPU default: CTAL-SS on 64x96 synthetic rooms (semseg 7 classes, depth, normals; CTAL runs at 16x24), about
    # 150 optimizer steps of batch 8. A larger learning rate than the paper's, since the backbone starts from scratch
    # and the budget is a few minutes. The backbone's BatchNorms keep timm's momentum (0.1): with the release's 0.01
    # the running statistics of so short a run stay near their initial values, and evaluation uses them. CTAL's
    # fusion conv starts at the features' scale and learns at lr / N (`fusion_init="scaled"`, `fusion_lr_scale`; the
    # paper's model and parametrisation, another starting point): with the release's start the diffusion swamps the
    # features and the refined predictions fall far below the initial ones (docs/efficacy.md).
    "synthetic": CTALRecipe(
        name="synthetic",
        dataset="synthetic",
        preset="nyuv2",
        model_overrides={
            "num_semseg_classes": 7,
            "image_size": [64, 96],
            "backbone_bn_momentum": None,
            "task_specs": DATASET_TASK_DESCRIPTIONS["synthetic"],
            "fusion_init": "scaled",
        },
        fusion_lr_scale="num_pixels",
        learning_rate=1e-3,
        weight_decay=1e-4,
        num_train_epochs=6,
        lr_scheduler="cosine",
        num_train_images=200,
        num_validation_images=50,
    ),
    # The paper (Appendix F) and the release: Adam, batch 8, cosine annealing per epoch, flip only, [0, 1] inputs.
    "nyuv2": CTALRecipe(
        name="nyuv2",
        dataset="nyuv2",
        preset="nyuv2",
        learning_rate=1e-4,
        weight_decay=1e-4,
        num_train_epochs=200,
        normalize=False,
        **_RELEASE,
    ),
    "cityscapes": CTALRecipe(
        name="cityscapes",
        dataset="cityscapes",
        preset="cityscapes",
        learning_rate=5e-4,
        weight_decay=1e-4,
        num_train_epochs=75,
        multi_scale_lr_scheduler="cosine_warm_restarts",
        normalize=False,
        **_RELEASE,
    ),
    # The release's PASCAL-Context augmentation (from ATRC / mmsegmentation); STL with batch 8 as the paper says (the
    # release's stl.yml uses 2: the one setting where the recipes follow the paper).
    "pascal_context": CTALRecipe(
        name="pascal_context",
        dataset="pascal_context",
        preset="pascal_context",
        learning_rate=2e-5,
        weight_decay=1e-5,
        num_train_epochs=70,
        rescale_range=(0.5, 2.0),
        crop=True,
        cat_max_ratio=0.75,
        photometric=True,
        fit="pad",
        baseline_loss_weights={"semseg": 1.0},
        **_RELEASE,
    ),
}


def get_recipe(name: str) -> CTALRecipe:
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose from {sorted(RECIPES)}.")
    return RECIPES[name]


__all__ = [
    "CTALRecipe",
    "RECIPES",
    "SCHEDULERS",
    "SCHEDULER_INTERVALS",
    "LOSS_WEIGHT_RULES",
    "FUSION_LR_SCALES",
    "get_recipe",
]
