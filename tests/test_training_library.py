"""`ctal_hf.training` without training runs: argument checks, schedules that follow a new total on resume, the
loss weighting methods against their formulas, TorchJD aggregation wired to the right parameters, the
`--backbone_config` / `--task_specs` flags."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_labels

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.tasks import DESCRIPTIVE_FIELDS
from ctal_hf.training import aggregation, building, loss_weighting, recipes
from ctal_hf.training.arguments import parse_args

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import train  # noqa: E402

TINY = CTALConfig.from_preset("nyuv2", num_semseg_classes=5, image_size=[32, 64])


# ------------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize(
    "flag, value",
    [
        ("--max_train_steps", "0"),
        ("--max_train_steps", "-5"),
        ("--max_train_samples", "0"),
        ("--per_device_train_batch_size", "0"),
        ("--per_device_eval_batch_size", "0"),
        ("--gradient_accumulation_steps", "0"),
    ],
)
def test_non_positive_counts_are_refused_before_anything_is_written(tmp_path, capsys, flag, value):
    output = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        train.main([flag, value, "--output_dir", str(output)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}: must be a positive integer" in error and value in error
    assert not output.exists()


def test_help_answers_without_importing_torch():
    probe = "import sys; import ctal_hf; print('torch' in sys.modules)"
    heavy_package = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    if heavy_package.stdout.strip().endswith("True"):
        pytest.skip("`import ctal_hf` itself imports torch (the package's lazy import is not in this tree)")
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'examples' / 'train.py')!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers', 'datasets', 'accelerate') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert "--max_train_steps" in result.stdout and "--loss_weighting" in result.stdout
    assert "heavy: []" in result.stdout, result.stdout[-500:]


def test_registry_names_checked_after_the_fast_parse(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--backbone", "resnet9000"])
    assert "argument --backbone: invalid choice: 'resnet9000'" in capsys.readouterr().err
    args = parse_args(["--decoder", "ctal_xl"], check_names=False)  # the fast parse alone does not need registries
    assert args.decoder == "ctal_xl"


# ------------------------------------------------------------------------------------------------------ schedules
def test_a_resumed_schedule_follows_the_new_total():
    """The old run (8 steps) saved its scheduler at step 4; the resumed run has 12 steps: from step 4 on, the
    learning rate is the 12-step cosine's, and it reaches 0 at step 12 (torch's CosineAnnealingLR restored T_max=8
    and rose again after step 8)."""
    recipe = recipes.get_recipe("synthetic")

    def scheduler_for(total):
        optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return optimizer, building.make_scheduler(optimizer, "cosine", recipe, total, 4, 3)

    optimizer, old = scheduler_for(8)
    for _ in range(4):
        optimizer.step(), old.step()
    state = old.state_dict()
    optimizer, new = scheduler_for(12)
    new.load_state_dict(state)
    new.step(), new.step()  # the first step after the load recomputes the rate from the step count
    lrs = []
    for step in range(6, 13):
        lrs.append(new.get_last_lr()[0])
        assert lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * step / 12)), abs=1e-12), step
        optimizer.step(), new.step()
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(0.0, abs=1e-15)


# ------------------------------------------------------------------------------------------------------ weighting
def _task_losses(config, values):
    return {task: config.loss_weights.get(task, 1.0) * torch.tensor(value) for task, value in values.items()}


def test_uncertainty_weighting_is_the_release_formula_and_learns():
    weighting = loss_weighting.build_loss_weighting("uncertainty", TINY)
    assert weighting.trainable_parameters() == [weighting.log_variances]
    raw = {"semseg": 2.0, "depth": 0.5, "normals": 0.25}
    terms = weighting(_task_losses(TINY, raw), terms=2)
    s = -0.5  # the release's initial log-variance
    for task, value in raw.items():
        assert terms[task].item() == pytest.approx(value / (2 * math.exp(s)) + s, rel=1e-6)
    torch.stack(list(terms.values())).sum().backward()
    # d/ds (L / (2 e^s) + s) = 1 - L / (2 e^s): the task with the largest loss gets its variance raised.
    expected = [1 - raw[t] / (2 * math.exp(s)) for t in weighting.tasks]
    assert weighting.log_variances.grad.tolist() == pytest.approx(expected, rel=1e-6)


def test_dwa_weights_follow_the_loss_ratios_of_the_last_two_epochs():
    weighting = loss_weighting.build_loss_weighting("dwa", TINY)
    epochs = [{"semseg": 2.0, "depth": 1.0, "normals": 0.5}, {"semseg": 1.0, "depth": 0.9, "normals": 0.5}]
    for values in epochs:
        for _ in range(3):
            assert weighting.current_weights() == {t: 1.0 for t in TINY.tasks}  # 1 for the first two epochs
            weighting(_task_losses(TINY, values))
            weighting.after_step()
        weighting.end_epoch()
    ratios = torch.tensor([epochs[1][t] / epochs[0][t] for t in TINY.tasks], dtype=torch.float64)
    expected = (3 * torch.softmax(ratios / 2.0, dim=0)).tolist()
    assert list(weighting.current_weights().values()) == pytest.approx(expected, rel=1e-6)
    assert weighting.current_weights()["normals"] > weighting.current_weights()["semseg"]  # slower task: more weight
    terms = weighting(_task_losses(TINY, epochs[1]))
    assert terms["semseg"].item() == pytest.approx(expected[0] * epochs[1]["semseg"], rel=1e-6)


def test_famo_update_and_state_round_trip():
    weighting = loss_weighting.build_loss_weighting("famo", TINY)
    assert weighting.trainable_parameters() == []
    before = {"semseg": 2.0, "depth": 1.0, "normals": 0.5}
    terms = weighting(_task_losses(TINY, before))
    # z = softmax(0) = 1/3; c = sum z / L; term = log(L) z / c
    c = sum((1 / 3) / v for v in before.values())
    for task, value in before.items():
        assert terms[task].item() == pytest.approx(math.log(value) * (1 / 3) / c, rel=1e-5)
    after = {"semseg": 1.0, "depth": 0.99, "normals": 0.5}  # semseg improved most
    weighting.after_step(loss_after_step=_task_losses(TINY, after))
    weights = weighting.current_weights()
    assert weights["semseg"] < 1 / 3 < weights["normals"]  # the task that improved least gains weight
    assert sum(weights.values()) == pytest.approx(1.0)

    copy = loss_weighting.build_loss_weighting("famo", TINY)
    copy.load_state_dict(weighting.state_dict())
    assert copy.current_weights() == weights
    for model in (weighting, copy):  # the same next update: the optimizer state came along
        model(_task_losses(TINY, after))
        model.after_step(loss_after_step=_task_losses(TINY, {"semseg": 0.9, "depth": 0.9, "normals": 0.45}))
    assert copy.current_weights() == weighting.current_weights()


def test_fixed_weighting_is_the_models_loss():
    model = CTALForDenseMultitask(TINY).train()
    outputs = model(pixel_values=torch.randn(2, 3, 32, 64), labels=random_labels(TINY))
    terms = loss_weighting.build_loss_weighting("fixed", TINY)(outputs.task_losses)
    assert torch.equal(torch.stack(list(terms.values())).sum(), outputs.loss)


# ------------------------------------------------------------------------------------------------------ TorchJD
@pytest.mark.skipif(importlib.util.find_spec("torchjd") is None, reason="torchjd is not installed")
@pytest.mark.parametrize("decoder", ["mtl", "ctal_ss"])
def test_torchjd_sum_aggregation_equals_plain_backward(decoder):
    """With TorchJD's `Sum` aggregator, `mtl_backward` + `jac_to_grad` must give every parameter the gradient of
    the summed loss: the backbone's Jacobian rows add up, shared decoder parts (CTAL) get the sum of the tasks'."""
    from torchjd.aggregation import Sum

    config = CTALConfig.from_preset("nyuv2", num_semseg_classes=5, image_size=[32, 64], decoder=decoder)
    torch.manual_seed(0)
    model = CTALForDenseMultitask(config).train()
    pixels, labels = torch.randn(2, 3, 32, 64), random_labels(TINY)
    model(pixel_values=pixels, labels=labels).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    jd = aggregation.GradientAggregation("upgrad", model, list(config.tasks))
    jd.aggregator = Sum()
    jd.backward(model(pixel_values=pixels, labels=labels).task_losses)
    actual = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():  # float sums in another order: compare to the tensor's own scale
        scale = grad.abs().max().item()
        assert (actual[name] - grad).abs().max().item() <= 1e-4 * scale + 1e-7, name
    jd.features.remove()


@pytest.mark.skipif(importlib.util.find_spec("torchjd") is None, reason="torchjd is not installed")
def test_aggregators_build_or_name_their_missing_solver():
    for name in aggregation.AGGREGATORS:
        _, _, extra = aggregation.AGGREGATORS[name]
        if extra is not None and importlib.util.find_spec("cvxpy") is None:
            with pytest.raises(ImportError, match=rf"torchjd\[{extra}\]"):
                aggregation.make_aggregator(name, 3)
        else:
            assert aggregation.make_aggregator(name, 3) is not None


def test_impossible_aggregation_settings_are_refused():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    stl = CTALForDenseMultitask(CTALConfig.from_preset("nyuv2", decoder="stl", image_size=[32, 64]))
    with pytest.raises(ValueError, match="no shared backbone"):
        aggregation.check_aggregation_setting("upgrad", stl, accelerator, None)
    mtl = CTALForDenseMultitask(TINY)
    for precision in ("fp16", "bf16"):
        with pytest.raises(ValueError, match=f"does not work with {precision} mixed precision"):
            aggregation.check_aggregation_setting("mgda", mtl, accelerator, precision)
    aggregation.check_aggregation_setting("mgda", mtl, accelerator, "no")
    aggregation.check_aggregation_setting("none", stl, accelerator, "fp16")


# ------------------------------------------------------------------------------------------------------ i12 flags
def test_backbone_config_and_task_specs_reach_the_config_only_when_given(tmp_path, monkeypatch):
    seen = []

    def spy(preset, **fields):
        seen.append(fields)
        raise RuntimeError("stop")  # the fields may not exist yet in CTALConfig: only what is passed matters

    monkeypatch.setattr(CTALConfig, "from_preset", staticmethod(spy))
    recipe = recipes.get_recipe("synthetic")
    with pytest.raises(RuntimeError, match="stop"):
        building.build_config(parse_args([], check_names=False), recipe)
    assert "backbone_config" not in seen[-1]
    # Only the recipe's descriptions of built-in tasks (class names, units), no task of the user's.
    assert all(set(spec) <= set(DESCRIPTIVE_FIELDS) for spec in seen[-1].get("task_specs", {}).values())

    backbone = tmp_path / "backbone.json"
    backbone.write_text(json.dumps({"model_type": "resnet", "depths": [1, 1, 1, 1]}))
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps({"albedo": {"kind": "regression", "channels": 3}}))
    args = parse_args(["--backbone_config", str(backbone), "--task_specs", str(specs)], check_names=False)
    with pytest.raises(RuntimeError, match="stop"):
        building.build_config(args, recipe)
    assert seen[-1]["backbone_config"] == {"model_type": "resnet", "depths": [1, 1, 1, 1]}
    assert seen[-1]["task_specs"]["albedo"] == {"kind": "regression", "channels": 3}

    # A folder (or Hub id) goes through AutoConfig.
    from transformers import ResNetConfig

    ResNetConfig(depths=[1, 1, 1, 1]).save_pretrained(tmp_path / "resnet")
    args = parse_args(["--backbone_config", str(tmp_path / "resnet")], check_names=False)
    with pytest.raises(RuntimeError, match="stop"):
        building.build_config(args, recipe)
    assert seen[-1]["backbone_config"]["model_type"] == "resnet"
    assert seen[-1]["backbone_config"]["depths"] == [1, 1, 1, 1]

    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="--task_specs .*bad.json.* must hold a JSON object"):
        building.build_config(parse_args(["--task_specs", str(bad)], check_names=False), recipe)
    with pytest.raises(SystemExit):
        parse_args(["--task_specs", str(tmp_path / "missing.json")], check_names=False)


def test_a_missing_weights_file_that_reads_like_a_hub_id_is_named_as_a_file_with_the_fetch_command(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # relative paths resolve here, where `make weights` has not run
    with pytest.raises(FileNotFoundError, match=r"weights/mobilenet_v2-b0353104\.pth.*no such file.*make weights"):
        building.backbone_weights_file("weights/mobilenet_v2-b0353104.pth")  # one slash: `org/name` otherwise
    with pytest.raises(FileNotFoundError, match="no such file") as error:
        building.backbone_weights_file("weights/resnet.safetensors")
    assert "make weights" not in str(error.value)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "mobilenet_v2-b0353104.pth").write_bytes(b"")
    assert building.backbone_weights_file("weights/mobilenet_v2-b0353104.pth") == "weights/mobilenet_v2-b0353104.pth"
