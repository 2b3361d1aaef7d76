"""Tasks as data: custom tasks of every kind through the config (save / reload), the loss, the metric, the data
contract and augmentations, post-processing, the pipeline and the model card; bad specs and bad labels refused
with errors that name the task and the field; non-finite label pixels count as missing everywhere."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import calibrate_batch_norm, random_labels  # each kind's random labels are valid labels
from transformers import pipeline

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor, MultiTaskEvaluator, delta_m
from ctal_hf.data import CTALTransform, collate_samples, fit_to_size, hflip, random_scale_crop, row_to_sample
from ctal_hf.tasks import LOWER_IS_BETTER, TASK_KINDS, TASKS, CTALTask, resolve_tasks
from ctal_hf.visualization import colorize, make_figure, visualize_predictions

SIZE = (32, 32)
# One custom task of each kind, with non-default optional fields.
CUSTOM_SPECS = {
    "material": {"kind": "classification", "num_channels": 4, "title": "Material"},
    "albedo": {"kind": "regression", "num_channels": 3, "value_range": [0.0, 1.0]},
    "flow": {"kind": "regression", "num_channels": 2, "loss": "smooth_l1", "flip_negate_channels": [0]},
    "shape_normals": {"kind": "normals", "loss": "l1", "metric": "within_11.25"},
    "mask": {"kind": "binary", "loss": "balanced_bce", "pos_weight": 0.7, "metric": "loss"},
}
CUSTOM_TASKS = list(CUSTOM_SPECS)


def custom_config(**kwargs) -> CTALConfig:
    fields = dict(
        tasks=["semseg", *CUSTOM_TASKS], task_specs=CUSTOM_SPECS, image_size=list(SIZE), num_semseg_classes=3
    )
    fields.update(kwargs)
    return CTALConfig(**fields)


@pytest.fixture(scope="module")
def model() -> CTALForDenseMultitask:
    torch.manual_seed(0)
    return calibrate_batch_norm(CTALForDenseMultitask(custom_config()), batch=4)


# ------------------------------------------------------------------------------------------------- config / specs
def test_task_specs_survive_save_and_reload(tmp_path):
    config = custom_config()
    config.save_pretrained(tmp_path)
    reloaded = CTALConfig.from_pretrained(tmp_path)
    assert reloaded.task_specs == CUSTOM_SPECS
    assert reloaded.get_tasks() == config.get_tasks()
    assert [reloaded.task_channels(t) for t in reloaded.tasks] == [3, 4, 3, 2, 3, 1]


def test_built_in_tasks_keep_their_settings_and_follow_the_config_fields():
    expected = {  # kind, channels (None: from the config), headline metric, lower is better
        "semseg": ("classification", None, "mIoU", False),
        "parts": ("classification", None, "mIoU", False),
        "depth": ("regression", 1, "rel_err", True),
        "normals": ("normals", 3, "mean_angle", True),
        "saliency": ("binary", 1, "maxF", False),
        "edge": ("binary", 1, "loss", True),
    }
    for name, (kind, channels, metric, lower) in expected.items():
        task = TASKS[name]
        assert (task.kind, task.headline_metric, task.lower_is_better) == (kind, metric, lower)
        assert channels is None or task.num_channels == channels
    assert LOWER_IS_BETTER == {"depth", "normals", "edge"}
    config = CTALConfig(
        tasks=list(expected), num_semseg_classes=21, num_parts_classes=6, normals_loss="l1", edge_pos_weight=0.9
    )
    tasks = config.get_tasks()
    assert (tasks["semseg"].num_channels, tasks["parts"].num_channels) == (21, 6)
    assert tasks["normals"].loss == "l1" and tasks["edge"].pos_weight == 0.9 and tasks["saliency"].pos_weight is None
    metrics = MultiTaskEvaluator(config).metrics
    assert [type(metrics[name]).__name__ for name in expected] == [
        "CTALSegmentationMetric",
        "CTALSegmentationMetric",
        "CTALDepthMetric",
        "CTALNormalsMetric",
        "CTALSaliencyMetric",
        "CTALEdgeMetric",
    ]
    assert (metrics["semseg"].num_classes, metrics["parts"].num_classes, metrics["edge"].pos_weight) == (21, 6, 0.9)


def test_every_kind_round_trips_through_to_dict():
    for name, task in custom_config().get_tasks().items():
        assert CTALTask.from_spec(name, task.to_dict()) == task
    assert set(TASK_KINDS) == {"classification", "regression", "normals", "binary"}


@pytest.mark.parametrize(
    ("tasks", "specs", "words"),
    [
        (["x"], {"x": {"kind": "segmentation", "num_channels": 3}}, ["'x'", "`kind`", "segmentation"]),
        (["x"], {"x": {"num_channels": 3}}, ["'x'", "`kind`", "missing"]),
        (["x"], {"x": {"kind": "regression", "num_channels": 0}}, ["'x'", "`num_channels`", "0"]),
        (["x"], {"x": {"kind": "classification"}}, ["'x'", "`num_channels`", "required"]),
        (["x"], {"x": {"kind": "regression", "num_channels": 2, "loss": "l3"}}, ["'x'", "`loss`", "l3"]),
        (["x"], {"x": {"kind": "regression", "num_channels": 1, "metric": "mIoU"}}, ["'x'", "`metric`", "mIoU"]),
        (["x"], {"x": {"kind": "regression", "num_channels": 1, "colour": 1}}, ["'x'", "`colour`", "not a spec"]),
        (
            ["x"],
            {"x": {"kind": "regression", "num_channels": 1, "metric": "log_rmse"}},
            ["'x'", "`metric`", "positive"],
        ),
        (["x"], {"x": {"kind": "regression", "num_channels": 2, "positive": True}}, ["'x'", "`positive`"]),
        (["x"], {"x": {"kind": "normals", "num_channels": 2}}, ["'x'", "`num_channels`", "must be 3"]),
        (["x"], {"x": {"kind": "binary", "pos_weight": 0.5}}, ["'x'", "`pos_weight`", "balanced_bce"]),
        (["x"], {"x": {"kind": "binary", "metric": "loss"}}, ["'x'", "`metric`", "pos_weight"]),
        (["x"], {"x": {"kind": "binary", "value_range": [0, 1]}}, ["'x'", "`value_range`", "binary"]),
        (["x"], {"x": {"kind": "regression", "num_channels": 2, "flip_negate_channels": [2]}}, ["'x'", "`flip_"]),
        (["x"], {"x": {"kind": "classification", "num_channels": 4, "ignore_value": 2}}, ["'x'", "`ignore_value`"]),
        (["x"], {"x": "regression"}, ["'x'", "dict"]),
        (["x"], {}, ["'x'", "task_specs"]),
        (["depth"], {"depth": {"kind": "regression", "num_channels": 1}}, ["'depth'", "built-in"]),
        (["bad name"], {"bad name": {"kind": "regression", "num_channels": 1}}, ["'bad name'", "identifier"]),
    ],
)
def test_bad_specs_raise_a_value_error_naming_the_task_and_field(tasks, specs, words):
    with pytest.raises(ValueError) as error:
        CTALConfig(tasks=tasks, task_specs=specs, image_size=list(SIZE))
    for word in words:
        assert word in str(error.value)


# ------------------------------------------------------------------------------------------ model, loss, labels
def test_custom_tasks_train_and_report_their_loss(model):
    config = model.config
    labels = random_labels(config)
    model.train()
    outputs = model(torch.randn(2, 3, *SIZE), labels=labels)
    model.eval()
    assert set(outputs.task_losses) == set(config.tasks)
    for name, task in config.get_tasks().items():
        assert outputs.predictions[name].shape == (2, task.num_channels, *SIZE)
        assert torch.isfinite(outputs.task_losses[name]) and outputs.task_losses[name] > 0
    outputs.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.zero_grad()


def test_each_kind_uses_its_own_loss():
    tasks = custom_config().get_tasks()
    generator = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 2, 5, 6, generator=generator)
    target = torch.randn(2, 2, 5, 6, generator=generator)
    total, count = tasks["flow"].loss_sum(pred, target)
    assert count == target.numel()
    torch.testing.assert_close(total / count, torch.nn.functional.smooth_l1_loss(pred, target))
    logits = torch.randn(2, 1, 5, 6, generator=generator)
    binary = torch.randint(2, (2, 1, 5, 6), generator=generator).float()
    total, count = tasks["mask"].loss_sum(logits, binary)
    p = torch.sigmoid(logits)
    expected = -(0.7 * binary * p.log() + 0.3 * (1 - binary) * (1 - p).log()).mean()
    torch.testing.assert_close(total / count, expected)


def _loss_with_one_bad_pixel(task, pred, target, value):
    bad = target.clone()
    bad.view(-1)[0] = value
    return task.loss_sum(pred, bad)


@pytest.mark.parametrize("task_name", ["depth", "normals", "saliency", "edge", "albedo", "flow", "mask", "semseg"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_label_pixels_count_as_missing_in_every_loss(task_name, value):
    config = CTALConfig(
        tasks=["semseg", "depth", "normals", "saliency", "edge", *CUSTOM_TASKS],
        task_specs=CUSTOM_SPECS,
        image_size=list(SIZE),
    )
    task = config.get_tasks()[task_name]
    labels = random_labels(config, batch=1)
    target = labels[task_name].float()
    pred = torch.randn(1, task.num_channels, *SIZE, requires_grad=True)
    total, count = _loss_with_one_bad_pixel(task, pred, target, value)
    assert torch.isfinite(total), f"{task_name}: one {value} label pixel made the loss {total}"
    (total / count).backward()
    assert torch.isfinite(pred.grad).all()
    # The same as marking the pixel missing.
    missing = target.clone()
    if task.kind == "normals":
        missing[0, :, 0, 0] = 0.0
    else:
        missing.view(-1)[0] = task.ignore_value if task.ignore_value is not None else math.nan
    reference_total, reference_count = task.loss_sum(pred, missing)
    assert count == reference_count
    torch.testing.assert_close(total, reference_total)


def test_one_nan_depth_pixel_leaves_the_model_loss_finite():
    torch.manual_seed(0)
    model = CTALForDenseMultitask(CTALConfig(tasks=["depth"], image_size=list(SIZE)))
    depth = torch.rand(2, 1, *SIZE) + 0.5
    depth[0, 0, 3, 4] = math.nan
    outputs = model(torch.randn(2, 3, *SIZE), labels={"depth": depth})
    assert torch.isfinite(outputs.loss)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_label_pixels_count_as_missing_in_the_metrics(value):
    config = custom_config(tasks=["semseg", "depth", *CUSTOM_TASKS])
    labels = random_labels(config, batch=1)
    labels["depth"] = labels["depth"] + 0.5
    predictions = {name: torch.randn(1, config.task_channels(name), *SIZE) for name in config.tasks}
    corrupted = {name: label.float().clone() for name, label in labels.items()}
    missing = {name: label.float().clone() for name, label in labels.items()}
    for name, task in config.get_tasks().items():
        corrupted[name].view(-1)[0] = value
        if task.kind == "normals":
            corrupted[name][0, :, 0, 0] = value
            missing[name][0, :, 0, 0] = 0.0
        else:
            missing[name].view(-1)[0] = task.ignore_value if task.ignore_value is not None else math.nan
    with_bad, with_missing = MultiTaskEvaluator(config), MultiTaskEvaluator(config)
    with_bad.update(predictions, corrupted)
    with_missing.update(predictions, missing)
    bad_results, missing_results = with_bad.compute(), with_missing.compute()
    for name, values in missing_results.items():
        assert bad_results[name] == pytest.approx(values, nan_ok=True), name
    assert all(math.isfinite(v) for v in with_bad.headline().values())


def test_labels_that_are_empty_numpy_or_the_wrong_shape_raise_naming_the_task(model):
    pixels = torch.randn(2, 3, *SIZE)
    labels = random_labels(model.config)
    with pytest.raises(ValueError, match="empty"):
        model(pixels, labels={})
    with pytest.raises(ValueError, match=r"labels\['albedo'\].*numpy.*torch.from_numpy"):
        model(pixels, labels={"albedo": labels["albedo"].numpy()})
    with pytest.raises(ValueError, match=r"labels\['albedo'\] has shape \(2, 1, 32, 32\), expected \(2, 3, 32, 32\)"):
        model(pixels, labels={"albedo": labels["albedo"][:, :1]})
    with pytest.raises(ValueError, match=r"labels\['material'\] has shape \(2, 1, 32, 32\).*class ids"):
        model(pixels, labels={"material": labels["material"][:, None]})


@pytest.mark.parametrize(("task", "bad"), [("semseg", -1), ("semseg", 3), ("material", 4), ("material", -1)])
def test_class_ids_outside_the_classes_raise_naming_task_values_and_the_ignore_index(model, task, bad):
    labels = random_labels(model.config)
    labels[task][0, 0, :3] = bad
    with pytest.raises(ValueError) as error:
        model(torch.randn(2, 3, *SIZE), labels={task: labels[task]})
    message = str(error.value)
    assert f"labels[{task!r}]" in message and f"[{bad}]" in message and "ignore index 255" in message
    assert "-1" in message  # points MTAN's -1 users at the ignore index
    labels[task][0, 0, :3] = 255  # the ignore index is fine
    model.criterion.task_objects[task].check_label(labels[task], 2, SIZE)


# ------------------------------------------------------------------------------------------------------ metrics
def test_custom_tasks_evaluate_with_their_headline_metric_and_direction(model):
    config = model.config
    labels = random_labels(config)
    with torch.no_grad():
        predictions = model(torch.randn(2, 3, *SIZE)).predictions
    evaluator = MultiTaskEvaluator(config)
    half = MultiTaskEvaluator(config)
    evaluator.update(predictions, labels)
    half.update({k: v[:1] for k, v in predictions.items()}, {k: v[:1] for k, v in labels.items()})
    other = MultiTaskEvaluator(config)
    other.update({k: v[1:] for k, v in predictions.items()}, {k: v[1:] for k, v in labels.items()})
    results = evaluator.compute()
    merged = half.merge(other).compute()
    for name in config.tasks:  # streaming sums: two halves merge to the whole
        for metric, value in results[name].items():
            assert merged[name][metric] == pytest.approx(value, rel=1e-9, nan_ok=True), (name, metric)
    headline = evaluator.headline()
    assert set(headline) == set(config.tasks)
    assert headline["albedo"] == pytest.approx(
        (predictions["albedo"].double() - labels["albedo"].double()).abs().mean().item()
    )
    assert headline["material"] == results["material"]["mIoU"]
    assert headline["shape_normals"] == results["shape_normals"]["within_11.25"]
    assert headline["mask"] == results["mask"]["loss"]
    assert evaluator.lower_is_better == {"albedo", "flow", "mask"}
    better = {task: value * (0.9 if task in evaluator.lower_is_better else 1.1) for task, value in headline.items()}
    assert delta_m(better, headline, evaluator.lower_is_better) == pytest.approx(10.0)


def test_the_evaluator_takes_task_names_with_specs():
    evaluator = MultiTaskEvaluator(["depth", "albedo"], task_specs={"albedo": CUSTOM_SPECS["albedo"]})
    assert evaluator.tasks == ["depth", "albedo"]
    assert evaluator.metrics["albedo"].task == "albedo"


# ---------------------------------------------------------------------------------------------------------- data
def test_dataset_columns_are_read_by_the_task_kind():
    config = custom_config()
    generator = np.random.default_rng(0)
    row = {
        "image": generator.integers(0, 255, (8, 10, 3), dtype=np.uint8),
        "semseg": generator.integers(0, 3, (8, 10), dtype=np.uint8),
        "material": generator.integers(0, 4, (8, 10), dtype=np.uint8),
        "albedo": generator.random((8, 10, 3), dtype=np.float32),
        "flow": generator.standard_normal((8, 10, 2), dtype=np.float32),
        "shape_normals": np.tile(np.array([0.0, 0.0, 1.0], dtype=np.float32), (8, 10, 1)),
        "mask": generator.integers(0, 2, (8, 10), dtype=np.uint8),
    }
    sample = row_to_sample(row, config)
    assert sample["material"].dtype == torch.int64 and sample["material"].shape == (8, 10)
    assert sample["albedo"].shape == (3, 8, 10)
    torch.testing.assert_close(sample["albedo"], torch.from_numpy(row["albedo"]).permute(2, 0, 1))
    assert sample["flow"].shape == (2, 8, 10) and sample["mask"].shape == (1, 8, 10)
    with pytest.raises(ValueError, match="'albedo'.*3 channel"):
        row_to_sample({**row, "albedo": row["albedo"][..., :2]}, config)
    with pytest.raises(ValueError, match="albedo"):
        row_to_sample({k: v for k, v in row.items() if k != "albedo"}, config)

    flipped = hflip(sample, config)
    torch.testing.assert_close(flipped["flow"][0], -sample["flow"][0].flip(-1))  # flow x changes sign
    torch.testing.assert_close(flipped["flow"][1], sample["flow"][1].flip(-1))
    torch.testing.assert_close(flipped["albedo"], sample["albedo"].flip(-1))  # colours do not
    with pytest.raises(ValueError, match="flow"):
        hflip(sample)  # without the specs the transforms cannot know what flow is

    padded = fit_to_size(sample, (12, 12), mode="pad", tasks=config)
    assert torch.isnan(padded["albedo"][:, 0]).all() and (padded["material"][0] == 255).all()
    assert (padded["mask"][:, 0] == 255).all() and (padded["shape_normals"][:, 0] == 0).all()
    zoomed = random_scale_crop(sample, torch.Generator().manual_seed(3), scales=(1.5,), tasks=config)
    assert zoomed["albedo"].shape == (3, 8, 10)  # values are not divided: only `divide_by_zoom` tasks are

    transform = CTALTransform(SIZE, train=True, scale_crop=True, tasks=config)
    batch = collate_samples([transform(dict(sample), torch.Generator().manual_seed(0))], config)
    for name, task in config.get_tasks().items():
        task.check_label(batch["labels"][name], 1, SIZE)


def test_depth_is_divided_by_the_zoom_and_normals_x_negated_by_a_flip():
    sample = {
        "image": torch.rand(3, 8, 8),
        "depth": torch.full((1, 8, 8), 3.0),
        "normals": torch.nn.functional.normalize(torch.rand(3, 8, 8), dim=0),
    }
    zoomed = random_scale_crop(sample, torch.Generator().manual_seed(0), scales=(1.5,))
    torch.testing.assert_close(zoomed["depth"], torch.full((1, 8, 8), 2.0))
    flipped = hflip(sample)
    torch.testing.assert_close(flipped["normals"][0], -sample["normals"][0].flip(-1))


# ------------------------------------------------------------------------------------- post-processing, pictures
def test_post_processing_decodes_each_kind_at_the_target_size(model):
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, *SIZE))
    processor = CTALImageProcessor.from_model_config(model.config)
    with pytest.raises(ValueError, match="task_specs"):
        processor.post_process_multitask(outputs)  # custom tasks need their specs
    maps = processor.post_process_multitask(outputs, target_sizes=[(30, 50), (64, 20)], task_specs=model.config)
    for image, (height, width) in zip(maps, [(30, 50), (64, 20)], strict=True):
        assert image["material"].shape == (height, width) and image["material"].dtype == torch.int64
        assert int(image["material"].max()) < 4
        assert image["albedo"].shape == (height, width, 3)
        assert image["flow"].shape == (height, width, 2)
        assert image["shape_normals"].shape == (height, width, 3)
        torch.testing.assert_close(image["shape_normals"].norm(dim=-1), torch.ones(height, width))
        assert image["mask"].shape == (height, width) and 0 <= image["mask"].min() <= image["mask"].max() <= 1
    pictures = visualize_predictions({k: v.numpy() for k, v in maps[0].items()}, task_specs=model.config)
    assert {name: picture.size for name, picture in pictures.items()} == dict.fromkeys(model.config.tasks, (50, 30))
    assert pictures["albedo"].mode == "RGB" and pictures["mask"].mode == "L"


def test_three_channel_regression_is_drawn_as_rgb_in_its_value_range():
    albedo = np.zeros((2, 3, 3))
    albedo[0, 0] = [1.0, 0.5, 0.0]
    albedo[1, 2] = math.nan  # missing in a label: black
    picture = colorize("albedo", albedo, task_specs={"albedo": CUSTOM_SPECS["albedo"]}, label=True)
    assert picture.dtype == np.uint8 and picture.shape == (2, 3, 3)
    assert picture[0, 0].tolist() == [255, 128, 0] and picture[1, 2].tolist() == [0, 0, 0]


def test_figures_take_custom_tasks_with_ground_truth(model, tmp_path):
    config = model.config
    with torch.no_grad():
        predictions = model(torch.randn(1, 3, *SIZE)).predictions
    processor = CTALImageProcessor.from_model_config(config)
    decoded = processor.post_process_multitask(predictions, task_specs=config)[0]
    labels = random_labels(config, batch=1)
    truth = {name: task.label_to_map(labels[name][0]) for name, task in config.get_tasks().items()}
    figure = make_figure(
        np.zeros((*SIZE, 3), dtype=np.uint8),
        decoded,
        truth,
        tasks=config.tasks,
        task_specs=config,
        path=tmp_path / "figure.png",
    )
    assert len(figure.axes) == 2 * (1 + len(config.tasks)) and (tmp_path / "figure.png").stat().st_size > 0


# ------------------------------------------------------------------------------ pipeline, save, reload, card
def test_pipeline_returns_every_custom_task_at_the_input_size_after_save_and_reload(model, tmp_path):
    model.save_pretrained(tmp_path)
    CTALImageProcessor.from_model_config(model.config).save_pretrained(tmp_path)
    reloaded = CTALForDenseMultitask.from_pretrained(tmp_path)
    assert reloaded.config.task_specs == CUSTOM_SPECS
    pixels = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        before, after = model(pixels).predictions, reloaded.eval()(pixels).predictions
    for name in model.config.tasks:
        torch.testing.assert_close(before[name], after[name], rtol=1e-4, atol=1e-4)
    predictor = pipeline("dense-multitask", model=str(tmp_path), device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8)
    result = predictor(image)
    assert result["material"].shape == (40, 70) and result["mask"].shape == (40, 70)
    assert result["albedo"].shape == (40, 70, 3) and result["flow"].shape == (40, 70, 2)
    assert result["shape_normals"].shape == (40, 70, 3) and result["semseg"].shape == (40, 70)
    assert set(result["visualizations"]) == set(model.config.tasks)
    only = predictor(image, tasks=["albedo"], visualize=False)
    assert set(only) == {"albedo"}

    # ctal-predict writes every custom task's map, picture and panel.
    import PIL.Image

    from ctal_hf.cli import main as cli_main

    PIL.Image.fromarray(image).save(tmp_path / "scene.png")
    assert (
        cli_main([str(tmp_path / "scene.png"), "--model", str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 0
    )
    assert np.load(tmp_path / "out" / "scene_albedo.npy").shape == (40, 70, 3)
    assert PIL.Image.open(tmp_path / "out" / "scene_flow.png").size == (70, 40)
    assert (tmp_path / "out" / "scene_panel.png").stat().st_size > 0


def test_model_card_lists_custom_tasks_and_their_metrics():
    from ctal_hf.training.model_card import make_model_card

    config = custom_config(tasks=["semseg", "albedo", "mask"])
    final = {
        "semseg": {"mIoU": 0.5, "pixel_acc": 0.7},
        "albedo": {"abs_err": 0.05, "rel_err": 0.2, "rmse": 0.08},
        "mask": {"loss": 0.3, "odsF": 0.6, "oisF": 0.62, "ods_threshold": 0.5},
    }
    card = str(make_model_card(config, final, None, "synthetic", {"lr": 1e-3}, "tiny"))
    assert "`albedo`: albedo (regression task, 3 output channel(s), l1 loss, headline metric abs_err" in card
    assert "| albedo | abs_err ↓ | 0.050 |" in card and "| albedo | rmse ↓ | 0.080 |" in card
    assert "| albedo | rel_err" not in card  # no ignore value: relative errors are not shown
    assert "| mask | loss ↓ | 0.3000 |" in card and "| mask | odsF (%) ↑ | 60.00 |" in card
    assert (
        "dense-albedo" in card
        and "`semseg`: Semantic segmentation (3 output channel(s), headline metric mIoU)" in card
    )


def test_resolve_tasks_orders_tasks_as_listed():
    tasks = resolve_tasks(["albedo", "depth"], {"albedo": CUSTOM_SPECS["albedo"]})
    assert list(tasks) == ["albedo", "depth"] and tasks["albedo"].value_range == (0.0, 1.0)


# --------------------------------------------------------------------------------- synthetic albedo, end to end
def test_synthetic_albedo_is_the_colour_before_shading():
    from dataset_scripts.synthetic import ALBEDO_TASK_SPEC, CONFIG_TASKS, render_scene

    assert "albedo" in CONFIG_TASKS["nyuv2"]
    scene = render_scene(3, height=48, width=64)
    assert scene["albedo"].shape == (48, 64, 3) and scene["albedo"].dtype == np.float32
    albedo, image = scene["albedo"].astype(np.float64), scene["image"].astype(np.float64) / 255.0
    assert 0.0 < albedo.min() <= albedo.max() <= 1.0
    # The image is albedo x one shading factor per pixel (+ noise and 8-bit rounding): the same ratio per channel.
    bright = (image > 0.1).all(axis=-1) & (image < 0.95).all(axis=-1)
    ratio = image[bright] / albedo[bright]
    spread = (ratio.max(axis=-1) - ratio.min(axis=-1)) / ratio.mean(axis=-1)
    assert bright.mean() > 0.5 and np.median(spread) < 0.05
    assert ratio.std() > 0.05  # while the shading itself varies over the image
    assert CTALTask.from_spec("albedo", ALBEDO_TASK_SPEC).num_channels == 3


@pytest.fixture
def reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_train_py_with_task_specs_trains_evaluates_saves_and_serves_albedo(tmp_path, reset_accelerate):
    """examples/train.py on the synthetic scenes with a task defined only in a specs file (no edit of ctal_hf)."""
    import json
    import sys

    from dataset_scripts.synthetic import ALBEDO_TASK_SPEC

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import train

    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"albedo": ALBEDO_TASK_SPEC}))
    output = tmp_path / "out"
    argv = ["--tasks", "semseg", "depth", "albedo", "--task_specs", str(specs), "--max_train_steps", "2"]
    argv += ["--image_size", "32", "32", "--num_train_images", "8", "--num_validation_images", "3"]
    argv += ["--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--num_prediction_images", "1"]
    argv += ["--cache_dir", str(tmp_path / "cache"), "--output_dir", str(output)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = train.main(argv)
    finally:
        torch.set_num_threads(threads)
    assert results["tasks"] == ["semseg", "depth", "albedo"]
    assert set(results["final"]["albedo"]) == {"abs_err", "rel_err", "rmse"}
    assert 0 < results["headline"]["albedo"] == results["final"]["albedo"]["abs_err"] < 1
    card = (output / "README.md").read_text()
    assert "`albedo`: Albedo (regression task, 3 output channel(s)" in card and "| albedo | abs_err ↓ |" in card
    saved = json.loads((output / "config.json").read_text())
    assert saved["task_specs"]["albedo"] == ALBEDO_TASK_SPEC  # beside the synthetic recipe's class names and units
    assert saved["id2label"]["6"] == "figure" and saved["task_specs"]["depth"] == {"unit": "metres"}
    assert (output / "predictions" / "validation_0.png").stat().st_size > 5_000

    model = CTALForDenseMultitask.from_pretrained(output)
    assert model.config.get_tasks()["albedo"].kind == "regression"
    predictor = pipeline("dense-multitask", model=str(output), device="cpu")
    result = predictor(np.zeros((20, 30, 3), dtype=np.uint8))
    assert result["albedo"].shape == (20, 30, 3) and result["depth"].shape == (20, 30)
    assert result["visualizations"]["albedo"].size == (30, 20)
