"""Bad input to `ctal-predict` and the startup cost of `import ctal_hf`: every mistake gives a short error (exit code 2,
like argparse and the transformers / accelerate CLIs) before the model is loaded, and a failure leaves no output
folder behind. Tiny images (one pixel high or wide) go through the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from ctal_hf import CTALConfig, CTALForDenseMultitask, CTALImageProcessor
from ctal_hf.cli import main as cli_main


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = CTALForDenseMultitask(CTALConfig(tasks=["semseg", "depth"], image_size=[64, 64], num_semseg_classes=4))
    folder = tmp_path_factory.mktemp("ctal-cli")
    model.save_pretrained(folder)
    CTALImageProcessor.from_model_config(model.config).save_pretrained(folder)
    return folder


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "room.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return str(path)


def run_cli(arguments, capsys) -> tuple[int, str]:
    """Runs ctal-predict in this process; returns (exit code, stderr)."""
    try:
        code = cli_main(arguments)
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def assert_short_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("ctal-predict: error:"), err
    for fragment in fragments:
        assert fragment in last, last


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if "ctal-predict" in path.name)


def test_missing_model_folder_is_a_short_error(image, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["--model", str(tmp_path / "no" / "such" / "model"), image, "--output_dir", str(out)], capsys)
    assert_short_error(code, err, "no such folder")
    code, err = run_cli(["--model", "./checkpoints/run1/", image, "--output_dir", str(out)], capsys)
    assert_short_error(code, err, "./checkpoints/run1/")
    assert not out.exists() and not leftovers(tmp_path)


def test_folder_without_config_and_file_as_model(image, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["--model", str(tmp_path / "empty"), image], capsys)
    assert_short_error(code, err, "config.json")
    code, err = run_cli(["--model", image, image], capsys)
    assert_short_error(code, err, "is a file")


def test_hub_id_that_cannot_be_loaded_is_a_short_error(image, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["--model", "someone/no-such-ctal-model", image, "--output_dir", str(out)], capsys)
    assert_short_error(code, err, "someone/no-such-ctal-model")
    assert len(err.strip().splitlines()[-1]) < 400
    assert not out.exists() and not leftovers(tmp_path)


def test_output_dir_that_is_a_file_or_unwritable(saved_model, image, tmp_path, capsys):
    blocker = tmp_path / "taken.txt"
    blocker.write_text("not a folder")
    code, err = run_cli(["--model", str(saved_model), image, "--output_dir", str(blocker)], capsys)
    assert_short_error(code, err, "is a file")
    code, err = run_cli(["--model", str(saved_model), image, "--output_dir", str(blocker / "sub")], capsys)
    assert_short_error(code, err, "taken.txt")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's read-only /sys")
def test_output_dir_on_a_read_only_file_system(saved_model, image, capsys):
    code, err = run_cli(["--model", str(saved_model), image, "--output_dir", "/sys/ctal-predictions"], capsys)
    if code == 0:
        pytest.skip("/sys is writable here")
    assert_short_error(code, err, "cannot be written")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_cuda_without_gpu_is_refused_before_loading(saved_model, image, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["--model", str(saved_model), image, "--device", "cuda", "--output_dir", str(out)], capsys)
    assert_short_error(code, err, "--device cuda", "--device cpu")
    code, err = run_cli(["--model", str(saved_model), image, "--device", "gpu0", "--output_dir", str(out)], capsys)
    assert_short_error(code, err, "gpu0")
    assert not out.exists() and not leftovers(tmp_path)


def test_bad_tasks_are_refused_before_the_weights_are_read(saved_model, image, tmp_path, capsys):
    # Garbage weights: had the model been loaded first, the error would be about the weights, not the tasks.
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in saved_model.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    out = tmp_path / "out"
    code, err = run_cli(["--model", str(broken), image, "--tasks", "normals", "--output_dir", str(out)], capsys)
    assert_short_error(code, err, "normals", "semseg depth")
    code, err = run_cli(["--model", str(broken), image, "--tasks", "semantic", "--output_dir", str(out)], capsys)
    assert_short_error(code, err, "semantic")
    assert not out.exists()


def test_failure_while_loading_leaves_no_output_folder(saved_model, image, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in saved_model.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "model.safetensors").write_bytes((saved_model / "model.safetensors").read_bytes()[:1000])
    out = tmp_path / "nested" / "out"
    code, err = run_cli(["--model", str(broken), image, "--output_dir", str(out), "--device", "cpu"], capsys)
    assert_short_error(code, err, "model.safetensors")
    assert not (tmp_path / "nested").exists() and not leftovers(tmp_path)


def test_unreadable_image_is_refused_before_loading(saved_model, tmp_path, capsys):
    fake = tmp_path / "fake.jpg"
    fake.write_text("not a jpeg")
    code, err = run_cli(["--model", str(saved_model), str(fake), "--output_dir", str(tmp_path / "out")], capsys)
    assert_short_error(code, err, "fake.jpg")
    assert not (tmp_path / "out").exists()


def test_tiny_images_through_the_cli(saved_model, tmp_path, capsys):
    images = []
    for height, width in [(1, 50), (50, 1), (1, 1)]:
        path = tmp_path / f"tiny_{height}x{width}.png"
        PIL.Image.fromarray(np.full((height, width, 3), 127, dtype=np.uint8)).save(path)
        images.append(str(path))
    out = tmp_path / "out"
    code, err = run_cli(["--model", str(saved_model), *images, "--output_dir", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    for path, size in zip(images, [(1, 50), (50, 1), (1, 1)], strict=True):
        stem = Path(path).stem
        assert np.load(out / f"{stem}_depth.npy").shape == size
        assert np.load(out / f"{stem}_semseg.npy").shape == size
        assert (out / f"{stem}_panel.png").is_file()
    assert not leftovers(tmp_path)


def test_existing_output_dir_keeps_other_files(saved_model, image, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, err = run_cli(["--model", str(saved_model), image, "--output_dir", str(out), "--no_panel"], capsys)
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "room_depth.npy").is_file() and not leftovers(tmp_path)


# -------------------------------------------------------------------------------------------------------- startup
def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=os.environ)


def test_help_needs_neither_torch_nor_transformers():
    result = run_python(
        "import sys\nfrom ctal_hf.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0\nheavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\nprint('ok')"
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    assert "--output_dir" in result.stdout


def test_import_is_light_and_keeps_the_registrations():
    result = run_python(
        "import sys\nimport ctal_hf\nassert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "from transformers import AutoConfig, AutoImageProcessor, AutoModel\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "config = AutoConfig.for_model('ctal', tasks=['depth'], image_size=[64, 64])\n"
        "assert type(config) is ctal_hf.CTALConfig\n"
        "model = AutoModel.from_config(config)\n"
        "assert type(model) is ctal_hf.CTALForDenseMultitask, type(model)\n"
        "from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING\n"
        "assert IMAGE_PROCESSOR_MAPPING[type(config)]['torchvision'] is ctal_hf.CTALImageProcessor\n"
        "assert PIPELINE_REGISTRY.supported_tasks['dense-multitask']['impl'] is ctal_hf.DenseMultitaskPipeline\n"
        "print('ok')"
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_registrations_when_transformers_is_imported_first():
    result = run_python(
        "from transformers import AutoConfig, AutoModel, pipeline\nimport transformers.pipelines\nimport ctal_hf\n"
        "from transformers.pipelines import PIPELINE_REGISTRY\n"
        "assert 'dense-multitask' in PIPELINE_REGISTRY.supported_tasks\n"
        "config = AutoConfig.for_model('ctal', tasks=['depth'], image_size=[64, 64])\n"
        "assert type(AutoModel.from_config(config)).__name__ == 'CTALForDenseMultitask'\nprint('ok')"
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
