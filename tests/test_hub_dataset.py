"""NYUv2 straight from the Hub: `--dataset tanganke/nyuv2` reads that copy's Parquet layout (MTAN arrays, channels
first, float images in [0, 1], -1 void, a `noise` column) through the real `datasets.load_dataset` path, from a local
folder and from the local Hub mirror, with no conversion step; other copies through `--column_mapping`."""

import argparse
import json
import math
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from ctal_hf import CTALConfig
from ctal_hf.data import CTALTorchDataset, CTALTransform
from ctal_hf.dataset_classes import NYUV2_CLASSES
from ctal_hf.training.arguments import parse_args
from ctal_hf.training.building import resolve_recipe
from ctal_hf.training.data_loading import load_splits
from ctal_hf.training.hub_datasets import HUB_DATASETS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HEIGHT, WIDTH = 288, 384
ROWS = {"train": 3, "val": 2}

# The schema of tanganke/nyuv2 as its dataset card lists it.
FEATURES = datasets.Features(
    {
        "image": datasets.Array3D((3, HEIGHT, WIDTH), "float32"),
        "segmentation": datasets.Array2D((HEIGHT, WIDTH), "int64"),
        "depth": datasets.Array3D((1, HEIGHT, WIDTH), "float32"),
        "normal": datasets.Array3D((3, HEIGHT, WIDTH), "float32"),
        "noise": datasets.Array3D((1, HEIGHT, WIDTH), "float32"),
    }
)

CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: val
    path: data/val-*
---
# NYUv2 (MTAN layout), a few rows with the schema of tanganke/nyuv2, written for the tests
"""


def rows(split: str, count: int) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng({"train": 0, "val": 1}[split])
    columns = {name: [] for name in FEATURES}
    for _ in range(count):
        segmentation = rng.integers(-1, 13, (HEIGHT, WIDTH), dtype=np.int64)
        depth = rng.uniform(0.5, 10.0, (1, HEIGHT, WIDTH)).astype(np.float32)
        depth[:, :10] = 0.0  # missing
        normal = rng.normal(size=(3, HEIGHT, WIDTH)).astype(np.float32)
        normal /= np.linalg.norm(normal, axis=0, keepdims=True)
        columns["image"].append(rng.uniform(0.0, 1.0, (3, HEIGHT, WIDTH)).astype(np.float32))
        columns["segmentation"].append(segmentation)
        columns["depth"].append(depth)
        columns["normal"].append(normal)
        columns["noise"].append(rng.normal(size=(1, HEIGHT, WIDTH)).astype(np.float32))
    return columns


@pytest.fixture(scope="module")
def nyuv2_copy(tmp_path_factory) -> Path:
    """A folder laid out as the Hub repo tanganke/nyuv2: README.md with the split configs, Parquet under data/."""
    folder = tmp_path_factory.mktemp("tanganke-nyuv2")
    (folder / "data").mkdir()
    (folder / "README.md").write_text(CARD)
    for split, count in ROWS.items():
        table = datasets.Dataset.from_dict(rows(split, count), features=FEATURES)
        table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def test_the_known_copy_is_data_and_picks_the_nyuv2_recipe():
    assert HUB_DATASETS["tanganke/nyuv2"].columns == {"segmentation": "semseg", "normal": "normals"}
    recipe = resolve_recipe(parse_args(["--dataset", "tanganke/nyuv2"]))
    assert recipe.name == "nyuv2" and recipe.learning_rate == 1e-4 and not recipe.normalize


def read_local(args: list[str]):
    namespace = parse_args(args)
    recipe = resolve_recipe(namespace)
    config = CTALConfig.from_preset(recipe.preset)
    return (*load_splits(namespace, recipe, list(config.tasks), config.image_size), config)


def test_rows_reach_the_model_contract_without_conversion(nyuv2_copy, monkeypatch, tmp_path):
    namespace = argparse.Namespace(
        dataset=str(nyuv2_copy), dataset_config=None, cache_dir=str(tmp_path / "cache"), data_dir=None,
        column_mapping={"segmentation": "semseg", "normal": "normals"}, max_train_samples=None,
        max_eval_samples=None,
    )  # fmt: skip
    recipe = resolve_recipe(parse_args(["--dataset", "tanganke/nyuv2"]))
    config = CTALConfig.from_preset(recipe.preset)
    train, validation, _, class_names = load_splits(namespace, recipe, list(config.tasks), config.image_size)
    assert (len(train), len(validation)) == (ROWS["train"], ROWS["val"])
    assert set(train.column_names) == {"image", "semseg", "depth", "normals"}  # renamed in place; no `noise`
    assert class_names is None  # a folder is not the known copy: no class names unless its recipe says so

    source = rows("val", 1)
    sample = CTALTorchDataset(validation, config, CTALTransform(config.image_size, train=False, normalize=False))[0]
    expected = np.where(source["segmentation"][0] < 0, 255, source["segmentation"][0])
    np.testing.assert_array_equal(sample["semseg"].numpy(), expected)  # -1 void -> the ignore index
    np.testing.assert_array_equal(sample["depth"][0].numpy(), source["depth"][0][0])
    np.testing.assert_allclose(sample["normals"].numpy(), source["normal"][0])
    torch.testing.assert_close(sample["image"], torch.from_numpy(source["image"][0]))  # not divided by 255 again


def test_a_wrong_column_mapping_names_the_column(nyuv2_copy, tmp_path):
    with pytest.raises(ValueError, match=r"names column\(s\) \['label'\] the dataset does not have"):
        read_local(["--dataset", str(nyuv2_copy), "--recipe", "nyuv2", "--cache_dir", str(tmp_path), "--column_mapping",
                    '{"label": "semseg"}'])  # fmt: skip
    with pytest.raises(SystemExit):
        parse_args(["--column_mapping", "[1, 2]"])


def test_the_hub_id_loads_through_the_mirror(nyuv2_copy, hub_mirror, monkeypatch, tmp_path):
    hub_mirror.add_repo("dataset", "tanganke/nyuv2", nyuv2_copy)
    hub_mirror.use(monkeypatch)
    train, validation, name, class_names, config = read_local(
        ["--dataset", "tanganke/nyuv2", "--cache_dir", str(tmp_path / "cache")]
    )
    assert name == "tanganke/nyuv2" and class_names == NYUV2_CLASSES
    assert (len(train), len(validation)) == (ROWS["train"], ROWS["val"])
    assert set(train.column_names) == {"image", "semseg", "depth", "normals"}
    assert config.id2label[12] == "window"


@pytest.mark.slow
def test_train_py_trains_the_nyuv2_recipe_from_the_hub_copy(nyuv2_copy, hub_mirror, monkeypatch, tmp_path):
    from accelerate.state import AcceleratorState

    hub_mirror.add_repo("dataset", "tanganke/nyuv2", nyuv2_copy)
    hub_mirror.use(monkeypatch)
    sys.path.insert(0, str(EXAMPLES))
    import train

    output = tmp_path / "out"
    argv = ["--dataset", "tanganke/nyuv2", "--cache_dir", str(tmp_path / "cache"), "--output_dir", str(output)]
    argv += ["--image_size", "64", "96", "--max_train_steps", "2", "--per_device_train_batch_size", "2"]
    argv += ["--num_prediction_images", "1", "--pretrained_backbone", "none"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        results = train.main(argv)
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
    assert results["dataset"] == "tanganke/nyuv2" and results["settings"]["recipe"] == "nyuv2"
    assert results["num_validation_images"] == ROWS["val"]
    for task in ("semseg", "depth", "normals"):
        assert all(math.isfinite(v) for v in results["final"][task].values()), task
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"]["0"] == "bed" and config["task_specs"]["depth"] == {"unit": "metres"}
    card = (output / "README.md").read_text()
    assert "unit: metres" in card and 'pipeline("depth-estimation"' in card
