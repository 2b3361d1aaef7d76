"""The behaviours where the authors' release differs from our plain defaults (README "Parity with the authors'
release"): each is a config field whose `from_preset` value is the release's, and each does what it says."""

import math

import pytest
import torch
from torch import nn

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.blocks import CTALASPP, CTALClassifier
from ctal_hf.configuration_ctal import PRESETS, RELEASE_BEHAVIOUR
from ctal_hf.heads import CTALFeaturePropagation

torch.set_num_threads(2)

TINY = dict(tasks=["semseg", "depth"], image_size=[64, 64], num_semseg_classes=5)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_carry_the_release_behaviour_and_plain_configs_keep_ours(preset):
    config = CTALConfig.from_preset(preset)
    for name, value in RELEASE_BEHAVIOUR.items():
        assert getattr(config, name) == value
    plain = CTALConfig()
    assert (plain.fpm_grouping, plain.papnet_affinity_normalization, plain.papnet_feature_normalization) == (
        "tasks",
        "rows",
        "channels",
    )
    assert (plain.aspp_dropout, plain.decoder_init) == (0.0, "he")
    # A keyword argument still overrides the release's value.
    assert CTALConfig.from_preset(preset, decoder_init="he").decoder_init == "he"


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("fpm_grouping", "channels", "tasks"),
        ("papnet_affinity_normalization", "both", "columns"),
        ("papnet_feature_normalization", "none", "pixels"),
        ("decoder_init", "xavier", "pytorch"),
    ],
)
def test_unknown_values_name_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"`{field}`.*{value!r}.*{allowed}"):
        CTALConfig(**{field: value})


def test_aspp_dropout_must_be_a_probability():
    with pytest.raises(ValueError, match="aspp_dropout"):
        CTALConfig(aspp_dropout=1.0)


def _propagation_mask(module: CTALFeaturePropagation, features: dict[str, torch.Tensor]) -> torch.Tensor:
    """The softmax mask the module multiplies the concatenated features by (read from the reduction's input)."""
    captured = {}
    handle = module.reduction.register_forward_pre_hook(lambda _, args: captured.setdefault("masked", args[0]))
    with torch.no_grad():
        module(features, size=(4, 4))
    handle.remove()
    concat = torch.cat([features[task] for task in module.tasks], dim=1)
    return captured["masked"] / concat


def test_fpm_grouping_release_is_the_per_task_softmax_of_permuted_logits():
    torch.manual_seed(0)
    tasks, channels = ["semseg", "depth", "normals"], 4
    features = {task: torch.randn(1, channels, 2, 2, dtype=torch.float64) for task in tasks}
    consecutive = CTALFeaturePropagation(tasks, channels, grouping="consecutive").double().eval()
    per_task = CTALFeaturePropagation(tasks, channels, grouping="tasks").double().eval()
    per_task.load_state_dict(consecutive.state_dict())
    num_tasks = len(tasks)
    # Logit k = c * T + t of the release's grouping goes to channel t * C + c of the per-task grouping.
    permutation = torch.tensor([(k % num_tasks) * channels + k // num_tasks for k in range(num_tasks * channels)])
    last = per_task.attention[-1]
    with torch.no_grad():
        last.weight[permutation] = consecutive.attention[-1].weight.clone()
        last.bias[permutation] = consecutive.attention[-1].bias.clone()
    mask_consecutive = _propagation_mask(consecutive, features)
    mask_per_task = _propagation_mask(per_task, features)
    torch.testing.assert_close(mask_per_task[:, permutation], mask_consecutive)
    # Each grouping's masks sum to one over its own groups, and not over the other's.
    shape = (1, channels, num_tasks, 2, 2)
    torch.testing.assert_close(mask_consecutive.view(shape).sum(2), torch.ones(1, channels, 2, 2, dtype=torch.float64))
    by_task = mask_consecutive.view(1, num_tasks, channels, 2, 2).sum(1)
    assert (by_task - 1).abs().max() > 1e-3
    with pytest.raises(ValueError, match="fpm_grouping"):
        CTALFeaturePropagation(tasks, channels, grouping="channels")


def test_fpm_grouping_reaches_every_propagation_of_ctal_ms_and_mtinet():
    for decoder in ("ctal_ms", "mtinet"):
        model = CTALForDenseMultitask(CTALConfig(**TINY, decoder=decoder, fpm_grouping="consecutive"))
        groupings = {m.grouping for m in model.modules() if isinstance(m, CTALFeaturePropagation)}
        assert groupings == {"consecutive"}


def test_aspp_dropout_drops_in_training_only():
    torch.manual_seed(0)
    aspp = CTALASPP(8, channels=16, rates=(1, 2, 3), dropout=0.5)
    hidden = torch.randn(2, 8, 6, 6)
    aspp.train()
    out = aspp(hidden)
    projected = aspp.project(
        torch.cat([b(hidden) for b in aspp.branches] + [aspp.pooling(hidden).expand(-1, -1, 6, 6)], 1)
    )
    kept = out != 0
    # Dropout keeps about half of the positive activations and scales them by 2.
    positive = projected > 0
    fraction = (kept & positive).sum() / positive.sum()
    assert 0.4 < float(fraction) < 0.6
    torch.testing.assert_close(out[kept], 2 * projected[kept])
    aspp.eval()
    torch.testing.assert_close(
        aspp(hidden),
        aspp.project(torch.cat([b(hidden) for b in aspp.branches] + [aspp.pooling(hidden).expand(-1, -1, 6, 6)], 1)),
    )
    from ctal_hf.decoders import build_final_head

    swin = CTALConfig.from_preset("pascal_context", loss_weights=None, tasks=["semseg"])
    assert build_final_head(swin, 128, "semseg").aspp.dropout.p == 0.5
    assert (
        build_final_head(CTALConfig(backbone="swinv2_small", image_size=[64, 64]), 128, "semseg").aspp.dropout.p == 0
    )


def _decoder_convs(model):
    backbone = {id(m) for m in model.backbone.modules()}
    return [m for m in model.decoder.modules() if isinstance(m, nn.Conv2d) and id(m) not in backbone]


def test_decoder_init_pytorch_default_vs_he_statistics():
    torch.manual_seed(0)
    he = CTALForDenseMultitask(CTALConfig(**TINY, decoder="padnet"))
    torch.manual_seed(0)
    release = CTALForDenseMultitask(CTALConfig(**TINY, decoder="padnet", decoder_init="pytorch"))
    for model, kind in ((he, "he"), (release, "pytorch")):
        for conv in _decoder_convs(model):
            if conv.weight.numel() < 2000:
                continue  # too few values for a tight statistic
            fan_in = conv.weight[0].numel()
            fan_out = conv.out_channels * conv.weight[0, 0].numel()
            std = conv.weight.std().item()
            if kind == "pytorch":
                # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in).
                bound = 1 / math.sqrt(fan_in)
                assert conv.weight.abs().max() <= bound + 1e-7
                assert std == pytest.approx(bound / math.sqrt(3), rel=0.1)
                if conv.bias is not None:
                    assert conv.bias.abs().max() <= bound + 1e-7 and conv.bias.abs().max() > 0
            elif isinstance(conv, CTALClassifier):
                assert std == pytest.approx(he.config.initializer_range, rel=0.1)
                assert torch.all(conv.bias == 0)
            else:
                assert std == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    # The backbone is initialised the same way in both.
    torch.testing.assert_close(he.backbone.state_dict(), release.backbone.state_dict())


# ------------------------------------------------------------------------------------------------ recipes
def _recipe_config(recipe: str, decoder: str, *extra: str):
    from ctal_hf.training import building
    from ctal_hf.training.arguments import parse_args

    args = parse_args(["--recipe", recipe, "--decoder", decoder, *extra])
    resolved = building.resolve_recipe(args)
    return args, resolved, building.build_config(args, resolved)


def test_paper_recipes_train_each_decoder_with_the_release_loss_weights():
    pascal = {"semseg": 2.0, "parts": 2.0, "saliency": 5.0, "normals": 10.0, "edge": 50.0}
    baseline = {**pascal, "semseg": 1.0}
    expected = {
        "ctal_ss": pascal,
        "padnet": baseline,
        "papnet": baseline,
        "mtl": {task: 2 * weight for task, weight in baseline.items()},  # the release adds the same loss twice
        "stl": dict.fromkeys(pascal, 1.0),  # unweighted
    }
    for decoder, weights in expected.items():
        assert _recipe_config("pascal_context", decoder)[2].loss_weights == weights, decoder
    assert _recipe_config("cityscapes", "mtl")[2].loss_weights == {"semseg": 2.0, "depth": 20.0}
    assert _recipe_config("cityscapes", "ctal_ms")[2].loss_weights == {"semseg": 1.0, "depth": 10.0}
    assert _recipe_config("cityscapes", "stl")[2].loss_weights == {"semseg": 1.0, "depth": 1.0}
    assert _recipe_config("synthetic", "mtl")[2].loss_weights == {"semseg": 1.0, "depth": 1.0, "normals": 1.0}


def test_hard_sharing_loss_is_twice_the_unweighted_loss_under_the_paper_recipe():
    *_, config = _recipe_config("nyuv2", "mtl", "--image_size", "64", "64", "--num_semseg_classes", "5")
    plain = CTALConfig(**{**config.to_dict(), "loss_weights": None})
    torch.manual_seed(0)
    model = CTALForDenseMultitask(config).eval()
    reference = CTALForDenseMultitask(plain).eval()
    reference.load_state_dict(model.state_dict())
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = {
        "semseg": torch.randint(0, 5, (2, 64, 64)),
        "depth": torch.rand(2, 1, 64, 64) + 0.5,
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 64, 64), dim=1),
    }
    with torch.no_grad():
        weighted, unweighted = model(pixel_values, labels=labels), reference(pixel_values, labels=labels)
    torch.testing.assert_close(weighted.loss, 2 * unweighted.loss)


def _lr_curve(scheduler, optimizer, steps: int) -> list[float]:
    values = []
    for _ in range(steps):
        values.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return values


@pytest.mark.parametrize("name", ["cosine", "cosine_warm_restarts", "poly", "step"])
def test_per_epoch_schedules_equal_torch_schedulers_stepped_after_every_epoch(name):
    from ctal_hf.training import building
    from ctal_hf.training.recipes import get_recipe

    recipe = get_recipe("cityscapes")
    assert recipe.lr_scheduler_interval == "epoch"
    epochs, per_epoch = 12, 5
    ours_opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    ours = building.make_scheduler(ours_opt, name, recipe, epochs * per_epoch, per_epoch, epochs)
    ref_opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = {
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=epochs),
        "cosine_warm_restarts": lambda: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(ref_opt, epochs // 3, 2),
        "poly": lambda: torch.optim.lr_scheduler.PolynomialLR(ref_opt, total_iters=epochs, power=2),
        "step": lambda: torch.optim.lr_scheduler.StepLR(ref_opt, step_size=epochs // 2, gamma=0.5),
    }[name]()
    expected = []
    for epoch in range(epochs):
        expected += [reference.get_last_lr()[0]] * per_epoch
        ref_opt.step()
        if name == "cosine_warm_restarts":
            reference.step(epoch + (per_epoch - 1) / per_epoch)  # the release's call after the last batch
        else:
            reference.step()
    assert _lr_curve(ours, ours_opt, epochs * per_epoch) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    per_step = building.make_scheduler(
        ours_opt, name, recipe.replace(lr_scheduler_interval="step"), epochs * per_epoch, per_epoch, epochs
    )
    assert len(set(_lr_curve(per_step, ours_opt, per_epoch))) > 1 or name == "step"  # changes within an epoch


def test_paper_recipes_follow_the_release_training_settings():
    from ctal_hf.training.recipes import get_recipe

    for name in ("nyuv2", "cityscapes", "pascal_context"):
        recipe = get_recipe(name)
        assert recipe.drop_last and recipe.pretrained_backbone == "timm" and recipe.lr_scheduler_interval == "epoch"
        assert recipe.per_device_train_batch_size == 8  # STL too: the paper's 8, not the release's PASCAL 2
    assert not get_recipe("nyuv2").normalize and not get_recipe("cityscapes").normalize  # [0, 1] inputs
    pascal = get_recipe("pascal_context")
    assert pascal.normalize and pascal.rescale_range == (0.5, 2.0) and pascal.crop and pascal.photometric
    assert pascal.cat_max_ratio == 0.75 and pascal.fit == "pad" and pascal.flip
    synthetic = get_recipe("synthetic")
    assert synthetic.pretrained_backbone is None and not synthetic.drop_last
    with pytest.raises(ValueError, match="lr_scheduler_interval"):
        synthetic.replace(lr_scheduler_interval="batch")


def test_paper_recipe_offline_names_the_flags_that_give_weights_or_opt_out():
    from ctal_hf.training import building

    args, recipe, config = _recipe_config("nyuv2", "mtl", "--image_size", "64", "64")
    with pytest.raises(RuntimeError, match=r"--pretrained_backbone /path/to/weights.safetensors.*none"):
        building.build_model(args, config, recipe)
    args, recipe, config = _recipe_config("nyuv2", "mtl", "--image_size", "64", "64", "--pretrained_backbone", "none")
    assert isinstance(building.build_model(args, config, recipe), CTALForDenseMultitask)


def test_building_a_model_never_downloads(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    for preset in sorted(PRESETS):
        CTALForDenseMultitask(CTALConfig.from_preset(preset, **TINY, loss_weights=None))
