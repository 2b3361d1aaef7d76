"""`ctal-predict-bulk` (ctal_hf.bulk): outputs equal to the pipeline's, folders / globs / datasets / Parquet, resuming
after a crash (simulated: partial outputs and temporaries; and a real SIGKILL), bad inputs named, and 2 torchrun
processes (gloo) writing exactly what one process writes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor
from ctal_hf.bulk.cli import main as bulk_main

REPO = Path(__file__).resolve().parents[1]
TASKS = ["semseg", "depth", "normals", "saliency"]
SIZES = [(40, 56), (64, 64), (31, 90), (75, 50), (64, 96)]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = CTALConfig(tasks=TASKS, image_size=[64, 64], num_semseg_classes=5)
    model = CTALForDenseMultitask(config)
    for module in model.modules():  # batch-norm statistics from one batch: outputs O(1), not ~1e3
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    model.eval()
    folder = tmp_path_factory.mktemp("bulk-model")
    model.save_pretrained(folder)
    CTALImageProcessor.from_model_config(config).save_pretrained(folder)
    return folder


def make_images(folder: Path, count: int = len(SIZES), nested: bool = True) -> list[Path]:
    """`count` random photos of different sizes, one in a subfolder (its key keeps the folder)."""
    rng = np.random.default_rng(7)
    paths = []
    for index in range(count):
        height, width = SIZES[index % len(SIZES)]
        sub = folder / "sub" if nested and index == 1 else folder
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img{index:02d}.{'png' if index % 2 else 'jpg'}"
        PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "photos"
    make_images(folder)
    return folder


@pytest.fixture
def reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def run(arguments, capsys) -> tuple[int, str, dict | None]:
    """Runs the command in this process; returns (exit code, stderr, summary JSON when written)."""
    try:
        code = bulk_main([str(a) for a in arguments])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    summary = None
    if "--summary_file" in arguments:
        path = Path(arguments[arguments.index("--summary_file") + 1])
        summary = json.loads(path.read_text()) if path.is_file() else None
    return code, err, summary


def output_files(folder: Path) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_outputs(first: Path, second: Path) -> None:
    """Same file names, and bit-equal arrays (PNG pixels equal)."""
    a, b = output_files(first), output_files(second)
    assert sorted(a) == sorted(b)
    for name, path in a.items():
        if name.endswith(".npy"):
            left, right = np.load(path), np.load(b[name])
            assert left.dtype == right.dtype and np.array_equal(left, right), name
        elif name.endswith(".png"):
            assert np.array_equal(np.asarray(PIL.Image.open(path)), np.asarray(PIL.Image.open(b[name]))), name


def subprocess_env() -> dict:
    env = dict(os.environ)  # the offline HF_HOME of the autouse fixture
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# --------------------------------------------------------------------------------------------- one process, files
def test_folder_outputs_equal_the_pipeline_and_a_rerun_skips_everything(
    saved_model, images, tmp_path, capsys, reset_accelerate
):
    out, summary_file = tmp_path / "maps", tmp_path / "summary.json"
    args = ["--model", saved_model, images, "--output_dir", out, "--save", "npy", "png", "--batch_size", "2"]
    code, err, summary = run([*args, "--summary_file", summary_file], capsys)
    assert code == 0, err
    assert summary["written"] == len(SIZES) and summary["skipped"] == 0 and not summary["failed"]
    assert "5 written, 0 skipped" in err
    files = output_files(out)
    keys = ["img00", "sub/img01", "img02", "img03", "img04"]
    assert sorted(files) == sorted(f"{key}_{task}.{kind}" for key in keys for task in TASKS for kind in ("npy", "png"))
    predictor = pipeline("dense-multitask", model=str(saved_model), device="cpu")
    for key, size in zip(keys, SIZES, strict=True):
        path = next(images.glob(f"{key}.*"))
        expected = predictor(str(path))  # batch 1 here, batches of 2 in the run: float32 summation order may differ
        for task in TASKS:
            value = np.load(out / f"{key}_{task}.npy")
            assert value.shape[:2] == size and value.dtype == expected[task].dtype, (key, task)
            if value.dtype == np.int64:
                assert (value == expected[task]).mean() > 0.999, (key, task)
            else:
                np.testing.assert_allclose(value, expected[task], atol=1e-3, rtol=1e-4, err_msg=f"{key} {task}")
    stamps = {name: path.stat().st_mtime_ns for name, path in files.items()}
    code, err, summary = run([*args, "--summary_file", summary_file], capsys)
    assert code == 0, err
    assert summary["written"] == 0 and summary["skipped"] == len(SIZES)
    assert {name: path.stat().st_mtime_ns for name, path in output_files(out).items()} == stamps


def test_resume_after_a_simulated_crash_writes_each_output_once(
    saved_model, images, tmp_path, capsys, reset_accelerate
):
    """A crash leaves whole files (renamed into place), inputs with only some of their files, and temporaries."""
    reference, out = tmp_path / "reference", tmp_path / "maps"
    args = ["--model", saved_model, images, "--save", "npy", "--batch_size", "1"]
    assert run([*args, "--output_dir", reference], capsys)[0] == 0
    out.mkdir()
    for key in ("img00", "img02"):  # finished before the crash
        for task in TASKS:
            shutil.copy(reference / f"{key}_{task}.npy", out / f"{key}_{task}.npy")
    shutil.copy(reference / "img03_depth.npy", out / "img03_depth.npy")  # img03: crashed half-way
    (out / ".img03_normals.npy.x1y2.bulk-tmp").write_bytes(b"\x93NUMPY partial")
    (out / "sub").mkdir()
    (out / "sub" / ".img01_semseg.npy.abc.bulk-tmp").write_bytes(b"")
    code, err, summary = run([*args, "--output_dir", out, "--summary_file", tmp_path / "s.json"], capsys)
    assert code == 0, err
    assert summary["skipped"] == 2 and summary["written"] == 3 and summary["removed_temporaries"] == 2
    assert_same_outputs(reference, out)  # complete, nothing twice, no temporaries


# ------------------------------------------------------------------------------------ Parquet and datasets input
def test_parquet_output_reads_back_with_load_dataset_and_resumes(
    saved_model, images, tmp_path, capsys, reset_accelerate
):
    from datasets import load_dataset

    reference, out = tmp_path / "reference", tmp_path / "maps"
    common = ["--model", saved_model, images, "--batch_size", "1"]
    assert run([*common, "--output_dir", reference], capsys)[0] == 0
    args = [*common, "--output_dir", out, "--save", "parquet", "--rows_per_file", "2"]
    assert run(args, capsys)[0] == 0
    parts = sorted((out / "data").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000000.parquet", "part-00000002.parquet", "part-00000004.parquet"]
    parts[1].unlink()  # as if the run had stopped before writing it
    code, err, summary = run([*args, "--summary_file", tmp_path / "s.json"], capsys)
    assert code == 0 and summary["written"] == 2 and summary["skipped"] == 3, err
    rows = load_dataset("parquet", data_dir=str(out / "data"), split="train").with_format("numpy")
    assert sorted(rows["id"]) == sorted(["img00", "sub/img01", "img02", "img03", "img04"])  # each exactly once
    for row in rows:
        assert Path(row["source"]).is_file()
        for task in TASKS:
            expected = np.load(reference / f"{row['id']}_{task}.npy")
            value = np.asarray(row[task])
            assert value.shape == expected.shape and (row["height"], row["width"]) == expected.shape[:2]
            np.testing.assert_array_equal(value, expected.astype(value.dtype), err_msg=f"{row['id']} {task}")


def test_datasets_split_with_named_image_column(saved_model, tmp_path, capsys, reset_accelerate):
    import datasets

    paths = make_images(tmp_path / "photos", count=3, nested=False)
    table = {"photo": [str(p) for p in paths], "name": ["c", "a", "b"], "label": [0, 1, 2]}
    features = datasets.Features(
        {"photo": datasets.Image(), "name": datasets.Value("string"), "label": datasets.Value("int64")}
    )
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(
        tmp_path / "ds"
    )
    base = ["--model", saved_model, "--dataset", tmp_path / "ds", "--split", "validation", "--tasks", "depth"]
    out = tmp_path / "by-row"
    code, err, _ = run([*base, "--image_column", "photo", "--output_dir", out], capsys)
    assert code == 0, err
    assert sorted(output_files(out)) == [f"validation-00000{i}_depth.npy" for i in range(3)]
    predictor = pipeline("dense-multitask", model=str(saved_model), device="cpu")
    for row, path in enumerate(paths):
        np.testing.assert_array_equal(np.load(out / f"validation-00000{row}_depth.npy"), predictor(str(path))["depth"])
    out = tmp_path / "by-name"
    code, err, _ = run([*base, "--image_column", "photo", "--id_column", "name", "--output_dir", out], capsys)
    assert code == 0, err
    np.testing.assert_array_equal(np.load(out / "c_depth.npy"), predictor(str(paths[0]))["depth"])
    # Bad columns: named, with the columns there are, before anything is written.
    for column, fragments in (("image", ["'image' is not in the dataset", "['photo', 'name', 'label']"]),
                              ("label", ["'label' holds", "not images"])):  # fmt: skip
        code, err, _ = run([*base, "--image_column", column, "--output_dir", tmp_path / "bad"], capsys)
        assert code == 2 and all(f in err for f in fragments), err
        assert "Traceback" not in err and not (tmp_path / "bad").exists()
    code, err, _ = run([*base, "--image_column", "photo", "--split", "test", "--output_dir", tmp_path / "bad"], capsys)
    assert code == 2 and "'test'" in err and "validation" in err, err


def test_native_and_sliding_resolution_equal_the_pipeline(saved_model, images, tmp_path, capsys, reset_accelerate):
    predictor = pipeline("dense-multitask", model=str(saved_model), device="cpu")
    path = next(images.glob("img04.*"))  # 64x96: the model's 64x64 window slides
    for options in ({"resolution": "native"}, {"resolution": "sliding", "overlap": 0.5}):
        out = tmp_path / options["resolution"]
        flags = [f"--{name}={value}" for name, value in options.items()]
        code, err, _ = run(["--model", saved_model, path, "--output_dir", out, "--tasks", "depth", *flags], capsys)
        assert code == 0, err
        np.testing.assert_array_equal(np.load(out / "img04_depth.npy"), predictor(str(path), **options)["depth"])


# -------------------------------------------------------------------------------------------------- bad inputs
def test_unreadable_file_is_named_and_the_others_are_written(saved_model, images, tmp_path, capsys, reset_accelerate):
    (images / "broken.jpg").write_bytes(b"this is not a JPEG")
    (images / "notes.txt").write_text("not an image suffix: not an input")
    out = tmp_path / "maps"
    code, err, summary = run(
        ["--model", saved_model, images, "--output_dir", out, "--summary_file", tmp_path / "s.json"], capsys
    )
    assert code == 1
    assert summary["written"] == len(SIZES) and list(summary["failed"]) == [str(images / "broken.jpg")]
    assert "broken.jpg" in err and "not an image format Pillow can open" in err and "Traceback" not in err
    assert not any(name.startswith("broken") for name in output_files(out))


@pytest.mark.parametrize(
    "arguments, fragment",
    [
        (["{missing}"], "is neither a file, a folder nor a glob"),
        (["{glob}"], "matches no file"),
        (["{images}", "--save", "npy", "parquet"], "parquet is a format of its own"),
        (["{images}", "--tasks", "edge"], "--tasks edge: not predicted"),
        (["{images}", "--dataset", "x"], "one of the two"),
        (["{images}", "{twin}"], "would write the same outputs"),
        (["{images}", "--batch_size", "0"], "--batch_size must be at least 1"),
        (["{images}", "--resolution", "native", "--batch_size", "2"], "use --batch_size 1"),
        (["{images}", "--overlap", "0.5"], "--overlap applies to --resolution sliding"),
    ],
)
def test_bad_arguments_are_refused_before_the_model_loads(
    saved_model, images, tmp_path, capsys, reset_accelerate, arguments, fragment
):
    twin = tmp_path / "other" / "img00.png"
    twin.parent.mkdir()
    shutil.copy(next(images.glob("img00.*")), twin)
    values = {"missing": tmp_path / "nope", "glob": tmp_path / "*.webp", "images": images, "twin": twin}
    arguments = [a.format(**values) for a in arguments]
    code, err, _ = run(["--model", saved_model, *arguments, "--output_dir", tmp_path / "out"], capsys)
    assert code == 2 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- several processes
@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_torchrun_processes_write_what_one_process_writes(saved_model, tmp_path, capsys, reset_accelerate):
    """Batch 1 and one thread per process, so each image goes through the same kernels: outputs are bit-equal."""
    images = tmp_path / "photos"
    make_images(images, count=7)
    common = ["--model", str(saved_model), str(images), "--batch_size", "1", "--no_progress"]
    one = tmp_path / "one"
    assert run([*common, "--output_dir", one, "--save", "npy", "png"], capsys)[0] == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ctal_hf.bulk"]
    two = tmp_path / "two"
    result = subprocess.run(
        [*torchrun, *common, "--output_dir", str(two), "--save", "npy", "png", "--summary_file", str(tmp_path / "s")],
        env=subprocess_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "s").read_text())
    assert summary["processes"] == 2 and summary["written"] == 7 and summary["skipped"] == 0
    assert_same_outputs(one, two)

    from datasets import load_dataset

    parquet = tmp_path / "parquet"
    result = subprocess.run(
        [*torchrun, *common, "--output_dir", str(parquet), "--save", "parquet", "--rows_per_file", "2"],
        env=subprocess_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = load_dataset("parquet", data_dir=str(parquet / "data"), split="train").with_format("numpy")
    assert sorted(rows["id"]) == sorted(p.removesuffix("_depth.npy") for p in output_files(one) if "_depth.npy" in p)
    for row in rows:
        np.testing.assert_array_equal(np.asarray(row["depth"]), np.load(one / f"{row['id']}_depth.npy"))


@pytest.mark.slow
def test_a_killed_run_resumed_gives_every_output_exactly_once(saved_model, tmp_path, capsys, reset_accelerate):
    images = tmp_path / "photos"
    make_images(images, count=30)
    common = ["--model", str(saved_model), str(images), "--batch_size", "1", "--no_progress", "--save", "npy", "png"]
    out = tmp_path / "maps"
    command = [sys.executable, "-m", "ctal_hf.bulk", *common, "--output_dir", str(out)]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not list(out.glob("*.png")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before = {name for name in output_files(out) if not name.endswith(".bulk-tmp")}
    assert 0 < len(done_before) < 30 * len(TASKS) * 2
    summary_file = tmp_path / "s.json"
    assert run([*common, "--output_dir", out, "--summary_file", summary_file], capsys)[0] == 0
    summary = json.loads(summary_file.read_text())
    assert summary["written"] + summary["skipped"] == 30 and summary["written"] > 0
    reference = tmp_path / "reference"
    assert run([*common, "--output_dir", reference], capsys)[0] == 0
    assert_same_outputs(reference, out)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_benchmark_script_writes_its_table(tmp_path):
    output = tmp_path / "bulk_prediction.md"
    command = [sys.executable, str(REPO / "benchmarks" / "bulk_prediction.py"), "--tiny", "--num_images", "2"]
    command += ["--batch_sizes", "1", "--no_single_thread", "--output", str(output)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    text = output.read_text()
    assert "CPU: " in text and "avx512_bf16" in text and "shared and loaded" in text
    rows = [line for line in text.splitlines() if line.startswith("| 1 x 2 |") or line.startswith("| 2 x 1 |")]
    assert len(rows) == 2 and all(float(row.split("|")[3]) > 0 for row in rows), text
