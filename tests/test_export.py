"""Export (`ctal_hf.export`, `ctal-export`): every decoder and both CTAL attention forms export to ONNX and match
eager PyTorch on real ONNX Runtime sessions; an OpenVINO IR matches too; `ctal-predict` runs an exported folder and
writes the files it writes for the PyTorch model; bad input is refused with a clear error and leaves nothing.

Tiny models (64 x 64 inputs, a 3-stage ConvNeXt of 8-24 channels, two tasks) keep the file fast: a torch.export +
ONNX conversion is a few seconds each. Both CTAL attention forms are covered: CTAL-MS with the dense form, CTAL-SS
with the factorised one (ONNX) and with `auto` (OpenVINO)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import ConvNextConfig

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.decoders import DECODERS
from ctal_hf.export import (
    EXPORT_MANIFEST,
    FP32_RELATIVE_TOLERANCE,
    CTALExportValidationError,
    export_model,
    load_exported,
)
from ctal_hf.export.exportable import EXPORT_FORM

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'ctal-hf[deploy]')")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install 'ctal-hf[deploy]')")

TASKS = ["semseg", "depth"]
SIZE = [64, 64]
REPO_ROOT = Path(__file__).resolve().parents[1]


def tiny_backbone() -> ConvNextConfig:
    return ConvNextConfig(
        num_stages=3, hidden_sizes=[8, 16, 24], depths=[1, 1, 1], out_features=["stage1", "stage2", "stage3"]
    )


def build(decoder: str = "mtl", attention_impl: str = "auto", seed: int = 0) -> CTALForDenseMultitask:
    torch.manual_seed(seed)
    config = CTALConfig(
        tasks=TASKS,
        image_size=SIZE,
        num_semseg_classes=5,
        decoder=decoder,
        attention_impl=attention_impl,
        backbone_config=tiny_backbone(),
    )
    return CTALForDenseMultitask(config).eval()


def eager(model, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        predictions = model(pixel_values=torch.from_numpy(pixel_values)).predictions
    return {task: value.numpy() for task, value in predictions.items()}


def assert_matches(got: dict, reference: dict) -> dict[str, float]:
    relative = {}
    for task, expected in reference.items():
        assert got[task].shape == expected.shape, task
        assert np.isfinite(got[task]).all(), task
        scale = float(np.abs(expected).max()) or 1.0
        relative[task] = float(np.abs(got[task] - expected).max()) / scale
        assert relative[task] <= FP32_RELATIVE_TOLERANCE, (task, relative[task])
    return relative


def leftovers(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if ".ctal-export-" in path.name or ".replaced-" in path.name)


# --- every decoder and both CTAL attention forms: ONNX equal to eager ----------------------------------------------

ATTENTION = {"ctal_ms": "dense", "ctal_ss": "factorized"}
CASES = [(name, ATTENTION.get(name, "auto")) for name in DECODERS]


@pytest.mark.slow
@pytest.mark.parametrize("decoder, attention_impl", CASES, ids=[f"{d}-{a}" for d, a in CASES])
def test_onnx_export_matches_eager(tmp_path, decoder, attention_impl):
    model = build(decoder, attention_impl)
    output = tmp_path / "exported"
    result = export_model(model, output, format="onnx")

    assert sorted(p.name for p in output.iterdir()) == sorted(
        ["model.onnx", "config.json", "preprocessor_config.json", EXPORT_MANIFEST]
    )
    assert model.config.attention_impl == attention_impl  # the caller's model is left as it was
    proto = onnx.load(str(output / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["pixel_values"]
    assert [o.name for o in proto.graph.output] == TASKS
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, *SIZE]  # dynamic batch, fixed image
    assert max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")) >= 18

    manifest = json.loads((output / EXPORT_MANIFEST).read_text())
    assert manifest == result.manifest
    assert manifest["format"] == "onnx" and manifest["runtime"] == "onnxruntime" and manifest["opset"] >= 18
    assert manifest["outputs"] == TASKS and manifest["dynamic_batch"] is True
    for per_task in manifest["validation"]["results"].values():  # the built-in check, on both inputs
        assert set(per_task) == set(TASKS)
        assert all(entry["relative"] <= FP32_RELATIVE_TOLERANCE for entry in per_task.values())
    assert set(manifest["validation"]["results"]) == {"dummy", "scene"}
    attention = manifest["attention"]
    if decoder in ("ctal_ss", "ctal_ms"):
        assert attention["requested"] == attention_impl
        if attention_impl == "factorized":
            assert attention["used"] == EXPORT_FORM and "batch" in attention["fallback_reason"]
        else:
            assert attention["used"] in ("dense", "factorized") and attention["fallback_reason"] is None
    else:
        assert attention["requested"] == "none"

    # An independent run: a fresh ONNX Runtime session on a batch of 3 the export never saw.
    session = ort.InferenceSession(str(output / "model.onnx"), providers=["CPUExecutionProvider"])
    pixel_values = np.random.default_rng(1).standard_normal((3, 3, *SIZE)).astype(np.float32)
    got = dict(zip(TASKS, session.run(TASKS, {"pixel_values": pixel_values}), strict=True))
    assert_matches(got, eager(model, pixel_values))


@pytest.mark.slow
def test_openvino_export_matches_eager(tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'ctal-hf[deploy]')")
    model = build("ctal_ss", "auto")
    output = tmp_path / "ir"
    result = export_model(model, output, format="openvino")
    assert (output / "model.xml").is_file() and (output / "model.bin").is_file()
    assert result.runtime == "openvino" and result.manifest["weights"] == "float32"
    exported = load_exported(output)
    assert exported.runtime == "openvino" and exported.tasks == TASKS
    import openvino as ov

    # This CPU plugin would pick bf16 by default on CPUs with AVX-512 BF16 / AMX: the export asks for f32.
    assert exported.session.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    assert result.manifest["attention"]["requested"] == "auto"
    assert result.manifest["attention"]["used"] in ("dense", "factorized")
    pixel_values = np.random.default_rng(2).standard_normal((2, 3, *SIZE)).astype(np.float32)
    assert_matches(exported(pixel_values), eager(model, pixel_values))


# --- a saved folder through the CLI, and ctal-predict on the export ------------------------------------------------


@pytest.fixture(scope="module")
def exported_folder(tmp_path_factory):
    """(saved PyTorch folder, its ONNX export written by `ctal-export --overwrite` over an older folder)."""
    from ctal_hf.export_cli import main

    root = tmp_path_factory.mktemp("export_cli")
    model = build("mtl")
    model.save_pretrained(root / "model")
    (root / "exported").mkdir()
    (root / "exported" / "old.txt").write_text("replaced")
    assert main(["--model", str(root / "model"), "--output", str(root / "exported"), "--overwrite"]) == 0
    assert not (root / "exported" / "old.txt").exists() and leftovers(root) == []
    return root / "model", root / "exported"


def test_ctal_export_cli_writes_a_loadable_folder(exported_folder):
    model_dir, output = exported_folder
    exported = load_exported(output)
    assert exported.runtime == "onnxruntime" and exported.tasks == TASKS
    assert exported.manifest["source"] == str(model_dir)
    model = CTALForDenseMultitask.from_pretrained(model_dir).eval()
    pixel_values = np.random.default_rng(3).standard_normal((2, 3, *SIZE)).astype(np.float32)
    assert_matches(exported(pixel_values), eager(model, pixel_values))
    on_openvino = load_exported(output, runtime="openvino")  # OpenVINO reads the ONNX file too
    assert_matches(on_openvino(pixel_values), eager(model, pixel_values))


def test_ctal_predict_runs_an_exported_folder(exported_folder, tmp_path):
    from PIL import Image

    from ctal_hf.cli import main

    model_dir, output = exported_folder
    image = tmp_path / "room.png"
    Image.fromarray((np.random.default_rng(4).random((50, 70, 3)) * 255).astype(np.uint8)).save(image)
    runs = {}
    for name, extra in {"torch": ["--model", str(model_dir)], "onnx": ["--model", str(output)]}.items():
        assert main([str(image), "--output_dir", str(tmp_path / name), *extra]) == 0
        runs[name] = tmp_path / name
    assert (
        main([str(image), "--output_dir", str(tmp_path / "ov"), "--model", str(output), "--runtime", "openvino"]) == 0
    )
    runs["ov"] = tmp_path / "ov"
    names = {name: sorted(p.name for p in folder.iterdir()) for name, folder in runs.items()}
    assert names["onnx"] == names["torch"] == names["ov"]
    assert "room_panel.png" in names["onnx"] and "room_semseg.npy" in names["onnx"]
    for name in ("onnx", "ov"):
        depth, reference = np.load(runs[name] / "room_depth.npy"), np.load(runs["torch"] / "room_depth.npy")
        assert depth.shape == (50, 70)
        np.testing.assert_allclose(depth, reference, rtol=0, atol=1e-4 * np.abs(reference).max())
        semseg, reference = np.load(runs[name] / "room_semseg.npy"), np.load(runs["torch"] / "room_semseg.npy")
        assert (semseg == reference).mean() > 0.99  # class ids: an argmax tie may flip a pixel


# --- bad input -----------------------------------------------------------------------------------------------------


def run_cli(argv, capsys) -> tuple[int, str]:
    from ctal_hf.export_cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_cli_refuses_a_folder_that_is_not_a_ctal_model(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "empty").mkdir()
    for folder, message in {"bert": "is not a CTAL model", "empty": "without config.json"}.items():
        code, err = run_cli(["--model", str(tmp_path / folder), "--output", str(tmp_path / "out")], capsys)
        assert code == 2 and message in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_cli_argument_errors_leave_nothing_and_need_no_torch(tmp_path, exported_folder):
    model_dir, exported = exported_folder
    out = tmp_path / "out"
    cases = {
        "unknown format": (["--format", "tflite"], "not a known format; choose from onnx, openvino, executorch"),
        "calibration without quantize": (["--calibration_dataset", "synthetic"], "without quantization"),
        "image count without quantize": (["--num_calibration_images", "8"], "without quantization"),
        "quantize without data": (["--quantize", "int8"], "needs calibration images"),
        "unknown quantization": (["--quantize", "int4", "--calibration_dataset", "synthetic"], "Unknown quantization"),
        "old opset": (["--opset", "13"], "opset must be an integer >= 18"),
        "float scopes without quantize": (["--float_scopes", "=decoder.ctal"], "only applies with --quantize int8"),
        "an exported folder as model": (["--model", str(exported)], "already an exported folder"),
    }
    script = (
        "import sys\nfrom ctal_hf.export_cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH', code)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    for name, (extra, message) in cases.items():
        argv = ["--model", str(model_dir), "--output", str(out), *extra]
        if "--model" in extra:
            argv = ["--output", str(out), *extra]
        done = subprocess.run(
            [sys.executable, "-c", script, *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.stdout.split() == ["NO_TORCH", "2"], (name, done.stdout, done.stderr[-2000:])
        assert message in done.stderr, (name, done.stderr[-2000:])
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_folder_is_refused_unless_overwrite(tmp_path, exported_folder, capsys):
    model_dir, _ = exported_folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_cli(["--model", str(model_dir), "--output", str(out)], capsys)
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_model(str(model_dir), out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and leftovers(tmp_path) == []


def test_missing_runtime_is_a_clear_error(tmp_path, exported_folder, monkeypatch, capsys):
    _, exported = exported_folder
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install 'ctal-hf\[deploy\]'"):
        export_model(build("mtl"), tmp_path / "out")
    with pytest.raises(ImportError, match="onnxruntime"):
        load_exported(exported)
    from ctal_hf.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                str(REPO_ROOT / "docs" / "pipeline_example.png"),
                "--model",
                str(exported),
                "--output_dir",
                str(tmp_path / "p"),
            ]
        )
    assert exit_info.value.code == 2 and "onnxruntime" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "p").exists() and leftovers(tmp_path) == []


def test_runtime_choice_is_checked(exported_folder, tmp_path, capsys):
    model_dir, exported = exported_folder
    from ctal_hf.cli import main

    image = str(REPO_ROOT / "docs" / "pipeline_example.png")
    for extra, message in {
        ("--model", str(exported), "--runtime", "tflite"): "Unknown runtime 'tflite'",
        ("--model", str(exported), "--runtime", "executorch"): "cannot run this onnx export",
        ("--model", str(model_dir), "--runtime", "onnxruntime"): "applies to folders written by ctal-export",
    }.items():
        with pytest.raises(SystemExit) as exit_info:
            main([image, "--output_dir", str(tmp_path / "p"), *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_a_mismatch_names_the_task_and_writes_nothing(tmp_path, monkeypatch):
    """The check is live: a runtime whose depth output is off by 1e-3 x its scale fails the export, and the folder
    it was to overwrite is left as it was."""
    from ctal_hf.export import onnx as onnx_export

    original = onnx_export.CTALOrtSession.__call__

    def off_by_a_little(self, pixel_values):
        outputs = original(self, pixel_values)
        outputs["depth"] = outputs["depth"] + 1e-3 * np.abs(outputs["depth"]).max()
        return outputs

    monkeypatch.setattr(onnx_export.CTALOrtSession, "__call__", off_by_a_little)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CTALExportValidationError, match=r"task 'depth' on the 'dummy' input: max abs difference"):
        export_model(build("mtl"), tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"] and leftovers(tmp_path) == []


@pytest.mark.slow
def test_executorch_export_matches_eager_or_says_why(tmp_path):
    from ctal_hf.export.formats import RUNTIMES

    if not RUNTIMES["executorch"].available():
        with pytest.raises(ImportError, match=r"executorch.*pip install 'ctal-hf\[executorch\]'"):
            export_model(build("mtl"), tmp_path / "out", format="executorch")
        assert not (tmp_path / "out").exists()
        pytest.skip("executorch is not installed (an extra of its own: pip install 'ctal-hf[executorch]')")
    model = build("ctal_ss", "factorized")
    result = export_model(model, tmp_path / "out", format="executorch")
    assert (tmp_path / "out" / "model.pte").is_file() and result.manifest["delegate"] == "XNNPACK"
    assert result.manifest["dynamic_batch"] is False
    exported = load_exported(tmp_path / "out")
    pixel_values = np.random.default_rng(5).standard_normal((2, 3, *SIZE)).astype(np.float32)
    assert_matches(exported(pixel_values), eager(model, pixel_values))
