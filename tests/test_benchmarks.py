"""The benchmark scripts still run end to end: each is started as a user would (`python benchmarks/...`) on its
smallest setting, and the table it writes is read back. The numbers are the scripts' business; these tests only
guard against the scripts rotting while the package changes under them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Every test starts a benchmark script in its own process (10-70 s of CPU each): `make test-all`, not `make test`.
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| model"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_resources_benchmark_writes_the_cityscapes_table(tmp_path):
    output = tmp_path / "resources.md"
    _run(
        "resources.py",
        "--settings",
        "cityscapes_hrnet",
        "--decoders",
        "ctal_ss",
        "--repeats",
        "1",
        "--output",
        str(output),
    )
    rows = _table_rows(output.read_text())
    assert {"STL", "MTL", "CTAL-SS"} <= set(rows)
    assert rows["MTL"][1] == "4.013"  # parameters (M) of the Cityscapes hard-sharing model
    assert float(rows["CTAL-SS"][1]) > float(rows["MTL"][1])


@pytest.mark.parametrize(
    "script, args, expected",
    [
        (
            "train_step.py",
            [
                "--preset",
                "cityscapes",
                "--decoders",
                "mtl",
                "--attention_impls",
                "auto",
                "--batch",
                "1",
                "--repeats",
                "1",
            ],
            "mtl",
        ),
        ("synthetic_speed.py", ["--count", "4", "--repeats", "1"], "nyuv2"),
    ],
)
def test_timing_benchmarks_write_their_tables(script, args, expected, tmp_path):
    output = tmp_path / "table.md"
    flag = "--out" if script == "train_step.py" else "--output"
    _run(script, *args, flag, str(output))
    text = output.read_text()
    assert expected in text and text.count("\n|") >= 2


def test_ctal_attention_benchmark_writes_its_table(tmp_path):
    output = tmp_path / "attention.md"
    _run(
        "ctal_attention.py",
        "--cases",
        "pascal_swin",
        "--rounds",
        "1",
        "--repeats",
        "1",
        "--min-seconds",
        "0",
        "--output",
        str(output),
    )
    text = output.read_text()
    assert "pascal_swin" in text and "dense" in text


def test_profile_step_writes_its_table_against_the_baseline(tmp_path):
    output = tmp_path / "profile.md"
    args = ["--image_size", "32", "32", "--variants", "fp32", "bf16+cl", "--modes", "train", "--rounds", "1"]
    _run("profile_step.py", *args, "--repeats", "1", "--threads", "1", "--quick", "--out", str(output))
    text = output.read_text()
    assert "AVX-512 BF16" in text and "matmul peak" in text
    rows = _table_rows(text)
    assert rows["fp32"][2] == "1.00x" and rows["bf16+cl"][2].endswith("x")  # ratios against the first variant
    assert {"backbone", "CTAL diffusion", "loss"} <= set(rows)  # the per-component breakdown


def test_full_resolution_benchmark_writes_its_table(tmp_path):
    output = tmp_path / "full.md"
    args = ["--maps", "8x8", "8x16", "--batch", "2", "--channels", "8", "--repeats", "1", "--threads", "1"]
    _run("full_resolution.py", *args, "--dtypes", "fp32", "--step_variants", "fp32", "--out", str(output))
    text = output.read_text()
    assert "Fitted exponent" in text and "| 32x64 | 8x16 | 128 | fp32 |" in text
    assert text.count("| factorized | fp32 |") == 2 and "failed" not in text


def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    output = tmp_path / "gpu.md"
    result = subprocess.run(
        ["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--tiny", "--out", str(output)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = output.read_text()
    for impl in ("dense", "factorized"):
        assert f"| diffusion | {impl} | bfloat16 | fwd+bwd |" in text
    assert "| step | auto | bfloat16+cl | train step |" in text
    assert "| sync_batchnorm | - | - | convert |" in text and "state dict unchanged: True" in text
    assert "refused on cpu: --sync_batchnorm synchronises BatchNorm statistics across GPU processes" in text


def test_backbones_benchmark_writes_its_table(tmp_path):
    output = tmp_path / "backbones.md"
    _run(
        "backbones.py",
        "--backbones",
        "hrnet_w18_small_v2",
        "mobilenetv3_large_100",
        "--image_size",
        "64",
        "64",
        "--repeats",
        "1",
        "--output",
        str(output),
    )
    text = output.read_text()
    rows = _table_rows(text)
    hrnet = rows["HRNet-W18-small-v2 (paper, timm)"]
    mobile = rows["MobileNetV3-Large 1.0 (timm, 4 maps)"]
    assert hrnet[1] == "18@1/4, 36@1/8, 72@1/16, 144@1/32" and mobile[2] == "16x16"
    assert float(hrnet[4]) == 3.86  # HRNet-W18-small-v2's feature layers (M parameters)
    assert hrnet[-1] == "1.00" and float(mobile[-1]) > 0
    assert "avx512_bf16" in text and "threads" in text


def test_loss_balancing_benchmark_times_every_method_against_fixed(tmp_path):
    output = tmp_path / "loss_balancing.md"
    methods = ["uncertainty", "dwa", "famo", "upgrad", "mgda"]
    _run(
        "loss_balancing.py",
        *("--decoder", "mtl", "--image_size", "32", "64", "--batch_size", "2", "--rounds", "1", "--threads", "1"),
        *("--methods", *methods, "--output", str(output)),
    )
    rows = _table_rows(output.read_text())
    assert rows["`fixed`"][3] == "1.00"
    for method in methods:
        assert float(rows[f"`{method}`"][3]) > 0, method


def test_choose_protocol_picks_an_epoch_from_the_mtl_curve(tmp_path):
    table = tmp_path / "protocol.md"
    result = _run(
        "choose_protocol.py",
        *("--image_size", "32", "64", "--num_train_images", "8", "--num_validation_images", "4"),
        *("--per_device_train_batch_size", "4", "--max_epochs", "3", "--patience", "1"),
        *("--output_dir", str(tmp_path / "run"), "--table", str(table)),
        *("--", "--learning_rate", "0.002"),  # after `--`: to train.py
    )
    settings = json.loads((tmp_path / "run" / "eval_results.json").read_text())["settings"]
    assert settings["learning_rate"] == 0.002 and "--learning_rate 0.002" in table.read_text()
    epochs = int(result.stdout.strip().splitlines()[-1].split("=")[1])
    assert 1 <= epochs <= 3
    rows = _table_rows(table.read_text())
    assert [rows[str(e)][0] for e in (1, 2, 3)] == ["1", "2", "3"] and rows["1"][2] == "1.0000"
    assert f"Chosen: **{epochs} epochs**" in table.read_text()


def test_startup_benchmark_writes_its_table(tmp_path):
    output = tmp_path / "startup.md"
    _run(
        "startup.py", "--repeats", "1", "--commands", "import ctal_hf", "ctal-predict --help", "--output", str(output)
    )
    rows = {name: cells for name, cells in _table_rows(output.read_text()).items() if name.startswith("`")}
    assert set(rows) == {"`import ctal_hf`", "`ctal-predict --help`"}
    assert all(float(cells[1]) > 0 for cells in rows.values())


def test_inference_benchmark_times_exported_runtimes_against_eager(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    output = tmp_path / "inference.md"
    _run(
        "inference.py",
        *("--tiny", "--runtimes", "onnx", "--repeats", "2", "--warmup", "1", "--calibration_images", "2"),
        *("--profile", "--profile_runs", "1", "--output", str(output)),
    )
    text = output.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| runtime")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    rows = {(row[0], row[1]): row for row in cells if len(row) == 7}
    assert set(rows) == {("eager PyTorch", "fp32"), ("ONNX Runtime", "fp32"), ("ONNX Runtime", "int8")}
    assert rows[("eager PyTorch", "fp32")][3].startswith("1.00x")
    for row in rows.values():
        assert float(row[2]) > 0 and float(row[3].split("x")[0]) > 0  # median ms, ratio to eager
    assert float(rows[("ONNX Runtime", "int8")][6]) < float(rows[("ONNX Runtime", "fp32")][6])  # int8 file smaller
    # --profile: where the time goes, per op type of ONNX Runtime's profiler (convolutions dominate a CNN)
    assert "ONNX Runtime fp32 (per op type)" in text and "| Conv |" in text and "| QLinearConv |" in text
    assert "avx512_bf16" in text and "intra_op_num_threads=2" in text


def test_interleaved_step_times_todays_package_from_a_git_ref(tmp_path):
    """interleaved_step.py builds `today` from the whole package at a git ref (here HEAD) and, with `--clock cpu`,
    reports CPU seconds."""
    if subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    output = tmp_path / "interleaved.md"
    args = ["--image_size", "32", "32", "--variants", "today", "fp32", "--modes", "infer", "--rounds", "1"]
    _run("interleaved_step.py", *args, "--threads", "1", "--clock", "cpu", "--baseline_ref", "HEAD", "--out", str(output))
    text = output.read_text()
    assert "CPU seconds" in text and "AVX-512 BF16" in text
    rows = [line for line in text.splitlines() if line.startswith("| inference")]
    assert [row.split("|")[3].strip() for row in rows] == ["today", "fp32"]


@pytest.mark.slow
def test_transformers_exporters_benchmark_records_each_export(tmp_path):
    pytest.importorskip("onnxruntime")
    output = tmp_path / "exporters.md"
    _run(
        "transformers_exporters.py", "--decoders", "mtl", "--ctal_export_decoders", "--size", "32", "--repeats", "1",
        "--calibration", "2", "--threads", "1", "--output", str(output), timeout=900,
    )  # fmt: skip
    rows = [line for line in output.read_text().splitlines() if line.startswith("| mtl |")]
    assert [row.split(" | ")[2] for row in rows] == ["fp32", "int8 static"]
    fp32 = rows[0].split(" | ")
    assert all(float(diff) < 1e-3 for diff in fp32[4].split(" / ")), rows[0]  # the float graph matches eager
    assert "transformers 5." in output.read_text()
