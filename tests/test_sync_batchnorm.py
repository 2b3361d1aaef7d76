"""`--sync_batchnorm`: the conversion keeps the weights (state-dict keys and values, the saved files), changes nothing
in one process, keeps timm's fused BatchNorm + activation layers whole, and is refused where it cannot run (CPU)."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.layers import BatchNormAct2d
from torch import nn

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.training.sync_batchnorm import check_sync_batchnorm, convert_sync_batchnorm

torch.set_num_threads(1)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tiny_model(seed: int = 0) -> CTALForDenseMultitask:
    torch.manual_seed(seed)
    return CTALForDenseMultitask(CTALConfig(tasks=["semseg", "depth"], image_size=[64, 64], num_semseg_classes=3))


def test_conversion_keeps_every_weight_and_the_saved_files(tmp_path):
    plain, converted = tiny_model(), convert_sync_batchnorm(tiny_model())
    batch_norms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert batch_norms > 10
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in converted.modules()) == batch_norms
    assert not any(type(m) in (nn.BatchNorm2d, nn.BatchNorm1d) for m in converted.modules())
    plain_state, converted_state = plain.state_dict(), converted.state_dict()
    assert list(converted_state) == list(plain_state)
    assert all(torch.equal(converted_state[key], plain_state[key]) for key in plain_state)

    plain.save_pretrained(tmp_path / "plain")
    converted.save_pretrained(tmp_path / "converted")
    saved_plain = load_file(tmp_path / "plain" / "model.safetensors")
    saved_converted = load_file(tmp_path / "converted" / "model.safetensors")
    assert list(saved_converted) == list(saved_plain)
    assert all(torch.equal(saved_converted[key], saved_plain[key]) for key in saved_plain)
    reloaded, info = CTALForDenseMultitask.from_pretrained(tmp_path / "converted", output_loading_info=True)
    assert not any(info.values()), info
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in reloaded.modules())


def test_one_process_trains_and_evaluates_exactly_as_plain_batch_norm():
    plain, converted = tiny_model(), convert_sync_batchnorm(tiny_model())
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    labels = {"semseg": torch.randint(0, 3, (2, 64, 64)), "depth": torch.rand(2, 1, 64, 64) + 0.5}
    plain_loss, converted_loss = (
        plain.train()(pixels, labels=labels).loss,
        converted.train()(pixels, labels=labels).loss,
    )
    torch.testing.assert_close(converted_loss, plain_loss, rtol=0, atol=0)
    with torch.no_grad():
        expected = plain.eval()(pixels).predictions
        got = converted.eval()(pixels).predictions
    for task in expected:  # the same normalisation, computed by another float32 kernel: rounding differences only
        torch.testing.assert_close(got[task], expected[task], rtol=1e-3, atol=1e-4)
    converted_state = converted.state_dict()
    assert all(torch.equal(converted_state[k], v) for k, v in plain.state_dict().items())  # running stats alike


def test_timm_fused_batch_norm_keeps_its_activation():
    block = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU)).eval()
    inputs = torch.randn(1, 3, 8, 8)
    expected = block(inputs)
    converted = convert_sync_batchnorm(block)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    torch.testing.assert_close(converted(inputs), expected)
    assert (converted(inputs) >= 0).all()


def test_devices_that_cannot_sync_are_refused_naming_the_device(caplog):
    check_sync_batchnorm(False, "cpu")  # not asked: nothing to check
    with pytest.raises(ValueError, match="this run is on 'cpu'.*Drop --sync_batchnorm"):
        check_sync_batchnorm(True, torch.device("cpu"), num_processes=2)
    check_sync_batchnorm(True, "cuda:0", num_processes=4)  # what a GPU run passes (no GPU needed to check)
    with caplog.at_level("WARNING"):
        check_sync_batchnorm(True, "cuda", num_processes=1)
    assert "no-op" in caplog.text


def test_train_py_refuses_sync_batchnorm_on_cpu_before_training(tmp_path):
    from accelerate.state import AcceleratorState

    sys.path.insert(0, str(EXAMPLES))
    import train

    argv = ["--image_size", "64", "64", "--num_train_images", "4", "--num_validation_images", "2"]
    argv += ["--output_dir", str(tmp_path / "out"), "--sync_batchnorm", "--max_train_steps", "1"]
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with pytest.raises(ValueError, match="--sync_batchnorm .* this run is on 'cpu'"):
            train.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not (tmp_path / "out" / "model.safetensors").exists()
