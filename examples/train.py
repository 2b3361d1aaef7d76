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
# It composes `ctal_hf.training`: the recipes and arguments, one `accelerator.prepare`, gradient accumulation,
# loss balancing (`--loss_weighting`) or TorchJD gradient aggregation (`--gradient_aggregator`), evaluation of the
# whole validation split over exact shards, atomic checkpoints that resume exactly, `save_pretrained` of the model
# and its image processor, prediction pictures, a model card, and `--push_to_hub`.

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ctal_hf.training.arguments import parse_args  # noqa: E402  (light: --help answers before torch is imported)


def main(argv=None, hub_api=None, on_step=None) -> dict:
    """Trains (or evaluates) and returns the evaluation results. `hub_api` replaces `huggingface_hub.HfApi` and
    `on_step(completed_steps, run)` is called after every optimizer step, `run` holding the accelerator, model,
    optimizer and loss weighting (both for tests)."""
    args = argv if not isinstance(argv, (list, tuple, type(None))) else parse_args(argv)

    import contextlib
    import json
    import logging
    import shlex
    from types import SimpleNamespace

    import datasets
    import torch
    import transformers
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ctal_hf import CTALImageProcessor
    from ctal_hf.configuration_ctal import DECODER_NAMES
    from ctal_hf.ctal_attention import resolve_autocast_dtype
    from ctal_hf.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, CTALTorchDataset, CTALTransform
    from ctal_hf.training import building, checkpointing, evaluation, hub
    from ctal_hf.training.aggregation import GradientAggregation, check_aggregation_setting
    from ctal_hf.training.data_loading import EpochShuffleSampler, load_splits
    from ctal_hf.training.loss_weighting import build_loss_weighting
    from ctal_hf.training.model_card import make_model_card, metrics_table

    logger = get_logger("train")
    recipe = building.resolve_recipe(args)
    output_dir = Path(args.output_dir or f"outputs/ctal-{recipe.name}")
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
    verbosity = "warning" if accelerator.is_local_main_process else "error"
    datasets.utils.logging.set_verbosity(getattr(logging, verbosity.upper()))
    transformers.utils.logging.set_verbosity(getattr(logging, verbosity.upper()))
    if args.recipe is None and args.dataset is not None and args.dataset != recipe.dataset:
        logger.warning(f"No recipe is named after dataset {args.dataset!r}: using the 'synthetic' recipe (--recipe).")
    set_seed(args.seed)

    # ------------------------------------------------------------------------------------------------ build
    config = building.build_config(args, recipe)
    tasks = list(config.tasks)
    with accelerator.main_process_first():  # the main process builds the dataset cache, the others read it
        train_rows, eval_rows, dataset_name, class_names = load_splits(args, recipe, tasks, config.image_size)
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
        aggregation = GradientAggregation(args.gradient_aggregator, accelerator.unwrap_model(model), tasks)

    steps_per_epoch, max_train_steps, num_epochs = building.schedule_length(
        len(train_dataloader), args.gradient_accumulation_steps, recipe
    )
    scheduler_name = recipe.scheduler_for(config.decoder)
    lr_scheduler = accelerator.prepare(
        building.make_scheduler(optimizer, scheduler_name, recipe, max_train_steps, steps_per_epoch, num_epochs)
    )
    checkpointing_every = args.checkpointing_steps or str(max(1, -(-max_train_steps // 4)))  # default: ~4 per run
    checkpoints_dir = output_dir / "checkpoints"
    run = {"decoder": config.decoder, "loss_weighting": args.loss_weighting}
    run.update(gradient_aggregator=args.gradient_aggregator, max_train_steps=max_train_steps)
    candidates = []
    if args.resume_from_checkpoint and not args.eval_only:  # checked before this run writes anything
        candidates = checkpointing.check_resumable(args.resume_from_checkpoint, checkpoints_dir, run)
        for path, state in candidates[:1]:
            if int(state["completed_steps"]) >= max_train_steps:
                raise checkpointing.CheckpointError(
                    f"{path} is at step {state['completed_steps']}, not before --max_train_steps {max_train_steps}: "
                    "pass a larger --max_train_steps, or evaluate the saved model with --eval_only "
                    "--model_name_or_path."
                )

    settings = {
        "recipe": recipe.name, "dataset": dataset_name, "decoder": config.decoder,
        "backbone": config.backbone_description,
        "pretrained_backbone": building.pretrained_backbone_source(args, recipe) or "none (random init)",
        "tasks": ",".join(tasks),
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
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_temporaries(checkpoints_dir)
    if args.report_to != "none":
        accelerator.init_trackers("ctal", config={k: v for k, v in settings.items() if v is not None})
    api = None
    if args.push_to_hub and accelerator.is_main_process:
        api = hub_api if hub_api is not None else hub.make_hub_api(args.hub_token)
        api.create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo)

    def run_evaluation(desc="evaluating"):
        criterion = accelerator.unwrap_model(model).criterion
        return evaluation.evaluate(
            model, accelerator, eval_dataset, config, recipe.per_device_eval_batch_size,
            args.dataloader_num_workers, criterion=criterion, desc=desc,
        )  # fmt: skip

    def save(step, epoch):
        path = checkpointing.save_checkpoint(
            accelerator, checkpoints_dir, step, epoch, args.checkpoints_total_limit, run
        )
        if api is not None and args.push_checkpoints:
            hub.push_folder(api, args.hub_model_id, path, f"Checkpoint {path.name}", f"checkpoints/{path.name}")

    def reduce_mean(tensor):
        return accelerator.reduce(tensor, "mean") if accelerator.num_processes > 1 else tensor

    def training_step(batch):
        # TorchJD back-propagates with autograd.grad, which DDP's reducer does not see: no_sync, then averaged by hand.
        with accelerator.no_sync(model) if aggregation is not None else contextlib.nullcontext():
            return _training_step(batch)

    def _training_step(batch):
        outputs = model(**batch)
        terms = weighting(outputs.task_losses, terms=2 if outputs.initial_predictions else 1)
        loss = torch.stack(list(terms.values())).sum()
        if aggregation is None:
            accelerator.backward(loss)
        else:
            scale = 1.0 / args.gradient_accumulation_steps
            aggregation.backward(
                {t: v * scale for t, v in terms.items()}, weighting.trainable_parameters(),
                reduce_mean if accelerator.num_processes > 1 else None,
            )  # fmt: skip
        if accelerator.num_processes > 1 and aggregation is None and accelerator.sync_gradients:
            for param in weighting.trainable_parameters():  # not in the DDP model: average by hand
                param.grad = reduce_mean(param.grad)
        optimizer.step()
        if weighting.needs_loss_after_step and accelerator.sync_gradients:
            with torch.no_grad():
                after = model(**batch).task_losses
            weighting.after_step(reduce_mean, after)
        elif accelerator.sync_gradients:
            weighting.after_step(reduce_mean)
        optimizer.zero_grad()
        return outputs, loss

    # ------------------------------------------------------------------------------------------------ training
    completed_steps, history = 0, []  # history: the per-epoch evaluations (--eval_every_epoch) of this process run
    if not args.eval_only:
        starting_epoch, skip_batches = 0, 0
        if candidates:
            path, state = checkpointing.load_checkpoint(
                accelerator, candidates, args.resume_from_checkpoint == "latest"
            )
            if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
                logger.warning(
                    f"{path} was written by {state['num_processes']} processes, this run has "
                    f"{accelerator.num_processes}: the data order after resuming differs from the original run's."
                )
            if state.get("max_train_steps", max_train_steps) != max_train_steps:
                logger.info(
                    f"{path} was written by a run of {state['max_train_steps']} steps; the learning rate now follows "
                    f"the schedule of {max_train_steps} steps from step {state['completed_steps']}."
                )
            completed_steps = int(state["completed_steps"])
            starting_epoch = completed_steps // steps_per_epoch
            skip_batches = (completed_steps % steps_per_epoch) * args.gradient_accumulation_steps
            logger.info(f"Resumed from {path} at step {completed_steps} (epoch {starting_epoch}).")
        elif args.resume_from_checkpoint:
            logger.warning(f"No checkpoint in {checkpoints_dir}: starting from scratch.")

        logger.info(
            f"Training {DECODER_NAMES.get(config.decoder, config.decoder)} ({num_parameters / 1e6:.2f} M parameters) "
            f"on {dataset_name}: {len(train_dataset)} images, {num_epochs} epochs, {max_train_steps} steps of "
            f"{settings['total_batch_size']} images, lr {recipe.learning_rate:g} ({scheduler_name}), loss weighting "
            f"{args.loss_weighting}, gradient aggregator {args.gradient_aggregator}."
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
                    outputs, loss = training_step(batch)
                for name, value in {"loss": loss, **outputs.task_losses}.items():
                    running[name] = running.get(name, 0.0) + value.detach().float()
                running["batches"] = running.get("batches", 0) + 1
                if not accelerator.sync_gradients:
                    continue
                lr_scheduler.step()
                completed_steps += 1
                progress.update(1)
                if completed_steps % args.logging_steps == 0 or completed_steps == max_train_steps:
                    count = running.pop("batches")
                    logs = {f"train/{k}": reduce_mean(v / count).item() for k, v in sorted(running.items())}
                    logs["train/lr"] = lr_scheduler.get_last_lr()[0]
                    logs.update({f"train/weight/{t}": w for t, w in weighting.current_weights().items()})
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                    accelerator.log(logs, step=completed_steps)
                    running = {}
                if checkpointing_every != "epoch" and completed_steps % int(checkpointing_every) == 0:
                    save(completed_steps, epoch)
                if on_step is not None:
                    on_step(
                        completed_steps, SimpleNamespace(accelerator=accelerator, model=model, weighting=weighting)
                    )
                if completed_steps >= max_train_steps:
                    break
            weighting.end_epoch()
            if checkpointing_every == "epoch":
                save(completed_steps, epoch)
            if args.eval_every_epoch:
                result = run_evaluation(desc=f"evaluating epoch {epoch}")
                accelerator.log(result.log_dict("val"), step=completed_steps)
                history.append(
                    {
                        "epoch": epoch,
                        "step": completed_steps,
                        "losses": result.losses,
                        "final": result.final,
                        "initial": result.initial,
                    }  # fmt: skip
                )
                losses = ", ".join(
                    f"{t} {result.losses['final'][t]:.4f}"
                    + (f" (initial {result.losses['initial'][t]:.4f})" if "initial" in result.losses else "")
                    for t in tasks
                )
                logger.info(f"Epoch {epoch} (step {completed_steps}): validation losses {losses}")
        progress.close()

    # ---------------------------------------------------------------------------------------------- evaluation
    result = run_evaluation()
    table = metrics_table(result.final, result.initial, config)
    accelerator.print(f"\nValidation metrics ({dataset_name}, {len(eval_dataset)} images):\n{table}\n")
    refined = evaluation.refinement(result.final, result.initial, config.get_tasks())
    accelerator.print(evaluation.refinement_report(refined) + "\n" if refined else "", end="")
    results = {
        "final": result.final, "initial": result.initial, "losses": result.losses,
        "headline": {task: result.final[task][spec.metric] for task, spec in config.get_tasks().items()},
        "headline_metrics": {task: spec.metric for task, spec in config.get_tasks().items()},
        "lower_is_better": [task for task, spec in config.get_tasks().items() if spec.lower_is_better],
        "dataset": dataset_name, "num_validation_images": len(eval_dataset), "decoder": config.decoder,
        "tasks": tasks, "num_parameters": num_parameters, "completed_steps": completed_steps,
        "loss_weights_final": weighting.current_weights(), "history": history, "settings": settings,
        "refinement": refined,
    }  # fmt: skip
    if args.report_to != "none":
        accelerator.log(result.log_dict("eval"), step=completed_steps)

    # ---------------------------------------------------------------------------------------------- saving
    accelerator.wait_for_everyone()
    if not args.eval_only:
        accelerator.unwrap_model(model).save_pretrained(
            output_dir, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
            state_dict=accelerator.get_state_dict(model),
        )  # fmt: skip
    if accelerator.is_main_process:
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        if not args.eval_only:
            CTALImageProcessor.from_model_config(
                config, do_normalize=recipe.normalize, image_mean=list(IMAGENET_DEFAULT_MEAN),
                image_std=list(IMAGENET_DEFAULT_STD),
            ).save_pretrained(output_dir)  # fmt: skip
            pictures = evaluation.save_prediction_pictures(
                result.first_batch, config, eval_transform, output_dir, args.num_prediction_images, class_names
            )
            command = "accelerate launch examples/train.py " + shlex.join(sys.argv[1:]) if argv is None else None
            make_model_card(
                config, result.final, result.initial, dataset_name, settings,
                model_name=args.hub_model_id or output_dir.name, num_parameters=num_parameters,
                completed_steps=completed_steps, command=command,
            ).save(output_dir / "README.md")  # fmt: skip
            logger.info(f"Saved the model, image processor, card and {len(pictures)} pictures to {output_dir}")
            if api is not None:
                hub.push_folder(api, args.hub_model_id, output_dir, "Upload the trained model", ignore=hub.HUB_IGNORE)
                logger.info(f"Pushed {output_dir} to {args.hub_model_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if aggregation is not None:
        aggregation.features.remove()
    return results


if __name__ == "__main__":
    main()
    import torch.distributed as dist

    # Leave the process group cleanly: with torch's gloo backend an abrupt exit sometimes aborts after finishing.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
