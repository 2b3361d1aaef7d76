# Trains a CTAL model (or one of the paper's baselines) for multitask dense prediction with 🤗 Accelerate.
#
# With no arguments it trains CTAL-SS on the offline synthetic dataset on a CPU in a few minutes:
#
#   accelerate launch examples/train.py
#
# The same script runs on one or many GPUs, with FSDP, or as DDP on CPU, unchanged (docs/training.md):
#
#   accelerate launch --multi_gpu --num_processes 8 examples/train.py --dataset nyuv2 --data_dir nyuv2 --recipe nyuv2
#   ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/train.py
#
# It reads top to bottom in named steps that `main` composes: `set_up` (recipe, config, data, model, loss weighting,
# optimizer and schedule; one `accelerator.prepare`), resume (`ctal_hf.training.checkpointing.resume_training`,
# `accelerator.load_state`), `train_one_epoch` (gradient accumulation, loss balancing with `--loss_weighting` or
# TorchJD gradient aggregation with `--gradient_aggregator`, atomic `accelerator.save_state` checkpoints),
# `evaluate` (the whole validation split over exact shards) and `save` (`save_pretrained` of the model and its image
# processor, prediction pictures, a model card, `--push_to_hub`).

# ruff: noqa: E402  (the heavy imports come after the argument parse, so that --help answers before torch loads)
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ctal_hf.training.arguments import parse_args

if __name__ == "__main__":
    parse_args(check_names=False)  # --help and flag mistakes answer here, before torch is imported

import argparse
import contextlib
import functools
import json
import logging
import shlex
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ctal_hf import CTALImageProcessor
from ctal_hf.ctal_attention import resolve_autocast_dtype
from ctal_hf.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, CTALTorchDataset, CTALTransform
from ctal_hf.registry import decoder_display_name
from ctal_hf.training import building, checkpointing, evaluation, hub, run_output
from ctal_hf.training.aggregation import GradientAggregation, check_aggregation_setting
from ctal_hf.training.data_loading import EpochShuffleSampler, load_splits
from ctal_hf.training.loss_weighting import build_loss_weighting
from ctal_hf.training.model_card import make_model_card, metrics_table
from ctal_hf.training.sync_batchnorm import check_sync_batchnorm, convert_sync_batchnorm

logger = get_logger("train")


@dataclass
class TrainingRun:
    """What `set_up` builds (the prepared model, optimizer, data and schedule) and the steps below update."""

    args: argparse.Namespace
    recipe: object
    config: object
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    train_dataloader: DataLoader
    train_sampler: EpochShuffleSampler
    eval_dataset: CTALTorchDataset
    eval_transform: CTALTransform
    weighting: torch.nn.Module
    aggregation: GradientAggregation | None
    dataset_name: str
    class_names: object
    output_dir: Path
    num_train_images: int
    num_parameters: int
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    settings: dict
    identity: dict  # what a checkpoint must share with this run to resume it (checkpointing.RUN_IDENTITY_FIELDS)
    hub_api: object = None
    completed_steps: int = 0
    running: dict = field(default_factory=dict)  # training losses summed since the last log
    history: list = field(default_factory=list)  # the per-epoch evaluations (--eval_every_epoch) of this process run
    progress: object = None

    @property
    def checkpoints_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def checkpointing_every(self) -> str:  # default: about 4 checkpoints a run
        return self.args.checkpointing_steps or str(max(1, -(-self.max_train_steps // 4)))


# ------------------------------------------------------------------------------------------------ set up
def make_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dynamo_backend="inductor" if args.torch_compile else None,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        step_scheduler_with_optimizer=False,  # the scheduler counts optimizer steps of this process
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("train").setLevel(logging.INFO)
    logging.getLogger("ctal_hf").setLevel(logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    resolve_autocast_dtype(args.mixed_precision, accelerator.device.type)  # bf16 / fp16 the hardware lacks: refused
    check_sync_batchnorm(args.sync_batchnorm, accelerator.device, accelerator.num_processes)  # CPU: refused
    verbosity = logging.WARNING if accelerator.is_local_main_process else logging.ERROR
    datasets.utils.logging.set_verbosity(verbosity)
    transformers.utils.logging.set_verbosity(verbosity)
    return accelerator


def set_up(args: argparse.Namespace) -> TrainingRun:
    """Recipe, config, datasets, model, loss weighting, optimizer and learning-rate schedule, prepared once."""
    recipe = building.resolve_recipe(args)
    output_dir = run_output.output_dir_of(args, recipe.name)
    accelerator = make_accelerator(args, output_dir)
    if args.recipe is None and args.dataset not in (None, "synthetic") and recipe.name == "synthetic":
        logger.warning(f"No recipe is named after dataset {args.dataset!r}: using the 'synthetic' recipe (--recipe).")
    set_seed(args.seed)

    config = building.build_config(args, recipe)
    with accelerator.main_process_first():  # the main process builds the dataset cache, the others read it
        train_rows, eval_rows, dataset_name, class_names = load_splits(
            args, recipe, list(config.tasks), config.image_size
        )
    model = building.build_model(args, config, recipe)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if args.channels_last:  # the model then converts its inputs too
        model.to(memory_format=torch.channels_last)
    building.check_distributed_setting(accelerator)
    check_aggregation_setting(args.gradient_aggregator, model, accelerator, args.mixed_precision)

    train_transform = CTALTransform(
        config.image_size, train=True, flip=recipe.flip, scale_crop=recipe.scale_crop, fit=recipe.fit,
        normalize=recipe.normalize, rescale_range=recipe.rescale_range, crop=recipe.crop,
        cat_max_ratio=recipe.cat_max_ratio, photometric=recipe.photometric,
    )  # fmt: skip
    eval_transform = CTALTransform(config.image_size, train=False, fit=recipe.fit, normalize=recipe.normalize)
    # The config, not the task names: custom tasks (`--task_specs`) read their columns as their kinds say.
    train_dataset = CTALTorchDataset(train_rows, config, train_transform, seed=args.seed)
    eval_dataset = CTALTorchDataset(eval_rows, config, eval_transform, seed=args.seed)
    train_sampler = EpochShuffleSampler(train_dataset, seed=args.seed)
    train_dataloader = DataLoader(
        train_dataset, sampler=train_sampler, batch_size=recipe.per_device_train_batch_size,
        collate_fn=train_dataset.collate, num_workers=args.dataloader_num_workers, drop_last=recipe.drop_last,
    )  # fmt: skip

    num_parameters = sum(p.numel() for p in model.parameters())  # before FSDP shards them
    weighting = build_loss_weighting(args.loss_weighting, config).to(accelerator.device)
    param_groups = building.optimizer_param_groups(model, recipe)  # recipe.fusion_lr_scale
    if weighting.trainable_parameters():  # learned loss weights: trained by the same optimizer, no weight decay
        param_groups.append({"params": weighting.trainable_parameters(), "weight_decay": 0.0})
    optimizer = torch.optim.Adam(param_groups, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    model = convert_sync_batchnorm(model) if args.sync_batchnorm else model  # same weights, global statistics
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    if len(train_dataloader) == 0:
        raise ValueError(
            f"{len(train_dataset)} training images make no complete batch of {recipe.per_device_train_batch_size} per "
            f"process ({accelerator.num_processes} processes) with drop_last: lower --per_device_train_batch_size or "
            "pass --no-drop_last."
        )
    accelerator.register_for_checkpointing(weighting)
    aggregation = None
    if args.gradient_aggregator != "none":
        aggregation = GradientAggregation(
            args.gradient_aggregator, accelerator.unwrap_model(model), list(config.tasks)
        )

    steps_per_epoch, max_train_steps, num_epochs = building.schedule_length(
        len(train_dataloader), args.gradient_accumulation_steps, recipe
    )
    scheduler_name = recipe.scheduler_for(config.decoder)
    lr_scheduler = accelerator.prepare(
        building.make_scheduler(optimizer, scheduler_name, recipe, max_train_steps, steps_per_epoch, num_epochs)
    )
    settings = {
        "recipe": recipe.name, "dataset": dataset_name, "decoder": config.decoder,
        "backbone": config.backbone_description,
        "pretrained_backbone": building.pretrained_backbone_source(args, recipe) or "none (random init)",
        "tasks": ",".join(config.tasks),
        "image_size": "x".join(map(str, config.image_size)),
        "loss_weights": ", ".join(f"{t}={w:g}" for t, w in config.loss_weights.items()),
        "loss_weighting": args.loss_weighting, "gradient_aggregator": args.gradient_aggregator,
        "optimizer": "Adam", "learning_rate": recipe.learning_rate, "weight_decay": recipe.weight_decay,
        "fusion_lr_scale": recipe.fusion_lr_scale,
        "lr_scheduler": f"{scheduler_name} (per {recipe.lr_scheduler_interval})", "epochs": num_epochs,
        "max_train_steps": max_train_steps, "drop_last": recipe.drop_last,
        "total_batch_size": recipe.per_device_train_batch_size * accelerator.num_processes
        * args.gradient_accumulation_steps,
        "augmentation": recipe.augmentation_name(),
        "normalize": "ImageNet mean/std" if recipe.normalize else "[0, 1]",
        "mixed_precision": accelerator.mixed_precision, "seed": args.seed,
    }  # fmt: skip
    identity = {"decoder": config.decoder, "loss_weighting": args.loss_weighting}
    identity.update(gradient_aggregator=args.gradient_aggregator, max_train_steps=max_train_steps)
    identity.update(building.resume_record(args, recipe, config, dataset_name))  # compared on resume
    return TrainingRun(
        args=args, recipe=recipe, config=config, accelerator=accelerator, model=model, optimizer=optimizer,
        lr_scheduler=lr_scheduler, train_dataloader=train_dataloader, train_sampler=train_sampler,
        eval_dataset=eval_dataset, eval_transform=eval_transform, weighting=weighting, aggregation=aggregation,
        dataset_name=dataset_name, class_names=class_names, output_dir=output_dir,
        num_train_images=len(train_dataset), num_parameters=num_parameters, steps_per_epoch=steps_per_epoch,
        max_train_steps=max_train_steps, num_epochs=num_epochs, settings=settings, identity=identity,
    )  # fmt: skip


def open_outputs(run: TrainingRun) -> None:
    """The output folder (without what a run killed while saving left), the trackers and the Hub repo."""
    args, accelerator = run.args, run.accelerator
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_temporaries(run.checkpoints_dir)
    if args.report_to != "none":
        accelerator.init_trackers("ctal", config={k: v for k, v in run.settings.items() if v is not None})
    if args.push_to_hub and accelerator.is_main_process:
        run.hub_api = hub.make_hub_api(args.hub_token)
        run.hub_api.create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo)


# ------------------------------------------------------------------------------------------------ training
def reduce_mean(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(tensor, "mean") if accelerator.num_processes > 1 else tensor


def training_step(run: TrainingRun, batch: dict):
    """Forward, loss balancing, backward (or TorchJD aggregation) and the optimizer step; returns the outputs and
    the balanced loss. Call it inside `accelerator.accumulate(model)`."""
    accelerator, model, weighting, aggregation = run.accelerator, run.model, run.weighting, run.aggregation
    mean = functools.partial(reduce_mean, accelerator)
    # TorchJD back-propagates with autograd.grad, which DDP's reducer does not see: no_sync, then averaged by hand.
    with accelerator.no_sync(model) if aggregation is not None else contextlib.nullcontext():
        outputs = model(**batch)
        terms = weighting(outputs.task_losses, terms=2 if outputs.initial_predictions else 1)
        loss = torch.stack(list(terms.values())).sum()
        if aggregation is None:
            accelerator.backward(loss)
        else:
            scale = 1.0 / run.args.gradient_accumulation_steps
            aggregation.backward(
                {t: v * scale for t, v in terms.items()}, weighting.trainable_parameters(),
                mean if accelerator.num_processes > 1 else None,
            )  # fmt: skip
        if accelerator.num_processes > 1 and aggregation is None and accelerator.sync_gradients:
            for param in weighting.trainable_parameters():  # not in the DDP model: average by hand
                param.grad = mean(param.grad)
        run.optimizer.step()
        if weighting.needs_loss_after_step and accelerator.sync_gradients:
            with torch.no_grad():
                after = model(**batch).task_losses
            weighting.after_step(mean, after)
        elif accelerator.sync_gradients:
            weighting.after_step(mean)
        run.optimizer.zero_grad()
    return outputs, loss


def save_checkpoint(run: TrainingRun, epoch: int) -> None:
    """`accelerator.save_state` as checkpoints/step_N (atomic, rotated); uploaded with --push_checkpoints."""
    args = run.args
    path = checkpointing.save_checkpoint(
        run.accelerator, run.checkpoints_dir, run.completed_steps, epoch, args.checkpoints_total_limit, run.identity
    )
    if run.hub_api is not None and args.push_checkpoints:
        hub.push_folder(run.hub_api, args.hub_model_id, path, f"Checkpoint {path.name}", f"checkpoints/{path.name}")


def after_optimizer_step(run: TrainingRun, epoch: int) -> None:
    """The schedule, the progress bar, the training logs (every --logging_steps) and step checkpoints."""
    run.lr_scheduler.step()
    run.completed_steps += 1
    run.progress.update(1)
    if run.completed_steps % run.args.logging_steps == 0 or run.completed_steps == run.max_train_steps:
        count = run.running.pop("batches")
        logs = {f"train/{k}": reduce_mean(run.accelerator, v / count).item() for k, v in sorted(run.running.items())}
        logs["train/lr"] = run.lr_scheduler.get_last_lr()[0]
        logs.update({f"train/weight/{t}": w for t, w in run.weighting.current_weights().items()})
        run.progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
        run.accelerator.log(logs, step=run.completed_steps)
        run.running = {}
    if run.checkpointing_every != "epoch" and run.completed_steps % int(run.checkpointing_every) == 0:
        save_checkpoint(run, epoch)


def train_one_epoch(run: TrainingRun, epoch: int, skip_batches: int = 0) -> None:
    """One pass over the training data (less the first `skip_batches` after a resume), up to --max_train_steps."""
    accelerator = run.accelerator
    run.model.train()
    run.train_dataloader.set_epoch(epoch)
    run.train_sampler.set_epoch(epoch)
    loader = run.train_dataloader
    if skip_batches:
        loader = accelerator.skip_first_batches(run.train_dataloader, skip_batches)
    for batch in loader:
        with accelerator.accumulate(run.model):
            outputs, loss = training_step(run, batch)
        for name, value in {"loss": loss, **outputs.task_losses}.items():
            run.running[name] = run.running.get(name, 0.0) + value.detach().float()
        run.running["batches"] = run.running.get("batches", 0) + 1
        if not accelerator.sync_gradients:
            continue
        after_optimizer_step(run, epoch)
        if run.completed_steps >= run.max_train_steps:
            break
    run.weighting.end_epoch()
    if run.checkpointing_every == "epoch":
        save_checkpoint(run, epoch)


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate(run: TrainingRun, desc: str = "evaluating") -> evaluation.Evaluation:
    """Metrics and per-task losses of the final and initial predictions on the whole validation split."""
    criterion = run.accelerator.unwrap_model(run.model).criterion
    return evaluation.evaluate(
        run.model, run.accelerator, run.eval_dataset, run.config, run.recipe.per_device_eval_batch_size,
        run.args.dataloader_num_workers, criterion=criterion, desc=desc,
    )  # fmt: skip


def evaluate_epoch(run: TrainingRun, epoch: int) -> None:
    """--eval_every_epoch: the validation metrics and losses, logged and kept in the results' history."""
    result = evaluate(run, desc=f"evaluating epoch {epoch}")
    run.accelerator.log(result.log_dict("val"), step=run.completed_steps)
    run.history.append(
        {
            "epoch": epoch, "step": run.completed_steps, "losses": result.losses, "final": result.final,
            "initial": result.initial,
        }
    )  # fmt: skip
    losses = ", ".join(
        f"{t} {result.losses['final'][t]:.4f}"
        + (f" (initial {result.losses['initial'][t]:.4f})" if "initial" in result.losses else "")
        for t in run.config.tasks
    )
    logger.info(f"Epoch {epoch} (step {run.completed_steps}): validation losses {losses}")


def collect_results(run: TrainingRun, result: evaluation.Evaluation) -> dict:
    """What eval_results.json holds and `main` returns."""
    config, tasks = run.config, run.config.get_tasks()
    return {
        "final": result.final, "initial": result.initial, "losses": result.losses,
        "headline": {task: result.final[task][spec.metric] for task, spec in tasks.items()},
        "headline_metrics": {task: spec.metric for task, spec in tasks.items()},
        "lower_is_better": [task for task, spec in tasks.items() if spec.lower_is_better],
        "dataset": run.dataset_name, "num_validation_images": len(run.eval_dataset), "decoder": config.decoder,
        "tasks": list(config.tasks), "num_parameters": run.num_parameters, "completed_steps": run.completed_steps,
        "loss_weights_final": run.weighting.current_weights(), "history": run.history, "settings": run.settings,
        "refinement": evaluation.refinement(result.final, result.initial, tasks),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ saving
def save(run: TrainingRun, result: evaluation.Evaluation, results: dict, command: str | None) -> None:
    """eval_results.json; after training also the model (`save_pretrained`), its image processor, prediction
    pictures and model card, pushed with --push_to_hub."""
    args, accelerator, config = run.args, run.accelerator, run.config
    accelerator.wait_for_everyone()
    staged = run_output.final_staging_dir(run.output_dir, accelerator)  # renamed into output_dir at the end
    if not args.eval_only:
        accelerator.unwrap_model(run.model).save_pretrained(
            staged, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
            state_dict=accelerator.get_state_dict(run.model),
        )  # fmt: skip
    if accelerator.is_main_process:
        (staged / "eval_results.json").write_text(json.dumps(results, indent=2))
        if not args.eval_only:
            CTALImageProcessor.from_model_config(
                config, do_normalize=run.recipe.normalize, image_mean=list(IMAGENET_DEFAULT_MEAN),
                image_std=list(IMAGENET_DEFAULT_STD),
            ).save_pretrained(staged)  # fmt: skip
            pictures = evaluation.save_prediction_pictures(
                result.first_batch, config, run.eval_transform, staged, args.num_prediction_images, run.class_names
            )
            make_model_card(
                config, result.final, result.initial, run.dataset_name, run.settings,
                model_name=args.hub_model_id or run.output_dir.name, num_parameters=run.num_parameters,
                completed_steps=run.completed_steps, command=command,
            ).save(staged / "README.md")  # fmt: skip
        run_output.publish_final(staged, run.output_dir)  # config.json last
        if not args.eval_only:
            logger.info(f"Saved the model, image processor, card and {len(pictures)} pictures to {run.output_dir}")
            if run.hub_api is not None:
                hub.push_folder(
                    run.hub_api, args.hub_model_id, run.output_dir, "Upload the trained model", ignore=hub.HUB_IGNORE
                )
                logger.info(f"Pushed {run.output_dir} to {args.hub_model_id}")
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    """Trains (or, with --eval_only, evaluates) and returns the evaluation results (also in eval_results.json).
    `argv`: the command-line arguments (default `sys.argv[1:]`) or an already parsed namespace."""
    args = argv if not isinstance(argv, (list, tuple, type(None))) else parse_args(argv)
    with run_output.claimed_run_output(args, building.resolve_recipe(args).name):  # locked; no empty folder on error
        return train_and_save(args, argv)


def train_and_save(args: argparse.Namespace, argv=None) -> dict:
    """`main`'s steps, while the output folder is claimed."""
    run = set_up(args)
    accelerator = run.accelerator

    start = checkpointing.ResumePoint()
    if not args.eval_only:  # checked and loaded before this run writes anything
        start = checkpointing.resume_training(
            accelerator, args.resume_from_checkpoint, run.checkpoints_dir, run.identity, run.max_train_steps,
            run.steps_per_epoch, args.gradient_accumulation_steps, run.optimizer, run.lr_scheduler,
        )  # fmt: skip
        run.completed_steps = start.completed_steps
        if start.changes:  # applied for real (logged); recorded in eval_results.json and the card
            run.settings["resume_changes"] = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in start.changes.items())
    open_outputs(run)

    if not args.eval_only:
        logger.info(
            f"Training {decoder_display_name(run.config.decoder)} ({run.num_parameters / 1e6:.2f} M "
            f"parameters) on {run.dataset_name}: {run.num_train_images} images, {run.num_epochs} epochs, "
            f"{run.max_train_steps} steps of {run.settings['total_batch_size']} images, lr "
            f"{run.recipe.learning_rate:g} ({run.recipe.scheduler_for(run.config.decoder)}), loss weighting "
            f"{args.loss_weighting}, gradient aggregator {args.gradient_aggregator}."
        )
        run.progress = tqdm(
            range(run.max_train_steps), initial=run.completed_steps, disable=not accelerator.is_local_main_process
        )
        for epoch in range(start.epoch, run.num_epochs):
            if run.completed_steps >= run.max_train_steps:
                break
            train_one_epoch(run, epoch, skip_batches=start.skip_batches if epoch == start.epoch else 0)
            if args.eval_every_epoch:
                evaluate_epoch(run, epoch)
        run.progress.close()

    result = evaluate(run)
    results = collect_results(run, result)
    table = metrics_table(result.final, result.initial, run.config)
    accelerator.print(f"\nValidation metrics ({run.dataset_name}, {len(run.eval_dataset)} images):\n{table}\n")
    accelerator.print(
        evaluation.refinement_report(results["refinement"]) + "\n" if results["refinement"] else "", end=""
    )
    if args.report_to != "none":
        accelerator.log(result.log_dict("eval"), step=run.completed_steps)

    command = "accelerate launch examples/train.py " + shlex.join(sys.argv[1:]) if argv is None else None
    save(run, result, results, command)
    accelerator.end_training()
    if run.aggregation is not None:
        run.aggregation.features.remove()
    return results


if __name__ == "__main__":
    main()
    import torch.distributed as dist

    # Leave the process group cleanly: with torch's gloo backend an abrupt exit sometimes aborts after finishing.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
