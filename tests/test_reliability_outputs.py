"""Issue 23, "nothing lost": every command's output is written beside its target and renamed into place, the source
of a command is never its destination, and an output folder in use by another run is refused (a lock file naming
the holder) unless the user says otherwise. train.py's share is in test_reliability_train.py."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import ConvNextConfig

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor
from ctal_hf.cli import main as predict_main
from ctal_hf.export_cli import main as export_main

torch.set_num_threads(1)


def _helpers():
    """The shared helper (imported per test, so each test of this file runs, and fails on its own, without it)."""
    from ctal_hf import atomic_outputs

    return atomic_outputs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    backbone = ConvNextConfig(
        num_stages=3, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], out_features=["stage1", "stage2", "stage3"]
    )
    config = CTALConfig(
        tasks=["semseg", "depth"], image_size=[64, 64], num_semseg_classes=4, decoder="mtl", backbone_config=backbone
    )
    folder = tmp_path_factory.mktemp("ctal-model")
    model = CTALForDenseMultitask(config).eval()
    model.save_pretrained(folder)
    CTALImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


def _image(folder: Path, name: str = "room.png") -> Path:
    path = folder / name
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def _run(main, argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def _files(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------ the helper
def test_atomic_folder_leaves_the_target_untouched_when_the_writer_fails(tmp_path):
    atomic_folder = _helpers().atomic_folder
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed while writing")
    assert _files(target) == {"old.txt": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    with atomic_folder(target, merge=True) as staging:
        (staging / "new.txt").write_text("new")
    assert _files(target) == {"old.txt": 3, "new.txt": 3}


def test_lock_names_its_holder_and_a_dead_holder_is_taken_over(tmp_path):
    OutputInUseError, OutputLock, lock_path = (
        _helpers().OutputInUseError,
        _helpers().OutputLock,
        _helpers().lock_path,
    )
    target = tmp_path / "out"
    with OutputLock(target, command="first run"):
        holder = json.loads(lock_path(target).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert holder["command"] == "first run" and holder["started"]
        with pytest.raises(OutputInUseError, match=r"pid \d+ on .*first run.*--ignore_lock"):
            OutputLock(target, command="second run").acquire()
        OutputLock(target, ignore_lock=True).acquire().release()  # told to: takes it over
    assert not lock_path(target).exists()
    # A lock left by a process that is gone (killed): taken over with a warning.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock_path(target).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with OutputLock(target, command="after a crash") as lock:
        assert lock.held
    assert not lock_path(target).exists()


def test_claimed_output_dir_removes_a_folder_it_created_when_nothing_was_written(tmp_path):
    claimed_output_dir = _helpers().claimed_output_dir
    target = tmp_path / "a" / "b"
    with pytest.raises(KeyError), claimed_output_dir(target):
        (target / "runs").mkdir(parents=True)  # empty folders only
        raise KeyError("first batch")
    assert not target.exists() and not (tmp_path / "a").exists()
    with pytest.raises(KeyError), claimed_output_dir(target):
        (target / "checkpoints").mkdir(parents=True)
        (target / "checkpoints" / "state.json").write_text("{}")
        raise KeyError("step 100")
    assert (target / "checkpoints" / "state.json").is_file()  # work was written: kept


@pytest.mark.parametrize(("source", "target"), [("m", "m"), ("m", "m/sub"), ("m/sub", "m")])
def test_the_source_is_never_the_destination(tmp_path, source, target):
    check_not_source = _helpers().check_not_source
    (tmp_path / "m" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="--output .* --model .*Choose another --output"):
        check_not_source(tmp_path / target, {"--model": tmp_path / source}, "--output")


# ------------------------------------------------------------------------------------------------ ctal-export
def test_export_refuses_to_write_into_the_model_folder(model_dir, tmp_path, capsys):
    before = _files(model_dir)
    code, err = _run(export_main, ["--model", str(model_dir), "--output", str(model_dir), "--overwrite"], capsys)
    assert code == 2 and "is the same folder as --model" in err, err
    code, err = _run(
        export_main, ["--model", str(model_dir), "--output", str(model_dir.parent), "--overwrite"], capsys
    )
    assert code == 2 and "holds --model" in err, err
    assert _files(model_dir) == before  # the trained weights are still there


def test_export_refuses_an_output_folder_locked_by_another_run(model_dir, tmp_path, capsys):
    OutputLock = _helpers().OutputLock
    out = tmp_path / "exported"
    with OutputLock(out, command="ctal-export --output exported (still running)"):
        code, err = _run(export_main, ["--model", str(model_dir), "--output", str(out)], capsys)
    assert code == 1 and "in use by another run" in err and "still running" in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ ctal-predict
def test_predict_refuses_the_model_folder_and_a_locked_output_folder(model_dir, tmp_path, capsys):
    OutputLock, lock_path = (_helpers().OutputLock, _helpers().lock_path)
    image = _image(tmp_path)
    before = _files(model_dir)
    code, err = _run(predict_main, ["--model", str(model_dir), str(image), "--output_dir", str(model_dir)], capsys)
    assert code == 2 and "--output_dir" in err and "--model" in err, err
    assert _files(model_dir) == before
    out = tmp_path / "predictions"
    with OutputLock(out, command="ctal-predict (another one)"):
        code, err = _run(predict_main, ["--model", str(model_dir), str(image), "--output_dir", str(out)], capsys)
        assert code == 2 and "in use by another run" in err and "another one" in err, err
        assert not out.exists()
        code, err = _run(
            predict_main,
            ["--model", str(model_dir), str(image), "--output_dir", str(out), "--ignore_lock", "--no_panel"],
            capsys,
        )
    assert code == 0, err
    assert (out / "room_depth.npy").is_file() and not lock_path(out).exists()


def test_predict_never_overwrites_an_input_image(model_dir, tmp_path, capsys):
    image = _image(tmp_path, "room.png")
    victim = _image(tmp_path, "room_panel.png")  # the name the panel of room.png would take
    before = victim.read_bytes()
    code, err = _run(predict_main, ["--model", str(model_dir), str(image), str(victim), "--output_dir", str(tmp_path)],
                     capsys)  # fmt: skip
    assert code == 2 and "would replace the input image room_panel.png" in err, err
    assert victim.read_bytes() == before


def test_bulk_prediction_refuses_its_input_folder_and_a_locked_output_folder(model_dir, tmp_path, capsys):
    from ctal_hf.bulk.cli import main as bulk_main

    OutputLock = _helpers().OutputLock
    photos = tmp_path / "photos"
    photos.mkdir()
    _image(photos)
    code, err = _run(bulk_main, ["--model", str(model_dir), str(photos), "--output_dir", str(photos / "maps")], capsys)
    assert code == 2 and "lies inside) the input folder" in err, err
    assert sorted(p.name for p in photos.iterdir()) == ["room.png"]
    out = tmp_path / "maps"
    with OutputLock(out, command="ctal-predict-bulk (another one)"):
        code, err = _run(bulk_main, ["--model", str(model_dir), str(photos), "--output_dir", str(out)], capsys)
    assert code == 2 and "in use by another run" in err and "another one" in err, err
    code, err = _run(bulk_main, ["--model", str(model_dir), str(photos), "--output_dir", str(out), "--no_progress"],
                     capsys)  # fmt: skip
    assert code == 0, err
    assert (out / "room_depth.npy").is_file() and not (tmp_path / ".maps.ctal-lock").exists()


# ------------------------------------------------------------------------------------------------ publishing
def test_publish_failure_leaves_the_published_folder_as_it_was(tmp_path, monkeypatch):
    import datasets

    from dataset_scripts import publish

    features = datasets.Features({"image": datasets.Image(), "semseg": datasets.Image()})
    rows = {"image": [PIL.Image.new("RGB", (8, 8))] * 2, "semseg": [PIL.Image.new("L", (8, 8))] * 2}
    dataset = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(rows, features=features) for split in ("train", "validation")}
    )
    monkeypatch.setattr(publish, "make_card", lambda *args, **kwargs: publish.DatasetCard("---\n---\nA card"))
    folder = publish.write_parquet_folder("synthetic", dataset, tmp_path / "published")
    before = _files(folder)

    def broken_card(*args, **kwargs):
        raise OSError("disk full while writing the card")

    monkeypatch.setattr(publish, "make_card", broken_card)
    with pytest.raises(OSError, match="disk full"):
        publish.write_parquet_folder("synthetic", dataset, folder)
    assert _files(folder) == before  # the published shards are still there, whole
    written = []
    original = datasets.Dataset.to_parquet

    def interrupted_to_parquet(self, path, *args, **kwargs):  # killed while writing the second split's shard
        if written:
            Path(path).write_bytes(b"PAR1 half")
            raise KeyboardInterrupt
        written.append(path)
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "to_parquet", interrupted_to_parquet)
    with pytest.raises(KeyboardInterrupt):
        publish.write_parquet_folder("synthetic", dataset, folder)
    monkeypatch.setattr(datasets.Dataset, "to_parquet", original)
    assert _files(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["published"]
    with pytest.raises(SystemExit):
        publish.parse_args(["nyuv2", "--data_dir", str(folder), "--output_dir", str(folder)])
