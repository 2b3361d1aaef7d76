"""The command line of `examples/train.py`: the parser and every check that needs no model, dataset or torch.

This module imports only the standard library and the (pure Python) recipes, so `train.py --help` and a mistake in
a flag answer at once, before torch, transformers or a dataset is loaded and before anything is written. Names that
live in the model registries (decoders, backbones) are checked right after, by `check_registry_names`."""

import argparse
import json
import os
from pathlib import Path

from ..registry import BACKBONE_INFO, DECODER_INFO, GRADIENT_AGGREGATORS, LOSS_WEIGHTINGS
from .recipes import FUSION_LR_SCALES, RECIPES, SCHEDULER_INTERVALS, SCHEDULERS


def column_mapping(text: str) -> dict[str, str]:
    """argparse type: a JSON object mapping a dataset's column names to ours, e.g. '{"segmentation": "semseg"}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f'not JSON ({error}); e.g. \'{{"segmentation": "semseg"}}\'') from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise argparse.ArgumentTypeError(f"must be a JSON object of column names to column names, got {text!r}")
    return value


def _int_at_least(text: str, minimum: int, what: str, below: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {below}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag in its error)."""
    return _int_at_least(text, 1, "a positive integer", "a positive integer (>= 1)")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0", "an integer >= 0")


def seed_value(text: str) -> int:
    """argparse type: a seed numpy and torch both take, 0 <= seed < 2**32."""
    value = non_negative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32 (numpy's seed range), got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate)."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (a weight decay)."""
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value:g}")
    return value


DEFAULT_DECODER = "ctal_ss"
# Flags that describe the model's architecture: with --model_name_or_path the saved config decides them, so a
# different value is refused rather than ignored (config field -> flag).
ARCHITECTURE_FLAGS: dict[str, str] = {
    "decoder": "--decoder",
    "backbone": "--backbone",
    "tasks": "--tasks",
    "num_semseg_classes": "--num_semseg_classes",
    "num_parts_classes": "--num_parts_classes",
    "image_size": "--image_size",
}


def build_parser() -> argparse.ArgumentParser:
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
    data.add_argument(
        "--column_mapping",
        type=column_mapping,
        default=None,
        help='A Hub / Parquet dataset\'s columns onto ours, as JSON: \'{"segmentation": "semseg", "normal": '
        '"normals"}\' (known Hub copies such as tanganke/nyuv2 need none; docs/hub-ecosystem.md).',
    )
    data.add_argument("--cache_dir", default=None, help="datasets cache folder (default: HF_DATASETS_CACHE).")
    data.add_argument("--num_train_images", type=positive_int, default=None, help="Synthetic: scenes.")
    data.add_argument(
        "--num_validation_images",
        type=positive_int,
        default=None,
        help="Synthetic: validation scenes.",
    )
    data.add_argument(
        "--max_train_samples",
        type=positive_int,
        default=None,
        help="Use the first N training rows only.",
    )
    data.add_argument(
        "--max_eval_samples",
        type=positive_int,
        default=None,
        help="Evaluate on the first N validation rows.",
    )
    data.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=None, help="Start from a trained CTAL model (folder or Hub).")
    model.add_argument(
        "--decoder",
        default=None,
        help="ctal_ss (default), ctal_ms or a baseline (stl, mtl, padnet, papnet, ...). With --model_name_or_path: "
        "the model's.",
    )
    model.add_argument("--backbone", default=None, help="A registered backbone name. Default: the recipe's preset.")
    model.add_argument(
        "--backbone_config",
        default=None,
        help="The backbone's own config: a JSON file (read as a dict), or a Hub id / folder read with "
        "transformers.AutoConfig.from_pretrained. Passed to CTALConfig(backbone_config=...).",
    )
    model.add_argument(
        "--task_specs",
        default=None,
        help="A JSON file of task specifications (your own tasks), passed to CTALConfig(task_specs=...).",
    )
    model.add_argument(
        "--pretrained_backbone",
        default=None,
        help="ImageNet weights for the backbone: 'timm' (timm's own, from the Hub) or 'torchvision' (torchvision's "
        "download, for the swin_v2_* backbones), a local .safetensors / torch file of the full classification model, "
        "a Hub model id holding model.safetensors (e.g. timm/hrnet_w18_small_v2.ms_in1k), or 'none' (random "
        "weights). Default: the recipe's (the backbone library's own weights for the paper recipes, as the authors' "
        "release; none for synthetic).",
    )
    model.add_argument("--tasks", nargs="+", default=None, help="Default: the preset's (e.g. semseg depth normals).")
    model.add_argument("--image_size", nargs=2, type=positive_int, default=None, metavar=("HEIGHT", "WIDTH"))
    model.add_argument("--num_semseg_classes", type=positive_int, default=None)
    model.add_argument("--num_parts_classes", type=positive_int, default=None)
    model.add_argument(
        "--config_overrides",
        default=None,
        help='Further config fields as "key=value,key=value", e.g. "affinity_scale=6" (paper Table 5), '
        '"decoder_stride=16", "papnet_diffusion_steps=2", "attention_impl=dense" or "gamma=0.1". Not with '
        "--model_name_or_path.",
    )
    model.add_argument("--gradient_checkpointing", action="store_true")
    model.add_argument(
        "--sync_batchnorm",
        action="store_true",
        help="Several GPU processes: BatchNorm statistics over the global batch (torch SyncBatchNorm); the saved "
        "weights are unchanged. Refused on CPU (docs/hub-ecosystem.md).",
    )

    train = parser.add_argument_group("training (defaults: the recipe's)")
    train.add_argument(
        "--recipe", default=None, choices=sorted(RECIPES), help="Default: the dataset's, else synthetic."
    )
    train.add_argument(
        "--learning_rate",
        type=positive_float,
        default=None,
        help="On resume, a value other than the checkpoint's is applied from the resumed step (logged and recorded).",
    )
    train.add_argument("--weight_decay", type=non_negative_float, default=None, help="As --learning_rate on resume.")
    train.add_argument("--num_train_epochs", type=positive_int, default=None)
    train.add_argument(
        "--max_train_steps",
        type=positive_int,
        default=None,
        help="Optimizer steps; overrides epochs. May change on resume: the schedule follows the new total.",
    )
    train.add_argument("--lr_scheduler", default=None, choices=SCHEDULERS)
    train.add_argument(
        "--lr_scheduler_interval",
        default=None,
        choices=SCHEDULER_INTERVALS,
        help="epoch: the learning rate changes once per epoch (the paper recipes, as the release); step: every "
        "optimizer step.",
    )
    train.add_argument(
        "--fusion_lr_scale",
        default=None,
        choices=FUSION_LR_SCALES,
        help="num_pixels: CTAL's fusion conv trains with the learning rate / N (its affinity pixels); "
        "docs/efficacy.md.",
    )
    train.add_argument("--per_device_train_batch_size", type=positive_int, default=None)
    train.add_argument("--per_device_eval_batch_size", type=positive_int, default=None)
    train.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    train.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Autocast (accelerate's): convolutions and the CTAL diffusion's matmuls in bf16 / fp16, float32 "
        "accumulation and losses; refused on hardware without native support.",
    )
    train.add_argument(
        "--channels_last",
        action="store_true",
        help="Weights and activations channels-last (faster convolutions on most CPUs and GPUs; same results).",
    )
    train.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the model (inductor, through accelerate): the first steps compile, for minutes on a CPU.",
    )
    train.add_argument("--scale_crop", action=argparse.BooleanOptionalAction, default=None, help="MTAN scale-crop.")
    train.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="Random horizontal flip.")
    train.add_argument(
        "--photometric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Random brightness / contrast / saturation / hue (the PASCAL-Context recipe's).",
    )
    train.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ImageNet mean/std input normalisation (off in the HRNet paper recipes: [0, 1] inputs, as the release).",
    )
    train.add_argument(
        "--drop_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Drop the last incomplete training batch of each epoch (on in the paper recipes).",
    )
    train.add_argument(
        "--loss_weighting",
        default="fixed",
        choices=LOSS_WEIGHTINGS,
        help="fixed: the preset's loss weights (the paper); uncertainty: learned log-variances (Kendall et al.); "
        "dwa: Dynamic Weight Average (MTAN); famo: Fast Adaptive Multitask Optimisation.",
    )
    train.add_argument(
        "--gradient_aggregator",
        default="none",
        choices=GRADIENT_AGGREGATORS,
        help="Combine the per-task gradients of the shared parameters with a TorchJD aggregator (pip install "
        "torchjd; cagrad and nashmtl also need 'torchjd[cagrad]' / 'torchjd[nash-mtl]'). One process only.",
    )
    train.add_argument("--seed", type=seed_value, default=0)
    train.add_argument("--eval_only", action="store_true", help="Evaluate --model_name_or_path; no training.")
    train.add_argument(
        "--eval_every_epoch",
        action="store_true",
        help="Evaluate the final and initial predictions (metrics and per-task losses) after every epoch.",
    )

    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", default=None, help="Default: outputs/ctal-<recipe>.")
    out.add_argument(
        "--checkpointing_steps", default=None, help="Save the training state every N optimizer steps, or 'epoch'."
    )
    out.add_argument(
        "--checkpoints_total_limit",
        type=positive_int,
        default=2,
        help="Checkpoints kept (oldest removed).",
    )
    out.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (the newest complete checkpoint that loads; none yet: start from scratch) or a checkpoint "
        "folder.",
    )
    out.add_argument("--report_to", default="none", help="Tracker(s): tensorboard, wandb, all, or none.")
    out.add_argument("--logging_steps", type=positive_int, default=10)
    out.add_argument(
        "--num_prediction_images", type=non_negative_int, default=4, help="Validation images drawn after training."
    )
    out.add_argument(
        "--ignore_lock",
        action="store_true",
        help="Write --output_dir even while another run's lock file (.<name>.ctal-lock beside it) holds it.",
    )
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id", default=None, help="org/name of the model repo.")
    out.add_argument("--hub_token", default=None)
    out.add_argument("--hub_private_repo", action="store_true")
    out.add_argument("--push_checkpoints", action="store_true", help="Also upload each checkpoint when saved.")
    return parser


def _can_write(folder: Path) -> bool:
    """Whether a file can be created in `folder` (tried, not guessed from permission bits: root, read-only mounts)."""
    import tempfile

    try:
        descriptor, name = tempfile.mkstemp(prefix=".ctal-write-test-", dir=folder)
    except OSError:
        return False
    os.close(descriptor)
    os.unlink(name)
    return True


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Checks that need no import beyond the standard library; errors go through `parser.error` (exit 2)."""
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}"
            )
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id org/name")
    if args.eval_only and not args.model_name_or_path:
        parser.error("--eval_only evaluates a trained model: pass --model_name_or_path")
    if args.config_overrides and args.model_name_or_path:
        parser.error("--config_overrides builds a new model; it cannot change --model_name_or_path's config.")
    for flag in ("backbone_config", "task_specs"):
        value = getattr(args, flag)
        if value is not None and args.model_name_or_path:
            parser.error(f"--{flag} builds a new model; --model_name_or_path already has its config.")
    if args.task_specs is not None:
        path = Path(args.task_specs).expanduser()
        if not path.is_file():
            parser.error(f"--task_specs {args.task_specs!r}: no such JSON file.")
    if args.backbone_config is not None and args.backbone_config.endswith(".json"):
        if not Path(args.backbone_config).expanduser().is_file():
            parser.error(f"--backbone_config {args.backbone_config!r}: no such JSON file.")
    if args.output_dir is not None and Path(args.output_dir).expanduser().is_file():
        parser.error(f"--output_dir {args.output_dir!r} is a file; pass a folder (it is created if missing).")
    if args.output_dir is not None:
        base = Path(args.output_dir).expanduser().absolute()
        while not base.exists():
            base = base.parent
        if not base.is_dir():
            parser.error(f"--output_dir {args.output_dir!r}: {str(base)!r} is a file, so the folder cannot be made.")
        if not _can_write(base):
            parser.error(f"--output_dir {args.output_dir!r}: {str(base)!r} is not writable; choose another folder.")
    if args.output_dir is not None and args.model_name_or_path and not args.eval_only:
        from ..atomic_outputs import check_not_source

        try:  # the trained model would replace the one it starts from
            check_not_source(args.output_dir, {"--model_name_or_path": args.model_name_or_path}, "--output_dir")
        except ValueError as error:
            parser.error(str(error))
    if args.decoder is None and not args.model_name_or_path:
        args.decoder = DEFAULT_DECODER
    return args


def check_registry_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Decoder and backbone names, checked against the registry (`ctal_hf.registry`, torch-free)."""
    if args.decoder is not None and args.decoder not in DECODER_INFO:
        parser.error(f"argument --decoder: invalid choice: {args.decoder!r} (choose from {', '.join(DECODER_INFO)})")
    if args.backbone is not None and args.backbone not in BACKBONE_INFO:
        parser.error(
            f"argument --backbone: invalid choice: {args.backbone!r} (choose from {', '.join(sorted(BACKBONE_INFO))})"
        )
    return args


def parse_args(argv=None, check_names: bool = True) -> argparse.Namespace:
    """Parses and checks the command line; `--help` and flag mistakes answer before any heavy import."""
    parser = build_parser()
    args = check_args(parser, parser.parse_args(argv))
    return check_registry_names(parser, args) if check_names else args


def read_json_file(flag: str, path: str) -> dict:
    """A JSON object from `path`, with an error naming the flag and the file."""
    try:
        value = json.loads(Path(path).expanduser().read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--{flag} {path!r} is not a readable JSON file: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"--{flag} {path!r} must hold a JSON object (a dict), got {type(value).__name__}.")
    return value


__all__ = [
    "ARCHITECTURE_FLAGS",
    "DEFAULT_DECODER",
    "LOSS_WEIGHTINGS",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "seed_value",
    "GRADIENT_AGGREGATORS",
    "build_parser",
    "check_args",
    "check_registry_names",
    "parse_args",
    "read_json_file",
]
