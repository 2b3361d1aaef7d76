"""One CTAL checkpoint behind the stock transformers interfaces: the per-task views (`AutoModelForDepthEstimation`,
`AutoModelForSemanticSegmentation`, `AutoModelForNormalEstimation`), the stock post-processing names, and the stock
`depth-estimation` / `image-segmentation` pipelines on a saved folder, with the package imported and with
`trust_remote_code=True` in a process without it; their maps are compared with the `dense-multitask` pipeline's."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForDepthEstimation,
    AutoModelForNormalEstimation,
    AutoModelForSemanticSegmentation,
    pipeline,
)
from transformers.modeling_outputs import DepthEstimatorOutput, SemanticSegmenterOutput

from ctal_hf import (
    CTALConfig,
    CTALForDenseMultitask,
    CTALForDepthEstimation,
    CTALForNormalEstimation,
    CTALForSemanticSegmentation,
    CTALImageProcessor,
    CTALNormalEstimatorOutput,
)

torch.set_num_threads(1)

TASKS = ["semseg", "depth", "normals", "parts"]
CLASS_NAMES = ["floor", "wall", "chair", "table", "lamp"]
VIEWS = {
    AutoModelForDepthEstimation: (CTALForDepthEstimation, "depth"),
    AutoModelForSemanticSegmentation: (CTALForSemanticSegmentation, "semseg"),
    AutoModelForNormalEstimation: (CTALForNormalEstimation, "normals"),
}


def calibrated(model: CTALForDenseMultitask) -> CTALForDenseMultitask:
    """BatchNorm statistics from one random batch, so a random model's outputs are O(1) and its segmentation has
    several classes; eval mode."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, *model.config.image_size, generator=torch.Generator().manual_seed(0)))
    return model.eval()


@pytest.fixture(scope="module")
def dense_model() -> CTALForDenseMultitask:
    torch.manual_seed(0)
    config = CTALConfig(
        tasks=TASKS,
        image_size=[64, 64],
        num_semseg_classes=len(CLASS_NAMES),
        task_specs={"semseg": {"class_names": CLASS_NAMES}, "depth": {"unit": "metres"}},
    )
    return calibrated(CTALForDenseMultitask(config))


@pytest.fixture(scope="module")
def folder(dense_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ctal-views")
    dense_model.save_pretrained(path)
    CTALImageProcessor.from_model_config(dense_model.config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image() -> PIL.Image.Image:
    rng = np.random.default_rng(7)
    return PIL.Image.fromarray(rng.integers(0, 256, (75, 101, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def dense_maps(folder, image) -> dict:
    return pipeline("dense-multitask", model=str(folder), device="cpu")(image, visualize=False)


def test_saved_config_names_every_view_for_remote_code(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ctal.CTALConfig",
        "AutoModel": "modeling_ctal.CTALForDenseMultitask",
        "AutoModelForDepthEstimation": "modeling_ctal.CTALForDepthEstimation",
        "AutoModelForSemanticSegmentation": "modeling_ctal.CTALForSemanticSegmentation",
        "AutoModelForNormalEstimation": "modeling_ctal.CTALForNormalEstimation",
    }
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}
    assert config["label2id"] == {name: i for i, name in enumerate(CLASS_NAMES)}
    assert config["task_specs"]["depth"] == {"unit": "metres"}


@pytest.mark.parametrize("auto_class", list(VIEWS), ids=lambda cls: cls.__name__)
def test_each_auto_class_loads_the_same_weights_strictly_and_returns_the_stock_field(auto_class, folder, dense_model):
    view_class, task = VIEWS[auto_class]
    view, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert type(view) is view_class and view.task == task
    assert all(not keys for keys in (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]))
    dense_state, view_state = dense_model.state_dict(), view.state_dict()
    assert list(view_state) == list(dense_state)
    assert all(torch.equal(view_state[key], dense_state[key]) for key in dense_state)

    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dense_model(pixel_values).predictions[task]
        output = view.eval()(pixel_values)
    if view_class is CTALForDepthEstimation:
        assert isinstance(output, DepthEstimatorOutput)
        torch.testing.assert_close(output.predicted_depth, expected[:, 0], rtol=0, atol=0)
    elif view_class is CTALForSemanticSegmentation:
        assert isinstance(output, SemanticSegmenterOutput)
        torch.testing.assert_close(output.logits, expected, rtol=0, atol=0)
    else:
        assert isinstance(output, CTALNormalEstimatorOutput)
        torch.testing.assert_close(output.normals, expected, rtol=0, atol=0)


def test_a_view_trains_its_own_task_and_saves_a_folder_every_class_loads(folder, tmp_path):
    view = CTALForDepthEstimation.from_pretrained(folder).train()
    depth = torch.rand(2, 1, 64, 64) + 0.5
    output = view(torch.randn(2, 3, 64, 64), labels=depth)
    assert output.loss.ndim == 0 and output.loss > 0
    output.loss.backward()
    assert view.decoder is not None and any(p.grad is not None for p in view.backbone.parameters())
    view.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"]["AutoModel"] == (
        "modeling_ctal.CTALForDenseMultitask"
    )
    assert type(AutoModel.from_pretrained(tmp_path)) is CTALForDenseMultitask
    assert type(AutoModelForSemanticSegmentation.from_pretrained(tmp_path)) is CTALForSemanticSegmentation


def test_a_checkpoint_without_the_task_is_refused_naming_its_tasks(tmp_path):
    config = CTALConfig(tasks=["semseg", "normals"], image_size=[64, 64], num_semseg_classes=3)
    CTALForDenseMultitask(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no such task: its tasks are \['semseg', 'normals'\]"):
        AutoModelForDepthEstimation.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="serves depth-estimation"):
        pipeline("depth-estimation", model=str(tmp_path), device="cpu")


def test_stock_post_processing_equals_post_process_multitask(dense_model):
    processor = CTALImageProcessor.from_model_config(dense_model.config)
    with torch.no_grad():
        outputs = dense_model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    sizes = [(50, 70), (64, 64)]
    multitask = processor.post_process_multitask(outputs, target_sizes=sizes)
    views = {
        "depth": DepthEstimatorOutput(predicted_depth=outputs.predictions["depth"][:, 0]),
        "semseg": SemanticSegmenterOutput(logits=outputs.predictions["semseg"]),
        "normals": CTALNormalEstimatorOutput(normals=outputs.predictions["normals"]),
    }
    for source in (outputs, None):  # the dense output (read by task) and each view's output
        depth = processor.post_process_depth_estimation(source or views["depth"], target_sizes=sizes)
        segmentation = processor.post_process_semantic_segmentation(source or views["semseg"], target_sizes=sizes)
        scored = processor.post_process_semantic_segmentation(
            source or views["semseg"], target_sizes=sizes, return_segmentation_scores=True
        )
        normals = processor.post_process_normal_estimation(source or views["normals"], target_sizes=sizes)
        for index, size in enumerate(sizes):
            torch.testing.assert_close(depth[index]["predicted_depth"], multitask[index]["depth"])
            assert torch.equal(segmentation[index], multitask[index]["semseg"])
            assert torch.equal(scored[index]["segmentation"], segmentation[index])
            assert scored[index]["segmentation_scores"].shape == (len(CLASS_NAMES), *size)
            torch.testing.assert_close(normals[index]["normals"], multitask[index]["normals"].permute(2, 0, 1))
    with pytest.raises(ValueError, match="one \\(height, width\\) per image"):
        processor.post_process_depth_estimation(views["depth"], target_sizes=[(5, 5)])
    with pytest.raises(ValueError, match="holding the task 'edge'"):
        processor.post_process_depth_estimation(outputs, task="edge")


def stock_results(depth_result: dict, segments: list[dict]) -> tuple[np.ndarray, np.ndarray, dict]:
    """The stock pipelines' outputs as maps: the depth values, a class-id map rebuilt from the per-class masks
    (`-1` where no mask covers a pixel) and the masks' label -> pixel count."""
    depth = depth_result["predicted_depth"].numpy()
    ids = np.full(depth.shape, -1, dtype=np.int64)
    counts = {}
    for segment in segments:
        mask = np.asarray(segment["mask"]) == 255
        assert segment["score"] is None and segment["label"] in CLASS_NAMES
        assert not (ids[mask] >= 0).any(), "masks overlap"
        ids[mask] = CLASS_NAMES.index(segment["label"])
        counts[segment["label"]] = int(mask.sum())
    return depth, ids, counts


def test_stock_pipelines_match_the_dense_multitask_maps(folder, image, dense_maps):
    depth_pipe = pipeline("depth-estimation", model=str(folder), device="cpu")
    segment_pipe = pipeline("image-segmentation", model=str(folder), device="cpu")
    assert type(depth_pipe.model) is CTALForDepthEstimation
    assert type(segment_pipe.model) is CTALForSemanticSegmentation
    depth_result, segments = depth_pipe(image), segment_pipe(image)
    depth, ids, counts = stock_results(depth_result, segments)

    assert depth.shape == dense_maps["depth"].shape == (75, 101)
    np.testing.assert_array_equal(depth, dense_maps["depth"])  # the same bilinear resize of the same raw map
    picture = np.asarray(depth_result["depth"])  # the stock picture: the map rescaled to 0..255 per image
    assert depth_result["depth"].mode == "L" and picture.min() == 0 and picture.max() == 255
    expected_picture = ((depth - depth.min()) / (depth.max() - depth.min()) * 255).astype(np.uint8)
    np.testing.assert_array_equal(picture, expected_picture)

    assert (ids >= 0).all(), "the masks cover every pixel"
    np.testing.assert_array_equal(ids, dense_maps["semseg"])
    present = np.unique(dense_maps["semseg"])
    assert len(present) >= 2, "the random model should predict several classes"
    assert [segment["label"] for segment in segments] == [CLASS_NAMES[i] for i in present]
    assert sum(counts.values()) == ids.size


@pytest.mark.slow
def test_stock_pipelines_run_with_trust_remote_code_in_a_process_without_ctal_hf(folder, image, dense_maps, tmp_path):
    image.save(tmp_path / "image.png")
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np, torch
        torch.set_num_threads(1)
        import PIL.Image
        from transformers import AutoImageProcessor, AutoModelForNormalEstimation, pipeline
        image = PIL.Image.open({str(tmp_path / "image.png")!r})
        folder = {str(folder)!r}
        depth = pipeline("depth-estimation", model=folder, trust_remote_code=True, device="cpu")(image)
        segments = pipeline("image-segmentation", model=folder, trust_remote_code=True, device="cpu")(image)
        model = AutoModelForNormalEstimation.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            outputs = model(**processor(image, return_tensors="pt"))
        normals = processor.post_process_normal_estimation(outputs, target_sizes=[image.size[::-1]])[0]["normals"]
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert "ctal_hf" not in sys.modules, "the package was imported"
        masks = {{s["label"]: np.asarray(s["mask"]) for s in segments}}
        np.savez({str(tmp_path / "remote.npz")!r}, depth=depth["predicted_depth"].numpy(), normals=normals.numpy(),
                 labels=np.array(list(masks)), masks=np.stack(list(masks.values())))
        print("REMOTE-STOCK-OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE-STOCK-OK" in result.stdout, result.stderr[-3000:]
    with np.load(tmp_path / "remote.npz") as remote:
        np.testing.assert_array_equal(remote["depth"], dense_maps["depth"])
        np.testing.assert_allclose(remote["normals"].transpose(1, 2, 0), dense_maps["normals"], atol=1e-6)
        ids = np.full(dense_maps["semseg"].shape, -1)
        for label, mask in zip(remote["labels"], remote["masks"], strict=True):
            ids[mask == 255] = CLASS_NAMES.index(str(label))
    np.testing.assert_array_equal(ids, dense_maps["semseg"])


@pytest.mark.parametrize(
    ("preset", "names", "unit"),
    [
        ("nyuv2", ("semseg", 13, "bed", "window"), "metres"),
        ("cityscapes", ("semseg", 19, "road", "bicycle"), "disparity"),
        ("pascal_context", ("semseg", 21, "background", "tvmonitor"), None),
    ],
)
def test_presets_carry_class_names_and_units(preset, names, unit):
    config = CTALConfig.from_preset(preset)
    task, count, first, last = names
    assert config.semantic_segmentation_task == task
    assert len(config.id2label) == count and config.id2label[0] == first and config.id2label[count - 1] == last
    assert config.label2id[last] == count - 1
    tasks = config.get_tasks()
    assert tasks[task].class_names == tuple(config.id2label.values())
    if "depth" in tasks:
        assert tasks["depth"].unit == unit and f"unit: {unit}" in tasks["depth"].card_line()
    if "parts" in tasks:
        assert tasks["parts"].class_names[:3] == ("background", "head", "torso")
    # Another class count drops the preset's names instead of failing; given names win.
    assert CTALConfig.from_preset(preset, num_semseg_classes=4).id2label == {i: f"LABEL_{i}" for i in range(4)}
    renamed = CTALConfig.from_preset(
        preset, num_semseg_classes=2, task_specs={"semseg": {"class_names": ["no", "yes"]}}
    )
    assert renamed.id2label == {0: "no", 1: "yes"}


def test_descriptions_of_built_in_tasks_are_checked():
    with pytest.raises(ValueError, match="may only describe it"):
        CTALConfig(tasks=["semseg"], task_specs={"semseg": {"num_channels": 4}})
    with pytest.raises(ValueError, match="must list 3 distinct non-empty names"):
        CTALConfig(tasks=["semseg"], num_semseg_classes=3, task_specs={"semseg": {"class_names": ["a", "a", "b"]}})
    with pytest.raises(ValueError, match="does not apply to normals tasks"):
        CTALConfig(tasks=["normals"], task_specs={"normals": {"unit": "metres"}})
    # An id2label that does not fit the classes (a stale config.json, transformers' two defaults) gives way to them.
    described = {"semseg": {"class_names": ["a", "b"]}}
    assert CTALConfig(
        tasks=["semseg"], num_semseg_classes=2, task_specs=described, id2label={0: "x", 1: "y"}
    ).id2label == {
        0: "a",
        1: "b",
    }
    assert CTALConfig(tasks=["semseg"], num_semseg_classes=3, id2label={0: "wall"}).id2label[2] == "LABEL_2"
    assert CTALConfig(tasks=["semseg"], num_semseg_classes=2, id2label={0: "x", 1: "y"}).label2id == {"x": 0, "y": 1}
