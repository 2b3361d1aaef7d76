"""The behaviours where the authors' release differs from our plain defaults (docs/reproducing-the-paper.md, "Parity
with the authors' release"): each is a config field whose `from_preset` value is the release's, and each does what it says."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctal_hf import CTALConfig, CTALForDenseMultitask
from ctal_hf.blocks import CTALASPP, CTALClassifier
from ctal_hf.configuration_ctal import PRESETS, RELEASE_BEHAVIOUR
from ctal_hf.heads import CTALFeaturePropagation

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
    assert (plain.hrnet_fuse_upsampling, plain.backbone_bn_momentum, plain.backbone_final_norm) == ("nearest", None, False)
    # A keyword argument still overrides the release's value.
    assert CTALConfig.from_preset(preset, decoder_init="he").decoder_init == "he"


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("fpm_grouping", "channels", "tasks"),
        ("papnet_affinity_normalization", "both", "columns"),
        ("papnet_feature_normalization", "none", "pixels"),
        ("decoder_init", "xavier", "pytorch"),
        ("hrnet_fuse_upsampling", "bicubic", "bilinear"),
    ],
)
def test_unknown_values_name_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"`{field}`.*{value!r}.*{allowed}"):
        CTALConfig(**{field: value})


def test_aspp_dropout_and_bn_momentum_must_be_in_range():
    with pytest.raises(ValueError, match="aspp_dropout"):
        CTALConfig(aspp_dropout=1.0)
    for momentum in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"`backbone_bn_momentum`.*\(0, 1\]"):
            CTALConfig(backbone_bn_momentum=momentum)


# ------------------------------------------------------------------------------------------------ backbones
def _hrnet_fuse_reference(module, inputs):
    """A timm `HighResolutionModule` as the release computes it: branches, then each output the sum of the finer
    branches downsampled, its own, and the coarser ones (1x1 conv + BN) bilinearly interpolated to its size."""
    x = [branch(value) for branch, value in zip(module.branches, inputs, strict=True)]
    outputs = []
    for i, fuse in enumerate(module.fuse_layers):
        y = x[0] if i == 0 else fuse[0](x[0])
        for j in range(1, len(x)):
            if j == i:
                y = y + x[j]
            elif j > i:
                coarse = fuse[j][1](fuse[j][0](x[j]))  # conv, BatchNorm (timm's third module is the upsampling)
                y = y + F.interpolate(coarse, size=x[i].shape[-2:], mode="bilinear", align_corners=False)
            else:
                y = y + fuse[j](x[j])
        outputs.append(torch.relu(y))
    return outputs


def test_hrnet_fuse_layers_interpolate_bilinearly_and_bn_momentum_follows_the_config():
    from timm.models.hrnet import HighResolutionModule

    from ctal_hf.backbones import CTALBackbone

    torch.manual_seed(0)
    release = CTALBackbone(CTALConfig.from_preset("nyuv2", **TINY, loss_weights=None)).double().eval()
    plain = CTALBackbone(CTALConfig(**TINY)).double().eval()
    # Same tensors under the same names: timm's ImageNet files load into either.
    assert {k: v.shape for k, v in release.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    plain.load_state_dict(release.state_dict())
    fused = [m for m in release.modules() if isinstance(m, HighResolutionModule) and len(m.branches) == 4]
    assert fused, "no four-branch HRNet module"
    module = fused[-1]
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(2, c, 16 // 2**k, 16 // 2**k, generator=generator, dtype=torch.float64)
              for k, c in enumerate((18, 36, 72, 144))]  # fmt: skip
    with torch.no_grad():
        expected = _hrnet_fuse_reference(module, [t.clone() for t in inputs])
        actual = module([t.clone() for t in inputs])
        nearest = [m for m in plain.modules() if isinstance(m, HighResolutionModule) and len(m.branches) == 4][-1]
        timm_default = nearest([t.clone() for t in inputs])
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    assert (timm_default[0] - expected[0]).abs().max() > 1e-3  # nearest upsampling is not the same
    # The whole backbone differs too, from the same weights.
    pixels = torch.randn(1, 3, 64, 64, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        assert (release(pixels)[0] - plain(pixels)[0]).abs().max() > 1e-3
    momenta = {m.momentum for m in release.modules() if isinstance(m, nn.BatchNorm2d)}
    assert momenta == {0.01}
    assert {m.momentum for m in plain.modules() if isinstance(m, nn.BatchNorm2d)} == {0.1}  # timm's own


def test_backbone_behaviours_switch_from_the_command_line():
    *_, config = _recipe_config(
        "nyuv2",
        "ctal_ss",
        "--config_overrides",
        "hrnet_fuse_upsampling=nearest,backbone_bn_momentum=none,backbone_final_norm=false",
    )
    assert (config.hrnet_fuse_upsampling, config.backbone_bn_momentum, config.backbone_final_norm) == (
        "nearest",
        None,
        False,
    )
    *_, config = _recipe_config("cityscapes", "ctal_ss", "--config_overrides", "backbone_bn_momentum=0.05")
    assert config.backbone_bn_momentum == 0.05 and config.hrnet_fuse_upsampling == "bilinear"


def _swin_recipe(*extra: str):
    return _recipe_config(
        "pascal_context", "ctal_ss", "--backbone", "swin_v2_t", "--image_size", "64", "64", "--tasks", "semseg", *extra
    )


def test_torchvision_swin_is_features_norm_permute_with_weights_from_a_torchvision_file(tmp_path):
    """The release's backbone (`features -> norm -> permute` of torchvision's model) through the training recipe's
    `--pretrained_backbone FILE` path."""
    import torchvision

    from ctal_hf.training import building

    torch.manual_seed(0)
    reference = torchvision.models.swin_v2_t().eval()
    with torch.no_grad():
        reference.norm.weight.normal_()
        reference.norm.bias.normal_()
    torch.save(reference.state_dict(), tmp_path / "swin_v2_t.pth")
    args, recipe, config = _swin_recipe("--pretrained_backbone", str(tmp_path / "swin_v2_t.pth"))
    assert config.backbone_final_norm and config.timm_model_name is None
    model = building.build_model(args, config, recipe).eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = nn.Sequential(reference.features, reference.norm, reference.permute)(pixels)
        torch.testing.assert_close(model.backbone(pixels)[0], expected, rtol=1e-5, atol=1e-5)
        # Without the final norm the map is the last stage's, not normalised.
        unnormalised = reference.features(pixels).permute(0, 3, 1, 2)
        model.backbone.final_norm = None
        torch.testing.assert_close(model.backbone(pixels)[0], unnormalised, rtol=1e-5, atol=1e-5)
    # A file missing a tensor is refused before the model is built, naming the file and the key.
    del reference, model
    broken = torch.load(tmp_path / "swin_v2_t.pth")
    broken.pop("norm.weight")
    torch.save(broken, tmp_path / "broken.pth")
    args, recipe, config = _swin_recipe("--pretrained_backbone", str(tmp_path / "broken.pth"))
    with pytest.raises(ValueError, match=r"(?s)broken\.pth.*norm\.weight"):
        building.build_model(args, config, recipe)


def test_torchvision_swin_recipe_offline_names_the_flag_and_a_wrong_library_is_refused(monkeypatch):
    import urllib.error

    import torchvision.models._api

    from ctal_hf.training import building

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    args, recipe, config = _swin_recipe()  # the paper recipe's default: the library's own ImageNet weights
    with pytest.raises(RuntimeError, match=r"(?s)torchvision's swin_v2_t.*--pretrained_backbone .*none"):
        building.build_model(args, config, recipe)
    args, recipe, config = _swin_recipe("--pretrained_backbone", "timm")
    with pytest.raises(ValueError, match="pass --pretrained_backbone torchvision"):
        building.build_model(args, config, recipe)


def test_timm_swin_final_norm_is_the_full_model_norm_loaded_from_its_file(tmp_path):
    import timm

    from ctal_hf.backbone_weights import pretrained_backbone_state_dict
    from ctal_hf.backbones import CTALBackbone

    torch.manual_seed(0)
    config = CTALConfig.from_preset(
        "pascal_context", backbone="swinv2_tiny", image_size=[64, 64], tasks=["semseg"], loss_weights=None
    )
    full = timm.create_model("swinv2_tiny_window8_256", img_size=(64, 64)).eval()
    with torch.no_grad():
        full.norm.weight.normal_()
        full.norm.bias.normal_()
    torch.save(full.state_dict(), tmp_path / "swinv2_tiny.pth")
    backbone = CTALBackbone(config).eval()
    backbone.load_pretrained(pretrained_backbone_state_dict(config, tmp_path / "swinv2_tiny.pth"))
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            backbone(pixels)[0], full.forward_features(pixels).permute(0, 3, 1, 2), rtol=1e-5, atol=1e-5
        )
    with torch.device("meta"):
        plain = CTALBackbone(CTALConfig(backbone="swinv2_tiny", image_size=[64, 64], tasks=["semseg"]))
    assert plain.final_norm is None
    assert sum(p.numel() for p in backbone.parameters()) - sum(p.numel() for p in plain.parameters()) == 2 * 768


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


def test_cross_scale_fusion_without_the_release_conv_bias_trains_alike_and_folds_it_into_the_running_mean():
    """The release's cross-scale fusion conv has a bias; ours has none (BatchNorm follows). In training the BatchNorm
    cancels the bias (same outputs and weight gradients); in eval mode ours equals the biased form once the bias is
    folded into the running mean (docs/reproducing-the-paper.md, "Training steps")."""
    from ctal_hf.blocks import CTALCrossScaleFusion

    torch.manual_seed(0)
    ours = CTALCrossScaleFusion([4, 6]).double()
    conv, norm, _ = ours.fuse
    assert conv.bias is None
    biased_conv = nn.Conv2d(10, 10, 1).double()
    biased_norm = nn.BatchNorm2d(10).double()
    with torch.no_grad():
        biased_conv.weight.copy_(conv.weight)
        biased_conv.bias.normal_()
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 1.5)
        biased_norm.load_state_dict(norm.state_dict())
        biased_norm.running_mean += biased_conv.bias  # the release's statistics include its bias

    def biased(features):
        size = features[0].shape[-2:]
        stacked = torch.cat([F.interpolate(f, size=size, mode="bilinear") for f in features], dim=1)
        return F.relu(biased_norm(biased_conv(stacked)))

    generator = torch.Generator().manual_seed(1)
    features = [torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64),
                torch.randn(2, 6, 4, 4, generator=generator, dtype=torch.float64)]  # fmt: skip
    target = torch.randn(2, 10, 8, 8, generator=generator, dtype=torch.float64)
    ours.train()
    biased_conv.train()
    biased_norm.train()
    ours_out, biased_out = ours(features), biased(features)
    torch.testing.assert_close(ours_out, biased_out, rtol=1e-12, atol=1e-12)
    (ours_out * target).sum().backward()
    (biased_out * target).sum().backward()
    torch.testing.assert_close(conv.weight.grad, biased_conv.weight.grad, rtol=1e-10, atol=1e-12)
    assert biased_conv.bias.grad.abs().max() < 1e-10  # zero in exact arithmetic
    # One batch later the running means still differ by the bias (the release's averages it in).
    torch.testing.assert_close(biased_norm.running_mean - biased_conv.bias.detach(), norm.running_mean)
    ours.eval()
    biased_norm.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(features), biased(features), rtol=1e-12, atol=1e-12)
        biased_conv.bias.add_(0.5)  # an unfolded bias change (what the release's weight decay does) shows in eval
        assert (ours(features) - biased(features)).abs().max() > 1e-3
