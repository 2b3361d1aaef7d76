# Trains a CTAL model (or one of the paper's baselines) for multitask dense prediction with 🤗 Accelerate.
#
# With no arguments it trains CTAL-SS on the offline synthetic dataset on a CPU in a few minutes:
#
#   accelerate launch examples/train.py
#
# The same script runs on one or many GPUs, with FSDP, or as DDP on CPU, unchanged (README, "Training"):
#
#   accelerate launch --multi_gpu --num_processes 8 examples/train.py --dataset nyuv2 --data_dir nyuv2 --recipe nyuv2
#   ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/train.py
#
# What it shows: one `accelerator.prepare`, gradient accumulation with `accelerator.accumulate`, the paper's recipes
# (examples/recipes.py), evaluation of the whole validation split with metrics kept as sums and reduced across
# processes (exact for any number of processes), atomic checkpoints that resume exactly (model, optimizer,
# scheduler, RNG and data position, augmentations included), `save_pretrained` of the model and its image
# processor, prediction pictures, a model card, and `--push_to_hub`.

import argparse
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from huggingface_hub import HfApi
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

# The examples folder is on sys.path when this file runs as a script; tests import it the same way.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from model_card import make_model_card, metrics_table  # noqa: E402
from recipes import RECIPES, SCHEDULERS, CTALRecipe, get_recipe  # noqa: E402

import ctal_hf  # noqa: E402, F401  (registers the Auto classes)
from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor  # noqa: E402
from ctal_hf.configuration_ctal import BACKBONES, DECODER_NAMES, DECODERS, PRESETS  # noqa: E402
from ctal_hf.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, CTALTorchDataset, CTALTransform  # noqa: E402
from ctal_hf.metrics import MultiTaskEvaluator  # noqa: E402
from ctal_hf.tasks import TASKS  # noqa: E402

logger = get_logger(__name__)

BUILDER_DATASETS = {
    "synthetic": ("dataset_scripts.synthetic", "SyntheticScenes"),
    "nyuv2": ("dataset_scripts.nyuv2", "NYUv2"),
    "cityscapes": ("dataset_scripts.cityscapes", "Cityscapes"),
    "pascal_context": ("dataset_scripts.pascal_context", "PascalContext"),
}
VALIDATION_SPLITS = ("validation", "val", "test")
CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TRAINING_STATE_FILE = "training_state.json"
RESULTS_FILE = "eval_results.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a CTAL multitask dense prediction model with Accelerate.")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        default=None,
        help="synthetic, nyuv2, cityscapes, pascal_context, a Hub dataset id or a local Parquet folder (with its "
        "README.md). Default: the recipe's dataset (synthetic).",
    )
    data.add_argument("--dataset_config", default=None, help="Builder / Hub config (cityscapes: 19class or 7class).")
    data.add_argument("--data_dir", default=None, help="Folder of the public preprocessed files (nyuv2, ...).")
    data.add_argument("--cache_dir", default=None, help="datasets cache folder (default: HF_DATASETS_CACHE).")
    data.add_argument("--num_train_images", type=int, default=None, help="Synthetic: scenes rendered for training.")
    data.add_argument("--num_validation_images", type=int, default=None, help="Synthetic: validation scenes.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use the first N training rows only.")
    data.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate on the first N validation rows.")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=None, help="Start from a trained CTAL model (folder or Hub).")
    model.add_argument("--decoder", default="ctal_ss", choices=DECODERS, help="CTAL-SS / CTAL-MS or a baseline.")
    model.add_argument("--backbone", default=None, choices=sorted(BACKBONES), help="Default: the recipe's preset.")
    model.add_argument(
        "--pretrained_backbone",
        default=None,
        help="ImageNet weights for the backbone: 'timm' (timm's own, from the Hub), a local .safetensors / torch "
        "file, or a Hub model id holding model.safetensors (e.g. timm/hrnet_w18_small_v2.ms_in1k). Default: random.",
    )
    model.add_argument("--tasks", nargs="+", default=None, choices=sorted(TASKS), help="Default: the preset's.")
    model.add_argument("--image_size", nargs=2, type=int, default=None, metavar=("HEIGHT", "WIDTH"))
    model.add_argument("--num_semseg_classes", type=int, default=None)
    model.add_argument("--num_parts_classes", type=int, default=None)
    model.add_argument(
        "--config_overrides",
        default=None,
        help='Further config fields as "key=value,key=value", e.g. "affinity_scale=6" (paper Table 5), '
        '"decoder_stride=16", "papnet_diffusion_steps=2", "attention_impl=dense" or "gamma=0.1". Not with '
        "--model_name_or_path.",
    )
    model.add_argument("--gradient_checkpointing", action="store_true")

    train = parser.add_argument_group("training (defaults: the recipe's)")
    train.add_argument(
        "--recipe", default=None, choices=sorted(RECIPES), help="Default: the dataset's, else synthetic."
    )
    train.add_argument("--learning_rate", type=float, default=None)
    train.add_argument("--weight_decay", type=float, default=None)
    train.add_argument("--num_train_epochs", type=int, default=None)
    train.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides epochs.")
    train.add_argument("--lr_scheduler", default=None, choices=SCHEDULERS)
    train.add_argument("--per_device_train_batch_size", type=int, default=None)
    train.add_argument("--per_device_eval_batch_size", type=int, default=None)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    train.add_argument("--scale_crop", action=argparse.BooleanOptionalAction, default=None, help="MTAN scale-crop.")
    train.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="Random horizontal flip.")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval_only", action="store_true", help="Evaluate --model_name_or_path; no training.")

    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", default=None, help="Default: outputs/ctal-<recipe>.")
    out.add_argument(
        "--checkpointing_steps", default=None, help="Save the training state every N optimizer steps, or 'epoch'."
    )
    out.add_argument("--checkpoints_total_limit", type=int, default=2, help="Checkpoints kept (oldest removed).")
    out.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    out.add_argument("--report_to", default="none", help="Tracker(s): tensorboard, wandb, all, or none.")
    out.add_argument("--logging_steps", type=int, default=10)
    out.add_argument("--num_prediction_images", type=int, default=4, help="Validation images drawn after training.")
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id", default=None, help="org/name of the model repo.")
    out.add_argument("--hub_token", default=None)
    out.add_argument("--hub_private_repo", action="store_true")
    out.add_argument("--push_checkpoints", action="store_true", help="Also upload each checkpoint when saved.")
    # Test hook: SIGKILL this process right after optimizer step N (checks that resume survives a hard kill).
    out.add_argument("--kill_after_step", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}"
            )
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id org/name")
    if args.eval_only and not args.model_name_or_path:
        parser.error("--eval_only evaluates a trained model: pass --model_name_or_path")
    if args.gradient_accumulation_steps < 1:
        parser.error("--gradient_accumulation_steps must be >= 1")
    return args


def resolve_recipe(args) -> CTALRecipe:
    """The recipe (by name, else the dataset's, else synthetic) with the command-line overrides applied."""
    name = args.recipe
    if name is None:
        name = args.dataset if args.dataset in RECIPES else "synthetic"
    recipe = get_recipe(name)
    overrides = {
        key: getattr(args, key)
        for key in (
            "learning_rate",
            "weight_decay",
            "num_train_epochs",
            "max_train_steps",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "scale_crop",
            "flip",
            "num_train_images",
            "num_validation_images",
        )
        if getattr(args, key) is not None
    }
    if args.lr_scheduler is not None:
        overrides.update(lr_scheduler=args.lr_scheduler, multi_scale_lr_scheduler=None)
    return recipe.replace(**overrides)


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def _import_builder(name: str):
    import importlib

    module, cls = BUILDER_DATASETS[name]
    return getattr(importlib.import_module(module), cls)


def load_splits(args, recipe: CTALRecipe, tasks: list[str], image_size: list[int]):
    """(train, validation) `datasets.Dataset`s, a display name, and class names for figure legends (or None)."""
    name = args.dataset or recipe.dataset
    class_names = None
    if name == "synthetic":
        from dataset_scripts.synthetic import CONFIG_TASKS, SYNTHETIC_CLASSES

        config_name = args.dataset_config or ("nyuv2" if set(tasks) <= set(CONFIG_TASKS["nyuv2"]) else "pascal")
        builder = _import_builder(name)(
            config_name=config_name,
            cache_dir=args.cache_dir,
            image_size=tuple(image_size),
            num_train=recipe.num_train_images or 400,
            num_validation=recipe.num_validation_images or 100,
        )
        builder.download_and_prepare()
        splits = builder.as_dataset()
        display, class_names = f"synthetic ({config_name})", SYNTHETIC_CLASSES
    elif name in BUILDER_DATASETS:
        if not args.data_dir:
            raise ValueError(
                f"--dataset {name} is built from the public preprocessed files: pass --data_dir <folder> "
                "(README section 'Datasets'), or a published Parquet copy as --dataset <hub id or folder>."
            )
        data_dir = Path(args.data_dir).expanduser()
        if not data_dir.is_dir():
            raise FileNotFoundError(f"--data_dir {str(data_dir)!r} does not exist or is not a folder.")
        builder = _import_builder(name)(
            config_name=args.dataset_config, data_dir=str(data_dir), cache_dir=args.cache_dir
        )
        builder.download_and_prepare()
        splits = builder.as_dataset()
        display = name
        if name == "nyuv2":
            from dataset_scripts.nyuv2 import NYUV2_CLASSES as class_names
        elif name == "cityscapes":
            from dataset_scripts.cityscapes import CITYSCAPES_7_CLASSES, CITYSCAPES_19_CLASSES

            class_names = CITYSCAPES_7_CLASSES if args.dataset_config == "7class" else CITYSCAPES_19_CLASSES
    else:
        path = Path(name).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"--dataset {name!r} is a file; pass a folder holding Parquet files and README.md.")
        if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
            raise FileNotFoundError(f"--dataset {name!r}: no such folder (and not a Hub id of the form org/name).")
        splits = datasets.load_dataset(
            str(path) if path.exists() else name, args.dataset_config, cache_dir=args.cache_dir
        )
        display = name
    if "train" not in splits:
        raise ValueError(f"Dataset {display!r} has no 'train' split (it has {sorted(splits)}).")
    val_name = next((s for s in VALIDATION_SPLITS if s in splits), None)
    if val_name is None:
        raise ValueError(f"Dataset {display!r} has no validation split ({'/'.join(VALIDATION_SPLITS)}).")
    train, validation = splits["train"], splits[val_name]
    if len(train) == 0 or len(validation) == 0:
        raise ValueError(f"Dataset {display!r}: the train or {val_name} split is empty.")
    for split_name, split in (("train", train), (val_name, validation)):
        missing = [column for column in ("image", *tasks) if column not in split.column_names]
        if missing:
            raise ValueError(
                f"Dataset {display!r} ({split_name} split) has no column(s) {missing}, which the model's tasks "
                f"{tasks} need; its columns are {split.column_names}. Choose --tasks among the dataset's columns."
            )
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        validation = validation.select(range(min(args.max_eval_samples, len(validation))))
    return train, validation, display, class_names


class EpochShuffleSampler(Sampler[int]):
    """A random order that is a pure function of (seed, epoch), so that a resumed run sees the same batches; it also
    sets the dataset's epoch, which seeds the per-sample augmentations (`CTALTorchDataset`)."""

    def __init__(self, dataset: CTALTorchDataset, seed: int, shuffle: bool = True):
        self.dataset, self.seed, self.shuffle, self.epoch = dataset, int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(len(self.dataset)))
        state = np.random.SeedSequence([self.seed, self.epoch, 0x5EED]).generate_state(2, dtype=np.uint32)
        generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        return iter(torch.randperm(len(self.dataset), generator=generator).tolist())


def eval_shard(num_samples: int, batch_size: int, num_processes: int, process_index: int):
    """This process's evaluation batches: the global batches (contiguous, in order) dealt round-robin, plus padding
    batches (marked `None`) so every process runs the same number of forward passes (FSDP needs it). No sample is
    seen twice and each is computed in the same batch as in a one-process run, so the summed metric states equal
    the one-process states."""
    batches = [list(range(i, min(i + batch_size, num_samples))) for i in range(0, num_samples, batch_size)]
    steps = math.ceil(len(batches) / num_processes)
    mine = batches[process_index::num_processes]
    return mine + [None] * (steps - len(mine)), batches[0] if batches else []


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def backbone_weights_file(source: str) -> str | None:
    """`--pretrained_backbone` -> what `from_config_with_backbone_weights` takes (None = timm's Hub weights)."""
    if source == "timm":
        return None
    if os.path.isfile(source):
        return source
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise FileNotFoundError(f"--pretrained_backbone {source!r}: no such file (and not a Hub id org/name).")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(source, "model.safetensors")
    except EntryNotFoundError:
        return hf_hub_download(source, "pytorch_model.bin")


def build_config(args, recipe: CTALRecipe) -> CTALConfig:
    """The model's config: the saved one of --model_name_or_path, else the recipe's preset with the overrides."""
    if args.model_name_or_path:
        if args.config_overrides:
            raise ValueError("--config_overrides builds a new model; it cannot change --model_name_or_path's config.")
        config = CTALConfig.from_pretrained(args.model_name_or_path)
        if args.image_size and list(args.image_size) != list(config.image_size):
            raise ValueError(
                f"--image_size {args.image_size} differs from the model's image_size {config.image_size}: a CTAL "
                "model is tied to its input size."
            )
        return config
    fields = dict(recipe.model_overrides)
    fields["decoder"] = args.decoder
    for key in ("backbone", "num_semseg_classes", "num_parts_classes"):
        if getattr(args, key) is not None:
            fields[key] = getattr(args, key)
    if args.image_size is not None:
        fields["image_size"] = list(args.image_size)
    if (args.dataset or recipe.dataset) == "cityscapes" and args.dataset_config == "7class":
        fields.setdefault("num_semseg_classes", 7)
    if args.tasks is not None:
        fields["tasks"] = list(dict.fromkeys(args.tasks))
    weights = dict(PRESETS[recipe.preset].get("loss_weights", {}))
    tasks = fields.get("tasks", PRESETS[recipe.preset]["tasks"])
    fields["loss_weights"] = {task: weight for task, weight in weights.items() if task in tasks}
    fields.update(parse_config_overrides(args.config_overrides))
    return CTALConfig.from_preset(recipe.preset, **fields)


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


def build_model(args, config: CTALConfig) -> CTALForDenseMultitask:
    if args.model_name_or_path:
        return CTALForDenseMultitask.from_pretrained(args.model_name_or_path, config=config)
    if args.pretrained_backbone:
        return CTALForDenseMultitask.from_config_with_backbone_weights(
            config, backbone_weights_file(args.pretrained_backbone)
        )
    return CTALForDenseMultitask(config)


def make_scheduler(optimizer, name: str, recipe: CTALRecipe, max_train_steps: int, steps_per_epoch: int, epochs: int):
    """Stepped once per optimizer step. Warm restarts: T_0 = epochs // divisor epochs, then T_mult times longer."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_train_steps))
    if name == "cosine_warm_restarts":
        first = max(1, epochs // recipe.restart_epochs_divisor) * steps_per_epoch
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=first, T_mult=recipe.restart_mult)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a hidden temporary folder, then renamed, so `step_N` folders are always complete.
# ----------------------------------------------------------------------------------------------------------------
def list_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and path.is_dir() and (path / TRAINING_STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def save_checkpoint(accelerator: Accelerator, checkpoints_dir: Path, step: int, epoch: int, limit: int | None) -> Path:
    final = checkpoints_dir / f"step_{step}"
    temporary = checkpoints_dir / f".tmp-step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"completed_steps": step, "epoch": epoch, "num_processes": accelerator.num_processes}
        (temporary / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2))
        _fsync_tree(temporary)
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if limit is not None:
            for _, old in list_checkpoints(checkpoints_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info(f"Saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(value: str, checkpoints_dir: Path) -> Path | None:
    if value == "latest":
        found = list_checkpoints(checkpoints_dir)
        return found[-1][1] if found else None
    path = Path(value).expanduser()
    if not (path / TRAINING_STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {value!r} is not a complete checkpoint folder (no {TRAINING_STATE_FILE})."
        )
    return path


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------
def _finest(prediction):
    return prediction[0] if isinstance(prediction, (list, tuple)) else prediction


@torch.no_grad()
def evaluate(model, accelerator: Accelerator, dataset: CTALTorchDataset, config, batch_size: int, num_workers: int):
    """Final and initial predictions scored on the whole dataset; returns (final, initial, first batch for
    pictures). Every process scores its own batches; the metric states (sums) are then added across processes."""
    model.eval()
    final = MultiTaskEvaluator(config).to(accelerator.device)
    initial = MultiTaskEvaluator(config).to(accelerator.device)
    has_initial = False
    batches, filler = eval_shard(len(dataset), batch_size, accelerator.num_processes, accelerator.process_index)
    loader = DataLoader(
        dataset,
        batch_sampler=[indices if indices is not None else filler for indices in batches],
        collate_fn=dataset.collate,
        num_workers=num_workers,
    )
    first_batch = None
    progress = tqdm(loader, desc="evaluating", disable=not accelerator.is_local_main_process, leave=False)
    for indices, batch in zip(batches, progress, strict=True):
        pixel_values = batch["pixel_values"].to(accelerator.device)
        labels = {task: value.to(accelerator.device) for task, value in batch["labels"].items()}
        outputs = model(pixel_values=pixel_values)
        if indices is None:  # padding batch: run for the collectives of sharded models, score nothing
            continue
        predictions = {task: value.float() for task, value in outputs.predictions.items()}
        final.update(predictions, labels)
        initial_predictions = {
            task: _finest(value).float() for task, value in (outputs.initial_predictions or {}).items()
        }
        if initial_predictions:
            has_initial = True
            initial.update(initial_predictions, labels)
        if first_batch is None:
            first_batch = {"pixel_values": pixel_values.cpu(), "labels": batch["labels"], "predictions": predictions}

    def reduce(tensor):
        return accelerator.reduce(tensor, reduction="sum")

    final.all_reduce(reduce)
    initial.all_reduce(reduce)
    has_initial = bool(accelerator.reduce(torch.tensor(int(has_initial), device=accelerator.device), "sum").item())
    return final.compute(), (initial.compute() if has_initial else {}), first_batch


def save_prediction_pictures(first_batch, config, transform: CTALTransform, output_dir: Path, count: int, class_names):
    """One PNG per validation image: input | prediction per task, with a ground-truth row."""
    from ctal_hf.visualization import make_figure

    if first_batch is None or count <= 0:
        return []
    processor = CTALImageProcessor.from_model_config(config)
    count = min(count, first_batch["pixel_values"].shape[0])
    decoded = processor.post_process_multitask({t: p[:count].cpu() for t, p in first_batch["predictions"].items()})
    images = first_batch["pixel_values"][:count]
    if transform.normalize:
        images = images * transform.std + transform.mean
    images = images.clamp(0, 1)
    paths = []
    for index in range(count):
        truth = {}
        for task, value in first_batch["labels"].items():
            value = value[index]
            if task == "normals":
                value = value.permute(1, 2, 0)
            elif value.ndim == 3:
                value = value[0]
            truth[task] = value.numpy()
        path = output_dir / "predictions" / f"validation_{index}.png"
        make_figure(images[index], decoded[index], truth, class_names=class_names, path=path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------------------------
HUB_IGNORE = ["checkpoints/*", "checkpoints/**", "runs/*", "runs/**", ".*"]


def make_hub_api(token: str | None) -> HfApi:
    return HfApi(token=token)


def push_folder(api, repo_id: str, folder: Path, message: str, path_in_repo: str | None = None, ignore=None):
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        path_in_repo=path_in_repo,
        commit_message=message,
        ignore_patterns=ignore,
    )


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None, hub_api=None) -> dict:
    """Runs training (or evaluation); returns the evaluation results. `hub_api` replaces `HfApi` (tests)."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    recipe = resolve_recipe(args)
    output_dir = Path(args.output_dir or f"outputs/ctal-{recipe.name}")
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        step_scheduler_with_optimizer=False,  # the scheduler counts optimizer steps of this process
    )
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file is too chatty
    logger.info(accelerator.state, main_process_only=False)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    if args.recipe is None and args.dataset is not None and args.dataset not in RECIPES:
        logger.warning(f"No recipe is named after dataset {args.dataset!r}: using the 'synthetic' recipe (--recipe).")
    set_seed(args.seed)

    config = build_config(args, recipe)
    tasks = list(config.tasks)
    with accelerator.main_process_first():  # the main process builds the dataset cache, the others read it
        train_rows, eval_rows, dataset_name, class_names = load_splits(args, recipe, tasks, config.image_size)
    model = build_model(args, config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    train_transform = CTALTransform(
        config.image_size,
        train=True,
        flip=recipe.flip,
        scale_crop=recipe.scale_crop,
        fit=recipe.fit,
        normalize=recipe.normalize,
    )
    eval_transform = CTALTransform(config.image_size, train=False, fit=recipe.fit, normalize=recipe.normalize)
    train_dataset = CTALTorchDataset(train_rows, tasks, train_transform, seed=args.seed)
    eval_dataset = CTALTorchDataset(eval_rows, tasks, eval_transform, seed=args.seed)
    train_sampler = EpochShuffleSampler(train_dataset, seed=args.seed)
    train_dataloader = DataLoader(
        train_dataset,
        sampler=train_sampler,
        batch_size=recipe.per_device_train_batch_size,
        collate_fn=train_dataset.collate,
        num_workers=args.dataloader_num_workers,
    )
    num_parameters = sum(p.numel() for p in model.parameters())  # before FSDP shards them
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if recipe.max_train_steps is None:
        max_train_steps = recipe.num_train_epochs * steps_per_epoch
        num_epochs = recipe.num_train_epochs
    else:
        max_train_steps = recipe.max_train_steps
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    scheduler_name = recipe.scheduler_for(config.decoder)
    lr_scheduler = accelerator.prepare(
        make_scheduler(optimizer, scheduler_name, recipe, max_train_steps, steps_per_epoch, num_epochs)
    )
    checkpointing = args.checkpointing_steps
    if checkpointing is None:  # default: about four checkpoints per run
        checkpointing = str(max(1, math.ceil(max_train_steps / 4)))
    checkpoints_dir = output_dir / "checkpoints"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoints_dir.glob(".tmp-step_*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)

    settings = {
        "recipe": recipe.name,
        "dataset": dataset_name,
        "decoder": config.decoder,
        "backbone": config.backbone,
        "pretrained_backbone": args.pretrained_backbone or "none (random init)",
        "tasks": ",".join(tasks),
        "image_size": "x".join(map(str, config.image_size)),
        "loss_weights": ", ".join(f"{t}={w:g}" for t, w in config.loss_weights.items()),
        "optimizer": "Adam",
        "learning_rate": recipe.learning_rate,
        "weight_decay": recipe.weight_decay,
        "lr_scheduler": scheduler_name,
        "epochs": num_epochs,
        "max_train_steps": max_train_steps,
        "total_batch_size": recipe.per_device_train_batch_size
        * accelerator.num_processes
        * args.gradient_accumulation_steps,
        "augmentation": "+".join(n for n, on in (("flip", recipe.flip), ("scale_crop", recipe.scale_crop)) if on)
        or "none",
        "normalize": "ImageNet mean/std" if recipe.normalize else "[0, 1]",
        "mixed_precision": accelerator.mixed_precision,
        "seed": args.seed,
    }
    if args.report_to != "none":
        accelerator.init_trackers("ctal", config={k: v for k, v in settings.items() if v is not None})

    api = None
    if args.push_to_hub and accelerator.is_main_process:
        api = hub_api if hub_api is not None else make_hub_api(args.hub_token)
        api.create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo)

    # ------------------------------------------------------------------------------------------------ training
    completed_steps = 0
    if not args.eval_only:
        starting_epoch, skip_batches = 0, 0
        if args.resume_from_checkpoint:
            checkpoint = find_checkpoint(args.resume_from_checkpoint, checkpoints_dir)
            if checkpoint is None:
                logger.warning(f"No checkpoint in {checkpoints_dir}: starting from scratch.")
            else:
                state = json.loads((checkpoint / TRAINING_STATE_FILE).read_text())
                if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
                    logger.warning(
                        f"{checkpoint} was written by {state['num_processes']} processes, this run has "
                        f"{accelerator.num_processes}: the data order after resuming differs from the original run's."
                    )
                accelerator.load_state(str(checkpoint))
                completed_steps = int(state["completed_steps"])
                starting_epoch = completed_steps // steps_per_epoch
                skip_batches = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
                logger.info(f"Resumed from {checkpoint} at step {completed_steps} (epoch {starting_epoch}).")

        logger.info(
            f"Training {DECODER_NAMES.get(config.decoder, config.decoder)} ({num_parameters / 1e6:.2f} M parameters) "
            f"on {dataset_name}: {len(train_dataset)} images, {num_epochs} epochs, {max_train_steps} steps of "
            f"{settings['total_batch_size']} images, lr {recipe.learning_rate:g} ({scheduler_name})."
        )
        progress = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
        running = {}
        for epoch in range(starting_epoch, num_epochs):
            if completed_steps >= max_train_steps:
                break
            model.train()
            train_dataloader.set_epoch(epoch)
            train_sampler.set_epoch(epoch)
            loader = train_dataloader
            if epoch == starting_epoch and skip_batches:
                loader = accelerator.skip_first_batches(train_dataloader, skip_batches)
            for batch in loader:
                with accelerator.accumulate(model):
                    outputs = model(**batch)
                    accelerator.backward(outputs.loss)
                    optimizer.step()
                    optimizer.zero_grad()
                for name, value in {"loss": outputs.loss, **outputs.task_losses}.items():
                    running[name] = running.get(name, 0.0) + value.detach().float()
                running["batches"] = running.get("batches", 0) + 1
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                completed_steps += 1
                progress.update(1)
                if completed_steps % args.logging_steps == 0 or completed_steps == max_train_steps:
                    count = running.pop("batches")
                    logs = {
                        f"train/{k}": accelerator.reduce(v / count, "mean").item() for k, v in sorted(running.items())
                    }
                    logs["train/lr"] = lr_scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                    accelerator.log(logs, step=completed_steps)
                    running = {}
                if checkpointing != "epoch" and completed_steps % int(checkpointing) == 0:
                    path = save_checkpoint(
                        accelerator, checkpoints_dir, completed_steps, epoch, args.checkpoints_total_limit
                    )
                    if api is not None and args.push_checkpoints:
                        push_folder(
                            api, args.hub_model_id, path, f"Checkpoint {path.name}", f"checkpoints/{path.name}"
                        )
                if args.kill_after_step is not None and completed_steps == args.kill_after_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if completed_steps >= max_train_steps:
                    break
            if checkpointing == "epoch":
                path = save_checkpoint(
                    accelerator, checkpoints_dir, completed_steps, epoch, args.checkpoints_total_limit
                )
                if api is not None and args.push_checkpoints:
                    push_folder(api, args.hub_model_id, path, f"Checkpoint {path.name}", f"checkpoints/{path.name}")
        progress.close()

    # ---------------------------------------------------------------------------------------------- evaluation
    final, initial, first_batch = evaluate(
        model,
        accelerator,
        eval_dataset,
        config,
        recipe.per_device_eval_batch_size,
        args.dataloader_num_workers,
    )
    table = metrics_table(final, initial)
    accelerator.print(f"\nValidation metrics ({dataset_name}, {len(eval_dataset)} images):\n{table}\n")
    results = {
        "final": final,
        "initial": initial,
        "headline": {task: final[task][TASKS[task].headline_metric] for task in tasks},
        "dataset": dataset_name,
        "num_validation_images": len(eval_dataset),
        "decoder": config.decoder,
        "tasks": tasks,
        "num_parameters": num_parameters,
        "completed_steps": completed_steps,
        "settings": settings,
    }
    if args.report_to != "none":
        accelerator.log(
            {f"eval/{task}/{metric}": value for task, values in final.items() for metric, value in values.items()},
            step=completed_steps,
        )

    # ---------------------------------------------------------------------------------------------- saving
    accelerator.wait_for_everyone()
    if not args.eval_only:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(
            output_dir,
            is_main_process=accelerator.is_main_process,
            save_function=accelerator.save,
            state_dict=accelerator.get_state_dict(model),
        )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        if not args.eval_only:
            processor = CTALImageProcessor.from_model_config(
                config,
                do_normalize=recipe.normalize,
                image_mean=list(IMAGENET_DEFAULT_MEAN),
                image_std=list(IMAGENET_DEFAULT_STD),
            )
            processor.save_pretrained(output_dir)
            pictures = save_prediction_pictures(
                first_batch, config, eval_transform, output_dir, args.num_prediction_images, class_names
            )
            command = "accelerate launch examples/train.py " + shlex.join(sys.argv[1:]) if argv is None else None
            card = make_model_card(
                config,
                final,
                initial,
                dataset_name,
                settings,
                model_name=args.hub_model_id or output_dir.name,
                num_parameters=num_parameters,
                completed_steps=completed_steps,
                command=command,
            )
            card.save(output_dir / "README.md")
            logger.info(f"Saved the model, image processor, card and {len(pictures)} pictures to {output_dir}")
            if api is not None:
                push_folder(api, args.hub_model_id, output_dir, "Upload the trained model", ignore=HUB_IGNORE)
                logger.info(f"Pushed {output_dir} to {args.hub_model_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
    # Leave the process group cleanly: with torch's gloo backend an abrupt exit sometimes aborts after finishing.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
