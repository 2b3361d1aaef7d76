"""pipeline("dense-multitask"), the visualisations, the Fig.-4 figure helper and the `ctal-predict` CLI, on real
sample images (skipped when absent) and odd sizes, with models from a saved folder, a model object and the local
Hub mirror."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import calibrate_batch_norm
from transformers import pipeline

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor, DenseMultitaskPipeline
from ctal_hf.cli import main as cli_main
from ctal_hf.visualization import (
    colorize_depth,
    colorize_normals,
    colorize_segmentation,
    legend_patches,
    make_figure,
    palette,
)

ALL_TASKS = ["semseg", "depth", "normals", "saliency", "edge", "parts"]
NUM_CLASSES = {"semseg": 5, "parts": 7}


@pytest.fixture(scope="module")
def tiny_model() -> CTALForDenseMultitask:
    torch.manual_seed(0)
    config = CTALConfig(tasks=ALL_TASKS, image_size=[64, 64], num_semseg_classes=NUM_CLASSES["semseg"])
    return calibrate_batch_norm(CTALForDenseMultitask(config), batch=4)


@pytest.fixture(scope="module")
def saved_model(tiny_model, tmp_path_factory):
    """A folder as the training example writes it: model + processor, both with save_pretrained."""
    folder = tmp_path_factory.mktemp("ctal-tiny")
    tiny_model.save_pretrained(folder)
    CTALImageProcessor.from_model_config(tiny_model.config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def predictor(saved_model) -> DenseMultitaskPipeline:
    return pipeline("dense-multitask", model=str(saved_model), device="cpu")


def odd_images() -> list:
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (250, 333, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (61, 47, 4), dtype=np.uint8)
    return [rgb, PIL.Image.fromarray(rgb).convert("L"), PIL.Image.fromarray(rgba, mode="RGBA"), rgb[:33, :170]]


def input_size(image) -> tuple[int, int]:
    return (image.size[1], image.size[0]) if isinstance(image, PIL.Image.Image) else image.shape[:2]


def check_result(result: dict, size: tuple[int, int], tasks=ALL_TASKS):
    assert set(result) == {*tasks, "visualizations"}
    for task in tasks:
        value = result[task]
        assert isinstance(value, np.ndarray)
        assert value.shape[:2] == size, (task, value.shape, size)
        assert np.isfinite(value).all(), task
        if task in NUM_CLASSES:
            assert value.shape == size and value.dtype == np.int64
            assert 0 <= value.min() and value.max() < NUM_CLASSES[task], task
        elif task == "normals":
            assert value.shape == (*size, 3)
            np.testing.assert_allclose(np.linalg.norm(value, axis=-1), 1.0, atol=1e-4)
        elif task in ("saliency", "edge"):
            assert value.shape == size and 0 <= value.min() and value.max() <= 1
        else:
            assert value.shape == size
        picture = result["visualizations"][task]
        assert isinstance(picture, PIL.Image.Image) and picture.size == (size[1], size[0])


def assert_same_maps(first: dict, second: dict):
    """Equal up to float32 noise: a convolution may sum in another order for another batch size (~3e-5 on the raw
    maps, a little more where normalising a short normal vector amplifies it); mixing images would cost ~0.1."""
    for task, value in first.items():
        if task == "visualizations":
            continue
        other = second[task]
        if value.dtype == np.int64:
            assert (value == other).mean() > 0.999, task
        else:
            np.testing.assert_allclose(value, other, atol=1e-3, rtol=0, err_msg=task)


# ------------------------------------------------------------------------------------------------------- pipeline
def test_odd_sizes_grayscale_and_rgba(predictor):
    for image in odd_images():
        check_result(predictor(image), input_size(image))


def test_real_images_at_their_own_sizes(predictor, realdata):
    paths = sorted(realdata.glob("pascal-context/*.jpg"))[:2] + [realdata / "nyuv2-433" / "000433.png"]
    paths = [path for path in paths if path.is_file()]
    if not paths:
        pytest.skip("no sample images")
    results = predictor([str(path) for path in paths], batch_size=2)
    assert isinstance(results, list) and len(results) == len(paths)
    for path, result in zip(paths, results, strict=True):
        with PIL.Image.open(path) as image:
            check_result(result, (image.height, image.width))


def test_alone_or_in_a_batch_gives_the_same_result(predictor):
    images = odd_images()
    alone = [predictor(image) for image in images]
    batched = predictor(images, batch_size=3)
    assert len(batched) == len(images)
    for single, batch in zip(alone, batched, strict=True):
        assert_same_maps(single, batch)


def test_tasks_filter_and_no_visualizations(predictor):
    image = odd_images()[0]
    result = predictor(image, tasks=["depth", "normals"])
    assert set(result) == {"depth", "normals", "visualizations"}
    assert set(result["visualizations"]) == {"depth", "normals"}
    assert set(predictor(image, tasks="edge", visualize=False)) == {"edge"}
    with pytest.raises(ValueError, match=r"\['colour'\] requested, but this model predicts only"):
        predictor(image, tasks=["colour"])


def test_model_object_without_processor_builds_one_from_the_config(tiny_model):
    config = CTALConfig(tasks=["semseg", "depth"], image_size=[64, 96], num_semseg_classes=3)
    model = CTALForDenseMultitask(config)  # training mode: the pipeline must switch it to eval
    predictor = pipeline("dense-multitask", model=model, device="cpu")
    assert isinstance(predictor.image_processor, CTALImageProcessor)
    assert predictor.image_processor.image_size == (64, 96)
    assert not model.training
    check_result(predictor(odd_images()[0]), (250, 333), tasks=["semseg", "depth"])


def test_processor_of_another_size_is_refused(tiny_model):
    wrong = CTALImageProcessor(size={"height": 32, "width": 32})
    with pytest.raises(ValueError, match=r"resizes to \[32, 32\] but the model takes image_size \[64, 64\]"):
        pipeline("dense-multitask", model=tiny_model, image_processor=wrong, device="cpu")


def test_saved_processor_settings_are_used(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    CTALImageProcessor.from_model_config(tiny_model.config, do_normalize=False).save_pretrained(tmp_path)
    predictor = pipeline("dense-multitask", model=str(tmp_path), device="cpu")
    assert predictor.image_processor.do_normalize is False


def test_model_from_the_local_hub_mirror(hub_mirror, saved_model, monkeypatch):
    hub_mirror.add_repo("model", "testorg/ctal-tiny", saved_model)
    hub_mirror.use(monkeypatch)
    predictor = pipeline("dense-multitask", model="testorg/ctal-tiny", device="cpu")
    assert isinstance(predictor.image_processor, CTALImageProcessor)
    image = odd_images()[0]
    check_result(predictor(image), (250, 333))
    local = pipeline("dense-multitask", model=str(saved_model), device="cpu")
    assert_same_maps(predictor(image), local(image))


def test_saved_folder_runs_with_trust_remote_code_in_a_process_without_ctal_hf(saved_model, predictor, tmp_path):
    config = json.loads((saved_model / "config.json").read_text())
    assert config["custom_pipelines"] == {
        "dense-multitask": {"impl": "pipeline_ctal.DenseMultitaskPipeline", "pt": ["AutoModel"], "type": "image"}
    }
    saved_files = {path.name for path in saved_model.iterdir()}
    assert {"pipeline_ctal.py", "image_processing_ctal.py", "visualization.py", "tasks.py"} <= saved_files
    image = odd_images()[0]
    np.save(tmp_path / "image.npy", image)
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np, torch
        torch.set_num_threads(1)
        from transformers import pipeline
        image = np.load({str(tmp_path / "image.npy")!r})
        for task in ("dense-multitask", None):  # None: the folder declares a single pipeline, which is then used
            predictor = pipeline(task, model={str(saved_model)!r}, trust_remote_code=True, device="cpu")
            assert type(predictor).__module__.startswith("transformers_modules"), type(predictor).__module__
            result = predictor(image)
            pictures = result.pop("visualizations")
            assert {{task: picture.size for task, picture in pictures.items()}} == dict.fromkeys(result, (333, 250))
            np.savez({str(tmp_path)!r} + f"/{{task}}.npz", **result)
        assert "ctal_hf" not in sys.modules, "the package was imported"
        print("REMOTE-PIPELINE-OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE-PIPELINE-OK" in result.stdout, result.stderr[-3000:]
    expected = predictor(image)
    check_result(expected, (250, 333))
    for name in ("dense-multitask", "None"):
        with np.load(tmp_path / f"{name}.npz") as remote:
            assert set(remote.files) == set(ALL_TASKS)
            assert_same_maps(expected, {task: remote[task] for task in remote.files})


def test_bad_inputs_say_what_is_wrong(predictor, tmp_path):
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(ValueError, match="broken.jpg.*corrupt"):
        predictor(str(corrupt))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        predictor(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match=r"\(channels, height, width\) with 4 channels"):
        predictor(np.zeros((4, 40, 50), np.uint8))
    with pytest.raises(ValueError, match="got an object of type dict"):
        predictor({"not": "an image"})
    with pytest.raises(ValueError, match="Unknown argument"):
        predictor(np.zeros((40, 50, 3), np.uint8), colour=True)


# -------------------------------------------------------------------------------------------------- visualisation
def test_palette_and_colour_coding():
    colours = palette(256)
    assert colours.shape == (256, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 256 and tuple(colours[0]) == (0, 0, 0)
    np.testing.assert_array_equal(palette(13), colours[:13])
    labels = np.array([[0, 1], [2, 255]])
    coloured = colorize_segmentation(labels)
    np.testing.assert_array_equal(coloured[0, 1], colours[1])
    np.testing.assert_array_equal(coloured[1, 1], [255, 255, 255])  # ignore index
    assert len(legend_patches(["wall", "floor", "bed"])) == 3
    depth = colorize_depth(np.array([[0.0, 1.0], [2.0, 3.0]]))
    np.testing.assert_array_equal(depth[0, 0], [0, 0, 0])  # invalid
    assert not np.array_equal(depth[0, 1], depth[1, 1])
    normals = colorize_normals(np.array([[[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]]))
    np.testing.assert_array_equal(normals[0, 0], [128, 128, 255])
    np.testing.assert_array_equal(normals[0, 1], [0, 0, 0])
    with pytest.raises(ValueError, match="palette has 3 colours"):
        colorize_segmentation(np.array([[5]]), colours=palette(3))


def test_figure_with_ground_truth_row(predictor, realdata, tmp_path):
    folder = realdata / "nyuv2-433"
    if not (folder / "000433.png").is_file():
        pytest.skip("NYUv2 sample absent")
    image = PIL.Image.open(folder / "000433.png").convert("RGB")
    truth = {
        "semseg": np.asarray(PIL.Image.open(folder / "segm_gt_000433.png")),
        "depth": np.asarray(PIL.Image.open(folder / "depth_gt_000433.png"), dtype=np.float32) / 5000.0,
        "normals": np.asarray(PIL.Image.open(folder / "norm_gt_000433.png").convert("RGB"), np.float32) / 127.5 - 1,
    }
    truth["semseg"] = np.where(truth["semseg"] == 255, 255, truth["semseg"] % NUM_CLASSES["semseg"])
    prediction = predictor(image)
    path = tmp_path / "figure.png"
    figure = make_figure([image, image], [prediction, prediction], [truth, None], path=path)
    assert len([axis for axis in figure.axes if axis.get_visible()]) == 3 * 4  # 2 prediction rows + 1 GT row
    with PIL.Image.open(path) as saved:
        assert saved.format == "PNG" and saved.width > saved.height


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_writes_panels_and_maps(saved_model, tmp_path):
    images = []
    for index, image in enumerate(odd_images()[:2]):
        (tmp_path / f"in{index}").mkdir()
        path = tmp_path / f"in{index}" / "photo.png"  # same file name twice: outputs must not collide
        (PIL.Image.fromarray(image) if isinstance(image, np.ndarray) else image).save(path)
        images.append(str(path))
    out = tmp_path / "out"
    arguments = ["--model", str(saved_model), *images, "--output_dir", str(out), "--device", "cpu"]
    code = cli_main([*arguments, "--tasks", "semseg", "depth"])
    assert code == 0
    for stem in ("photo", "photo_1"):
        assert (out / f"{stem}_panel.png").is_file()
        for task in ("semseg", "depth"):
            assert np.load(out / f"{stem}_{task}.npy").shape == (250, 333)
            assert (out / f"{stem}_{task}.png").is_file()
        assert not (out / f"{stem}_normals.npy").exists()


def test_cli_reports_missing_images(saved_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--model", str(saved_model), str(tmp_path / "nope.jpg")])
    assert exit_info.value.code == 2
    assert "nope.jpg" in capsys.readouterr().err
