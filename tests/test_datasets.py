"""The real-dataset builders on tiny folders written in each public layout (MTAN .npy, PASCAL-MT JPEG / PNG /
.mat), their error messages on broken folders, publishing as Parquet (folder and local Hub mirror), and the real
samples of ../shared/realdata converted to those layouts."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import scipy.io as sio
from datasets.exceptions import DatasetGenerationError
from PIL import Image

from dataset_scripts import publish
from dataset_scripts.cityscapes import Cityscapes
from dataset_scripts.nyuv2 import NYUv2
from dataset_scripts.pascal_context import (
    HUMAN_PART_IDS,
    NORMALS_VALID_CLASSES,
    PascalContext,
    edges_from_label_map,
    thin,
)

H, W = 12, 16


# ----------------------------------------------------------------------------------------------------------------
# Layout writers
# ----------------------------------------------------------------------------------------------------------------
def write_mtan(root: Path, counts=None, size=(H, W), folders=None, label_dtype=np.float32, seed=0) -> dict:
    """MTAN folders with random content; returns the arrays written, keyed (split, folder, index)."""
    counts = counts or {"train": 3, "val": 2}
    folders = folders or {"image": 3, "label": 13, "depth": 1, "normal": 3}
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in counts.items():
        for folder, spec in folders.items():
            (root / split / folder).mkdir(parents=True, exist_ok=True)
            for index in range(count):
                if folder == "image":
                    array = rng.random((*size, 3)).astype(np.float32)
                elif folder.startswith("label"):
                    array = rng.integers(-1, spec, size).astype(label_dtype)
                elif folder == "depth":
                    array = rng.uniform(0.5, 8.0, (*size, 1)).astype(np.float32)
                    array[0, :3] = 0.0
                else:
                    array = rng.normal(size=(*size, 3)).astype(np.float32)
                    array /= np.linalg.norm(array, axis=-1, keepdims=True)
                    array[-1, :2] = 0.0
                np.save(root / split / folder / f"{index}.npy", array)
                written[(split, folder, index)] = array
    return written


def _parts_struct(parts):
    if not parts:
        return np.zeros((0, 0))
    out = np.zeros((1, len(parts)), dtype=[("part_name", "O"), ("mask", "O")])
    for i, (name, mask) in enumerate(parts):
        out[0, i]["part_name"] = name
        out[0, i]["mask"] = mask.astype(np.uint8)
    return out


def write_parts_mat(path: Path, image_name: str, objects) -> None:
    """A PASCAL-Part `anno` struct as in PASCAL-MT's human_parts/: objects = [(class, class_ind, mask, parts)]."""
    objs = np.zeros((1, len(objects)), dtype=[("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")])
    for i, (name, class_ind, mask, parts) in enumerate(objects):
        objs[0, i]["class"] = name
        objs[0, i]["class_ind"] = np.array([[class_ind]], dtype=np.uint8)
        objs[0, i]["mask"] = mask.astype(np.uint8)
        objs[0, i]["parts"] = _parts_struct(parts)
    anno = np.zeros((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0]["imname"] = image_name
    anno[0, 0]["objects"] = objs
    sio.savemat(path, {"anno": anno})


def write_pascal_image(root: Path, image_id: str, rgb, semseg, objects, saliency, normals_rgb, label_map, voc=False):
    for sub in ("JPEGImages", "semseg/VOC12", "semseg/pascal-context", "human_parts", "sal_distill"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "normals_distill").mkdir(exist_ok=True)
    (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
    Image.fromarray(semseg).save(root / "semseg" / ("VOC12" if voc else "pascal-context") / f"{image_id}.png")
    write_parts_mat(root / "human_parts" / f"{image_id}.mat", f"{image_id}.jpg", objects)
    Image.fromarray(saliency).save(root / "sal_distill" / f"{image_id}.png")
    Image.fromarray(normals_rgb).save(root / "normals_distill" / f"{image_id}.png")
    sio.savemat(root / "pascal-context" / "trainval" / f"{image_id}.mat", {"LabelMap": label_map.astype(np.uint16)})


def write_splits(root: Path, train_ids, val_ids):
    (root / "ImageSets" / "Context").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Context" / "train.txt").write_text("\n".join(train_ids) + "\n")
    (root / "ImageSets" / "Context" / "val.txt").write_text("\n".join(val_ids) + "\n")


def tiny_pascal(root: Path, h=20, w=24) -> dict:
    """Three images: a person with parts (VOC12 semseg), a dog only, a person without part annotations."""
    rng = np.random.default_rng(1)
    info = {}
    for k, image_id in enumerate(["2008_000001", "2008_000002", "2009_000003"]):
        rgb = rng.integers(0, 255, (h, w + k, 3), dtype=np.uint8)
        semseg = rng.integers(0, 21, (h, w + k)).astype(np.uint8)
        semseg[0, 0] = 255
        person = np.zeros((h, w + k), dtype=bool)
        person[4:16, 6:14] = True
        head = np.zeros_like(person)
        head[4:7, 8:12] = True
        torso = np.zeros_like(person)
        torso[7:12, 6:14] = True
        leg = np.zeros_like(person)
        leg[12:16, 7:10] = True
        if k == 0:
            objects = [
                (
                    "person",
                    15,
                    person,
                    [("head", head), ("hair", head & (np.arange(w + k) < 9)), ("torso", torso), ("rlleg", leg)],
                ),
                ("dog", 12, ~person, []),
            ]
        elif k == 1:
            objects = [("dog", 12, person, [])]
        else:
            objects = [("person", 15, person, [])]
        saliency = rng.integers(0, 256, (h, w + k)).astype(np.uint8)
        normals_rgb = rng.integers(0, 256, (h, w + k, 3)).astype(np.uint8)
        label_map = np.full((h, w + k), 440, dtype=np.uint16)  # wall: a normals class
        label_map[:, : (w + k) // 2] = 360  # sky: not an indoor class
        label_map[3:9, 3:9] = 284  # person: an indoor class
        write_pascal_image(root, image_id, rgb, semseg, objects, saliency, normals_rgb, label_map, voc=(k == 0))
        info[image_id] = dict(rgb=rgb, semseg=semseg, saliency=saliency, normals_rgb=normals_rgb, label_map=label_map)
        info[image_id]["parts"] = (head, torso, leg)
    write_splits(root, ["2008_000001", "2008_000002"], ["2009_000003"])
    return info


def cache_leftovers(cache: Path) -> list[str]:
    """Everything a build left in a cache apart from lock files (none after a failure)."""
    if not cache.exists():
        return []
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock")


# ----------------------------------------------------------------------------------------------------------------
# NYUv2 / Cityscapes (MTAN)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label_dtype", [np.float32, np.float64, np.int64, np.int16])
def test_nyuv2_rows_match_files(tmp_path, label_dtype):
    written = write_mtan(tmp_path / "nyu", label_dtype=label_dtype)
    builder = NYUv2(data_dir=str(tmp_path / "nyu"), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset()
    assert set(ds) == {"train", "validation"}
    assert ds["train"].num_rows == 3 and ds["validation"].num_rows == 2
    features = ds["train"].features
    assert features["image"] == datasets.Array3D((H, W, 3), "uint8")
    assert features["semseg"] == datasets.Array2D((H, W), "uint8")
    assert features["depth"] == datasets.Array2D((H, W), "float32")
    assert features["normals"] == datasets.Array3D((H, W, 3), "float32")
    for split, folder in (("train", "train"), ("validation", "val")):
        rows = ds[split].with_format("numpy")
        for index in range(rows.num_rows):
            row = rows[index]
            assert row["id"] == f"{split}/{index}"
            np.testing.assert_array_equal(row["image"], np.rint(written[(folder, "image", index)] * 255))
            label = written[(folder, "label", index)]
            np.testing.assert_array_equal(row["semseg"], np.where(label == -1, 255, label))
            np.testing.assert_array_equal(row["depth"], written[(folder, "depth", index)][..., 0])
            np.testing.assert_allclose(row["normals"], written[(folder, "normal", index)], atol=1e-6)
    torch_row = ds["train"].with_format("torch")[0]
    assert tuple(torch_row["normals"].shape) == (H, W, 3) and tuple(torch_row["depth"].shape) == (H, W)


@pytest.mark.parametrize("config_name, folder, num_classes", [("19class", "label_19", 19), ("7class", "label_7", 7)])
def test_cityscapes_configs(tmp_path, config_name, folder, num_classes):
    folders = {"image": 3, "label_7": 7, "label_19": 19, "depth": 1}
    written = write_mtan(tmp_path / "cs", folders=folders, size=(8, 16))
    builder = Cityscapes(config_name=config_name, data_dir=str(tmp_path / "cs"), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset().with_format("numpy")
    assert set(ds["train"].column_names) == {"id", "image", "semseg", "depth"}
    label = written[("val", folder, 1)]
    np.testing.assert_array_equal(ds["validation"][1]["semseg"], np.where(label == -1, 255, label))
    np.testing.assert_array_equal(ds["validation"][1]["depth"], written[("val", "depth", 1)][..., 0])
    assert ds["train"][0]["semseg"][ds["train"][0]["semseg"] != 255].max() < num_classes


def _break_missing_folder(root):
    import shutil

    shutil.rmtree(root / "val" / "depth")
    return "val/depth", "Missing folder"


def _break_missing_file(root):
    (root / "train" / "label" / "1.npy").unlink()
    return "label/1.npy", "Mismatched counts"


def _break_extra_image(root):
    np.save(root / "val" / "image" / "7.npy", np.zeros((H, W, 3), np.float32))
    return "label/7.npy", "Mismatched counts"


def _break_truncated(root):
    path = root / "train" / "depth" / "2.npy"
    path.write_bytes(path.read_bytes()[:-40])
    return "train/depth/2.npy", "truncated"


def _break_wrong_shape(root):
    np.save(root / "val" / "normal" / "0.npy", np.zeros((H, W + 1, 3), np.float32))
    return "val/normal/0.npy", "wrong shape"


def _break_label_range(root):
    np.save(root / "train" / "label" / "0.npy", np.full((H, W), 13.0, np.float32))
    return "train/label/0.npy", "label out of range"


def _break_label_fraction(root):
    np.save(root / "val" / "label" / "1.npy", np.full((H, W), 2.5, np.float32))
    return "val/label/1.npy", "non-integer"


def _break_not_npy(root):
    (root / "train" / "image" / "0.npy").write_bytes(b"not a numpy file at all")
    return "train/image/0.npy", "not a readable .npy"


@pytest.mark.parametrize(
    "breaker",
    [
        _break_missing_folder,
        _break_missing_file,
        _break_extra_image,
        _break_truncated,
        _break_wrong_shape,
        _break_label_range,
        _break_label_fraction,
        _break_not_npy,
    ],
)
def test_nyuv2_bad_data_names_file_and_leaves_no_cache(tmp_path, breaker):
    root = tmp_path / "nyu"
    write_mtan(root)
    needle, problem = breaker(root)
    cache = tmp_path / "cache"
    builder = NYUv2(data_dir=str(root), cache_dir=str(cache), image_size=(H, W))
    with pytest.raises((ValueError, FileNotFoundError, DatasetGenerationError)) as info:
        builder.download_and_prepare()
    message = str(info.value)
    assert needle in message and problem in message, message
    assert cache_leftovers(cache) == []
    # After repairing the folder the same cache builds cleanly.
    import shutil

    shutil.rmtree(root)
    write_mtan(root)
    builder = NYUv2(data_dir=str(root), cache_dir=str(cache), image_size=(H, W))
    builder.download_and_prepare()
    assert builder.as_dataset()["train"].num_rows == 3


def test_nyuv2_missing_root_and_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        NYUv2(data_dir=str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "c")).download_and_prepare()
    with pytest.raises(ValueError, match="data_dir"):
        NYUv2(cache_dir=str(tmp_path / "c")).download_and_prepare()


# ----------------------------------------------------------------------------------------------------------------
# PASCAL-Context (PASCAL-MT)
# ----------------------------------------------------------------------------------------------------------------
def test_pascal_context_rows(tmp_path):
    root = tmp_path / "PASCAL_MT"
    info = tiny_pascal(root)
    pad = (32, 32)
    builder = PascalContext(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), pad_size=pad)
    builder.download_and_prepare()
    ds = builder.as_dataset().with_format("numpy")
    assert ds["train"].num_rows == 2 and ds["validation"].num_rows == 1
    assert {"image", "semseg", "parts", "saliency", "normals", "edge", "height", "width"} <= set(ds["train"].features)
    rows = {row["id"]: row for split in ds for row in ds[split]}
    valid = np.asarray(NORMALS_VALID_CLASSES)
    for image_id, src in info.items():
        row = rows[image_id]
        h, w = src["semseg"].shape
        assert (row["height"], row["width"]) == (h, w)
        jpeg = np.array(Image.open(root / "JPEGImages" / f"{image_id}.jpg").convert("RGB"))
        np.testing.assert_array_equal(row["image"][:h, :w], jpeg)
        assert (row["image"][h:] == 0).all() and (row["image"][:, w:] == 0).all()
        np.testing.assert_array_equal(row["semseg"][:h, :w], src["semseg"])
        assert (row["semseg"][h:] == 255).all() and (row["edge"][:, w:] == 255).all()
        np.testing.assert_array_equal(row["saliency"][:h, :w], (src["saliency"] / 255.0 > 0.5).astype(np.uint8))
        normals = row["normals"][:h, :w]
        mask = np.isin(src["label_map"], valid)
        assert mask.any() and (~mask).any()
        assert (normals[~mask] == 0).all()
        expected = 2.0 * src["normals_rgb"].astype(np.float32) / 255.0 - 1.0
        expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
        np.testing.assert_allclose(normals[mask], expected[mask], atol=1e-5)
        np.testing.assert_array_equal(row["edge"][:h, :w], edges_from_label_map(src["label_map"]))
    head, torso, leg = info["2008_000001"]["parts"]
    parts = rows["2008_000001"]["parts"][:20, :24]
    assert (parts[head] == HUMAN_PART_IDS["head"]).all() and (parts[torso] == 2).all() and (parts[leg] == 6).all()
    assert (parts[~(head | torso | leg)] == 0).all()  # person image: background 0
    assert (rows["2008_000002"]["parts"] == 255).all()  # no person
    assert (rows["2009_000003"]["parts"] == 255).all()  # person without part annotations
    assert not (tmp_path / "PASCAL_MT" / "ImageSets" / "Parts").exists()  # nothing written into the data folder


def test_edges_lie_on_label_changes_and_are_thin():
    rng = np.random.default_rng(3)
    label_map = np.zeros((40, 50), dtype=np.int64)
    for _ in range(6):
        y, x = rng.integers(0, 35), rng.integers(0, 45)
        label_map[y : y + rng.integers(4, 15), x : x + rng.integers(4, 15)] = rng.integers(1, 400)
    edge = edges_from_label_map(label_map).astype(bool)
    padded = np.pad(label_map, 1, mode="edge")
    differs = np.zeros_like(edge)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        differs |= padded[dy : dy + 40, dx : dx + 50] != label_map
    assert edge.any() and (edge <= differs).all()  # every edge pixel touches another label
    # Every label change keeps an edge pixel next to it (thinning removes one side of the 2-pixel band).
    change = label_map[:, :-1] != label_map[:, 1:]
    ys, xs = np.nonzero(change)
    near = np.pad(edge, 1)
    assert all(near[y : y + 3, x : x + 4].any() for y, x in zip(ys, xs, strict=True))
    # Thin: a 2-pixel band becomes one pixel wide, a filled block keeps one connected component.
    band = np.zeros((10, 20), dtype=bool)
    band[4:6, 2:18] = True
    thinned = thin(band)
    assert thinned.sum() < band.sum() and (thinned.sum(axis=0)[3:17] == 1).all()
    from scipy import ndimage

    block = np.zeros((20, 20), dtype=bool)
    block[3:17, 5:15] = True
    assert ndimage.label(thin(block), structure=np.ones((3, 3)))[1] == 1


@pytest.mark.parametrize("problem", ["missing_parts", "semseg_range", "size", "too_large", "split_list"])
def test_pascal_context_bad_data(tmp_path, problem):
    root = tmp_path / "pc"
    tiny_pascal(root)
    pad = (32, 32)
    if problem == "missing_parts":
        (root / "human_parts" / "2009_000003.mat").unlink()
        needle, kind = "human_parts/2009_000003.mat", "Missing file"
    elif problem == "semseg_range":
        Image.fromarray(np.full((20, 25), 30, np.uint8)).save(root / "semseg" / "pascal-context" / "2008_000002.png")
        needle, kind = "2008_000002.png", "label out of range"
    elif problem == "size":
        Image.fromarray(np.zeros((19, 24), np.uint8)).save(root / "sal_distill" / "2008_000001.png")
        needle, kind = "sal_distill/2008_000001.png", "wrong shape"
    elif problem == "too_large":
        pad = (16, 32)
        needle, kind = "JPEGImages/2008_000001.jpg", "larger than pad_size"
    else:
        (root / "ImageSets" / "Context" / "val.txt").unlink()
        needle, kind = "val.txt", "Missing file"
    cache = tmp_path / "cache"
    builder = PascalContext(data_dir=str(root), cache_dir=str(cache), pad_size=pad)
    with pytest.raises((ValueError, FileNotFoundError, DatasetGenerationError)) as info:
        builder.download_and_prepare()
    assert needle in str(info.value) and kind in str(info.value), str(info.value)
    assert cache_leftovers(cache) == []


# ----------------------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------------------
def _rows(ds):
    return [
        {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in row.items()} for row in ds.with_format("numpy")
    ]


def _assert_same(a: datasets.DatasetDict, b: datasets.DatasetDict):
    assert set(a) == set(b)
    for split in a:
        assert a[split].features == b[split].features
        assert _rows(a[split]) == _rows(b[split])


def test_publish_folder_and_local_hub(tmp_path, hub_mirror, monkeypatch):
    write_mtan(tmp_path / "nyu", counts={"train": 2, "val": 2})
    built = publish.build("nyuv2", data_dir=str(tmp_path / "nyu"), cache_dir=str(tmp_path / "cache"))
    out = tmp_path / "tiny-nyuv2"
    publish.main(
        [
            "nyuv2",
            "--data_dir",
            str(tmp_path / "nyu"),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--output_dir",
            str(out),
        ]
    )
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        "train-00000-of-00001.parquet",
        "validation-00000-of-00001.parquet",
    ]
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "array3_d" in card and "NYUv2" in card and "data/train-*" in card
    _assert_same(built, datasets.load_dataset(str(out), cache_dir=str(tmp_path / "c1")))

    hub_mirror.add_repo("dataset", "testorg/tiny-nyuv2", out)
    hub_mirror.use(monkeypatch)
    from_hub = datasets.load_dataset("testorg/tiny-nyuv2", cache_dir=str(tmp_path / "c2"))
    _assert_same(built, from_hub)
    import huggingface_hub

    assert huggingface_hub.constants.ENDPOINT == hub_mirror.endpoint
    files = huggingface_hub.list_repo_files("testorg/tiny-nyuv2", repo_type="dataset")
    assert "README.md" in files and "data/train-00000-of-00001.parquet" in files
    # The parquet came through the mirror into the (temporary) Hub cache.
    hub_cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    assert list(hub_cache.glob("datasets--testorg--tiny-nyuv2/snapshots/*/README.md"))


def test_publish_push_uses_card_then_push_to_hub(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["repo_type"]))

        def upload_file(self, **kwargs):
            calls.append(
                ("upload_file", kwargs["repo_id"], kwargs["path_in_repo"], kwargs["path_or_fileobj"].decode())
            )

    def fake_push(self, repo_id, **kwargs):
        calls.append(("push_to_hub", repo_id, kwargs["config_name"], sorted(self)))

    monkeypatch.setattr(datasets.DatasetDict, "push_to_hub", fake_push)
    ds = publish.build(
        "synthetic", config="pascal", cache_dir=str(tmp_path / "c"), num_train=2, num_validation=1, image_size=(32, 32)
    )
    publish.push("synthetic", ds, "org/synthetic-pascal", api=FakeApi())
    assert [c[0] for c in calls] == ["create_repo", "upload_file", "push_to_hub"]
    assert calls[1][2] == "README.md" and "SyntheticScenes" in calls[1][3] and "split: validation" in calls[1][3]
    assert calls[2] == ("push_to_hub", "org/synthetic-pascal", "default", ["train", "validation"])


def test_pascal_context_task_subset(tmp_path):
    tiny_pascal(tmp_path / "pc")
    builder = PascalContext(
        data_dir=str(tmp_path / "pc"), cache_dir=str(tmp_path / "c"), pad_size=(32, 32), tasks=("semseg", "edge")
    )
    builder.download_and_prepare()
    assert builder.as_dataset()["train"].column_names == ["id", "image", "semseg", "edge", "height", "width"]
    with pytest.raises(ValueError, match="tasks"):
        PascalContext(data_dir=str(tmp_path / "pc"), tasks=("depth",))


def test_publish_shards_round_trip(tmp_path):
    ds = publish.build("synthetic", cache_dir=str(tmp_path / "c"), num_train=3, num_validation=2, image_size=(32, 32))
    out = publish.write_parquet_folder("synthetic", ds, tmp_path / "out", max_shard_size=1)
    assert len(list((out / "data").glob("train-*-of-00003.parquet"))) == 3
    _assert_same(ds, datasets.load_dataset(str(out), cache_dir=str(tmp_path / "c2")))


def test_cards_exist_with_yaml():
    for name in publish.BUILDERS:
        text = publish.card_template(name)
        assert text.startswith("---\n") and "license:" in text and "| column |" in text


# ----------------------------------------------------------------------------------------------------------------
# Real samples (../shared/realdata) converted to the public layouts
# ----------------------------------------------------------------------------------------------------------------
def _resize(array, size, resample):
    return np.array(Image.fromarray(array).resize((size[1], size[0]), resample))


def test_realdata_nyuv2_in_mtan_layout(tmp_path, realdata):
    src = realdata / "nyuv2-433"
    rgb = np.array(Image.open(src / "000433.png").convert("RGB"))
    seg40 = np.array(Image.open(src / "segm_gt_000433.png"))
    depth_raw = np.array(Image.open(src / "depth_gt_000433.png"))
    normal_rgb = np.array(Image.open(src / "norm_gt_000433.png").convert("RGB"))
    mapping = sio.loadmat(realdata / "nyuv2-meta" / "class13Mapping.mat")["classMapping13"]["labels13"][0, 0].ravel()
    size = (288, 384)
    label40 = _resize(seg40, size, Image.NEAREST)
    label13 = np.where(label40 == 255, -1, mapping[np.minimum(label40, 39)].astype(np.int64) - 1).astype(np.float32)
    depth = _resize(depth_raw.astype(np.float32) / 5000.0, size, Image.NEAREST)[..., None]
    invalid = (normal_rgb == 127).all(-1)
    normals = 2.0 * normal_rgb.astype(np.float32) / 255.0 - 1.0
    normals[invalid] = 0.0
    normals = np.stack([_resize(normals[..., c], size, Image.NEAREST) for c in range(3)], -1)
    image = _resize(rgb, size, Image.BILINEAR).astype(np.float32) / 255.0
    root = tmp_path / "nyuv2"
    for split in ("train", "val"):
        for folder, array in (("image", image), ("label", label13), ("depth", depth), ("normal", normals)):
            (root / split / folder).mkdir(parents=True)
            np.save(root / split / folder / "0.npy", array)
    builder = NYUv2(data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    row = builder.as_dataset()["validation"].with_format("numpy")[0]
    assert row["image"].shape == (288, 384, 3)
    np.testing.assert_array_equal(row["semseg"], np.where(label13 < 0, 255, label13))
    present = set(np.unique(row["semseg"]).tolist())
    assert 255 in present and len(present - {255}) >= 3 and max(present - {255}) <= 12
    np.testing.assert_allclose(row["depth"], depth[..., 0])
    valid = row["depth"] > 0
    assert 0.5 < valid.mean() < 0.9 and 0.3 < np.median(row["depth"][valid]) < 10.0
    norms = np.linalg.norm(row["normals"], axis=-1)
    assert np.allclose(norms[norms > 0], 1.0, atol=1e-5) and (norms == 0).any()


def test_realdata_cityscapes_in_mtan_layout(tmp_path, realdata):
    base = realdata / "cityscapes-frankfurt"
    rgb = np.array(Image.open(next(base.glob("leftImg8bit/val/*/*_leftImg8bit.png"))).convert("RGB"))
    train_ids = np.array(Image.open(next(base.glob("gtFine/val/*/*_labelTrainIds.png"))))
    # 19 train ids -> the 7 Cityscapes categories (flat, construction, object, nature, sky, human, vehicle).
    to7 = np.array([0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 5, 6, 6, 6, 6, 6, 6])
    label19 = np.where(train_ids == 255, -1, train_ids).astype(np.float32)
    label7 = np.where(train_ids == 255, -1, to7[np.minimum(train_ids, 18)]).astype(np.float32)
    disparity = np.zeros((128, 256, 1), np.float32)  # no disparity is published for this sample
    root = tmp_path / "cityscapes"
    for split in ("train", "val"):
        for folder, array in (("image", rgb), ("label_19", label19), ("label_7", label7), ("depth", disparity)):
            (root / split / folder).mkdir(parents=True)
            np.save(root / split / folder / "0.npy", array)
    for config_name, expected in (("19class", label19), ("7class", label7)):
        builder = Cityscapes(config_name=config_name, data_dir=str(root), cache_dir=str(tmp_path / "cache"))
        builder.download_and_prepare()
        row = builder.as_dataset()["train"].with_format("numpy")[0]
        np.testing.assert_array_equal(row["image"], rgb)
        np.testing.assert_array_equal(row["semseg"], np.where(expected < 0, 255, expected))
    assert set(np.unique(row["semseg"]).tolist()) <= set(range(7)) | {255}


def _decode_colour_labels(png: np.ndarray, cmap: np.ndarray) -> np.ndarray:
    lookup = {tuple(c): i for i, c in enumerate(cmap.astype(np.uint8).tolist())}
    flat = png.reshape(-1, 3)
    colours, inverse = np.unique(flat, axis=0, return_inverse=True)
    ids = np.array([lookup.get(tuple(c), 255) for c in colours.tolist()])
    return ids[inverse.ravel()].reshape(png.shape[:2])


def test_realdata_pascal_in_pascal_mt_layout(tmp_path, realdata):
    root = tmp_path / "PASCALContext"
    context_ids, person_ids = [], []
    expected = {}
    cmap = np.load(realdata / "pascal-context" / "cmap.npy")
    for jpg in sorted((realdata / "pascal-context").glob("*.jpg")):
        image_id = jpg.stem
        rgb = np.array(Image.open(jpg).convert("RGB"))
        labels59 = _decode_colour_labels(np.array(Image.open(jpg.with_suffix(".png")).convert("RGB")), cmap)
        assert (labels59 != 255).all() and labels59.max() <= 59
        semseg = np.where(labels59 <= 20, labels59, 0).astype(np.uint8)  # the 20 VOC classes + background
        objects = [("object", 1, labels59 > 0, [])]
        saliency = ((labels59 > 0) * 255).astype(np.uint8)
        normals_rgb = np.full((*rgb.shape[:2], 3), (128, 128, 255), np.uint8)
        write_pascal_image(root, image_id, rgb, semseg, objects, saliency, normals_rgb, labels59)
        context_ids.append(image_id)
        expected[image_id] = {"semseg": semseg, "labels": labels59, "parts": None}
    part_names = {1: "head", 2: "torso", 3: "luarm", 4: "llarm", 5: "luleg", 6: "llleg"}
    for jpg in sorted((realdata / "pascal-person-part").glob("*.jpg")):
        image_id = jpg.stem
        rgb = np.array(Image.open(jpg).convert("RGB"))
        part_ids = np.array(Image.open(jpg.with_suffix(".png")))
        person = part_ids > 0
        parts = [(part_names[p], part_ids == p) for p in range(1, 7) if (part_ids == p).any()]
        semseg = np.where(person, 15, 0).astype(np.uint8)
        label_map = np.where(person, 284, 0).astype(np.uint16)
        normals_rgb = np.full((*rgb.shape[:2], 3), (128, 128, 255), np.uint8)
        write_pascal_image(
            root, image_id, rgb, semseg, [("person", 15, person, parts)], semseg * 17, normals_rgb, label_map
        )
        person_ids.append(image_id)
        expected[image_id] = {"semseg": semseg, "labels": label_map, "parts": part_ids}
    write_splits(root, context_ids[:2] + person_ids[:2], context_ids[2:] + person_ids[2:])
    builder = PascalContext(data_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    builder.download_and_prepare()
    ds = builder.as_dataset().with_format("numpy")
    assert ds["train"].num_rows == 4 and ds["validation"].num_rows == 4
    for split in ds:
        for row in ds[split]:
            want = expected[row["id"]]
            h, w = row["height"], row["width"]
            np.testing.assert_array_equal(row["semseg"][:h, :w], want["semseg"])
            if want["parts"] is None:
                assert (row["parts"] == 255).all()
            else:
                np.testing.assert_array_equal(row["parts"][:h, :w], want["parts"])
            edge = row["edge"][:h, :w].astype(bool)
            padded = np.pad(want["labels"], 1, mode="edge")
            touches = np.zeros_like(edge)
            for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
                touches |= padded[dy : dy + h, dx : dx + w] != want["labels"]
            assert edge.any() and (edge <= touches).all()
            normals = row["normals"][:h, :w]
            on_person = want["labels"] == 284
            assert (normals[~on_person & ~np.isin(want["labels"], NORMALS_VALID_CLASSES)] == 0).all()
            if on_person.any():
                np.testing.assert_allclose(np.linalg.norm(normals[on_person], axis=-1), 1.0, atol=1e-5)
    json.dumps(ds["train"].features.to_dict())  # features serialise (for the card)
