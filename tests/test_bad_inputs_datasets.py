"""Bad input to the dataset builders and `publish`: normals that are not unit vectors are refused with the file and
the fix named; `publish` argument mistakes are refused (exit code 2) before anything is built or written."""

import numpy as np
import pytest
from datasets.exceptions import DatasetGenerationError

from dataset_scripts import publish
from dataset_scripts.nyuv2 import NYUv2

H, W = 12, 16


def write_nyuv2(root, normals_of) -> None:
    """A tiny MTAN-layout NYUv2 folder (3 train, 2 val images); `normals_of(rng)` gives each normals array."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 2)):
        for folder in ("image", "label", "depth", "normal"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            np.save(root / split / "image" / f"{index}.npy", rng.random((H, W, 3)).astype(np.float32))
            np.save(root / split / "label" / f"{index}.npy", rng.integers(-1, 13, (H, W)).astype(np.float32))
            np.save(root / split / "depth" / f"{index}.npy", rng.uniform(0.5, 8, (H, W, 1)).astype(np.float32))
            np.save(root / split / "normal" / f"{index}.npy", normals_of(rng).astype(np.float32))


def unit_normals(rng) -> np.ndarray:
    normals = rng.normal(size=(H, W, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[0, :4] = 0.0  # invalid pixels
    return normals


def build(root, tmp_path):
    builder = NYUv2(data_dir=str(root), cache_dir=str(tmp_path / "cache"), image_size=(H, W))
    builder.download_and_prepare()
    return builder.as_dataset()


def test_normals_stored_in_unit_range_are_refused(tmp_path):
    root = tmp_path / "nyu"
    write_nyuv2(root, lambda rng: (unit_normals(rng) + 1.0) / 2.0)
    with pytest.raises((ValueError, DatasetGenerationError)) as info:
        build(root, tmp_path)
    message = str(info.value)
    assert "normal/0.npy" in message and "not unit vectors" in message and "2 * x - 1" in message, message


def test_normals_with_arbitrary_lengths_are_refused(tmp_path):
    root = tmp_path / "nyu"
    write_nyuv2(root, lambda rng: unit_normals(rng) * rng.uniform(0.2, 3.0, (H, W, 1)))
    with pytest.raises((ValueError, DatasetGenerationError), match="not unit vectors"):
        build(root, tmp_path)


def test_slightly_shortened_normals_are_kept(tmp_path):
    """Resizing shortens a few vectors (at depth edges); those are re-normalised, not refused."""

    def resized(rng):
        normals = unit_normals(rng)
        normals[5, :] *= 0.6  # one row of 16 of 192 pixels, as bilinear resizing does along an edge
        return normals

    root = tmp_path / "nyu"
    write_nyuv2(root, resized)
    rows = build(root, tmp_path)["train"].with_format("numpy")
    lengths = np.linalg.norm(rows[0]["normals"], axis=-1)
    assert np.allclose(lengths[lengths > 0], 1.0, atol=1e-5)


# -------------------------------------------------------------------------------------------------------- publish
@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["synthetic", "--num_train", "0"], "--num_train must be at least 1"),
        (["synthetic", "--num_validation", "-3"], "--num_validation must be at least 1"),
        (["synthetic", "--max_shard_size", "lots"], "--max_shard_size"),
        (["nyuv2", "--num_train", "5"], "synthetic dataset only"),
        (["nyuv2"], "--data_dir is required"),
        (["imagenet"], "unknown dataset 'imagenet'"),
    ],
)
def test_publish_refuses_bad_arguments(tmp_path, capsys, arguments, fragment):
    with pytest.raises(SystemExit) as exit_info:
        publish.main([*arguments, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_publish_output_dir_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "out.txt"
    blocker.write_text("mine")
    for target in (blocker, blocker / "sub"):
        with pytest.raises(SystemExit) as exit_info:
            publish.main(["synthetic", "--num_train", "1", "--num_validation", "1", "--output_dir", str(target)])
        assert exit_info.value.code == 2
        assert "out.txt" in capsys.readouterr().err
    assert blocker.read_text() == "mine"


def test_publish_missing_data_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        publish.main(["nyuv2", "--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "out")])
    assert "nowhere" in capsys.readouterr().err
