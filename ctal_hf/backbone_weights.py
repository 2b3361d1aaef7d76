"""Pretrained backbone weights: a named backbone's ImageNet state dict (its library's download or a file, checked
against the architecture) and the state dict of a whole `CTALBackbone` for any backbone, read once before the model
is built so that a missing file or an offline download fails before any work. See docs/design.md, "Backbones"."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from .backbones import BACKBONES, _is_timm_backbone_config, _timm, _timm_features_kwargs

if TYPE_CHECKING:
    from .configuration_ctal import CTALConfig


def _read_state_dict_file(source: str) -> dict[str, torch.Tensor]:
    """A `.safetensors` file or a torch state dict file (read with `weights_only=True`, so a file holding code is
    refused); a checkpoint that nests its weights under "state_dict" or "model" is unwrapped."""
    if source.endswith(".safetensors"):
        from safetensors.torch import load_file

        state_dict = load_file(source)
    else:
        state_dict = torch.load(source, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state_dict, dict) and isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{source!r} does not hold a state dict (found {type(state_dict).__name__}).")
    return state_dict


def read_backbone_state_dict(config: CTALConfig, source: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """A named backbone's full ImageNet state dict (timm's or torchvision's classification model), checked against
    the architecture.

    `source` is `None` (the building library's own pretrained weights: timm's from the Hub, torchvision's from its
    download path), a `.safetensors` file, or a torch state dict file. A missing, unexpected or mis-shaped key raises,
    naming the file."""
    spec = BACKBONES[config.backbone]
    if source is None:
        return spec.builder.download_state_dict(config)
    source = os.fspath(source)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"Backbone weights file {source!r} does not exist.")
    state_dict = spec.builder.convert_state_dict(config, _read_state_dict_file(source))
    spec.builder.check_state_dict(config, state_dict, source)
    return state_dict


def _weights_file_in(folder: str) -> str:
    for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"Backbone weights folder {folder!r} holds no model.safetensors or pytorch_model.bin.")


def _timm_backbone_state_dict(backbone_config, source: str | None) -> dict[str, torch.Tensor]:
    """Pretrained weights of a `TimmBackboneConfig` backbone, as a state dict of transformers' `TimmBackbone`."""
    overlay = {}
    if source is not None:
        if os.path.isdir(source):
            source = _weights_file_in(source)
        if os.path.isfile(source):
            state_dict = _read_state_dict_file(source)
            # timm loads a features-only model leniently (it drops the classifier): check against the full model.
            reference = _timm().create_model(
                backbone_config.backbone, pretrained=False, in_chans=backbone_config.num_channels
            )
            try:
                reference.load_state_dict(state_dict, strict=True)
            except RuntimeError as error:
                raise ValueError(f"{source!r} does not match timm's {backbone_config.backbone}: {error}") from None
            overlay = {"state_dict": state_dict}
        elif source.count("/") == 1 and not source.startswith((".", "/")):
            overlay = {"hf_hub_id": source}  # a timm checkpoint on the Hub, e.g. "timm/resnet18.a1_in1k"
        else:
            raise FileNotFoundError(
                f"Backbone weights {source!r}: no such file or folder (and not a Hub id org/name)."
            )
    model = _timm().create_model(
        backbone_config.backbone,
        pretrained=True,
        pretrained_cfg_overlay=overlay or None,
        **_timm_features_kwargs(backbone_config),
    )
    return {f"_backbone.{key}": value for key, value in model.state_dict().items()}


def _auto_backbone_state_dict(backbone_config, source: str | None) -> dict[str, torch.Tensor]:
    """Pretrained weights of a transformers backbone: a Hub id or folder (`AutoBackbone.from_pretrained`) or a state
    dict file of the backbone; every tensor of the backbone must be in it."""
    from transformers import AutoBackbone

    if source is None:
        source = backbone_config.name_or_path or None
        if source is None:
            raise ValueError(
                f"`backbone_config` ({backbone_config.model_type}) names no checkpoint: pass `backbone_weights` (a Hub "
                "id, a folder saved with `save_pretrained`, or a state dict file)."
            )
    reference = AutoBackbone.from_config(backbone_config)
    expected = reference.state_dict()
    if os.path.isfile(source):
        state_dict = _read_state_dict_file(source)
    else:
        # The concrete class: `AutoBackbone.from_pretrained` takes anything that is not a Hub repo for a timm name.
        try:
            pretrained, info = type(reference).from_pretrained(
                source, config=backbone_config, output_loading_info=True
            )
        except OSError as error:
            raise FileNotFoundError(f"Backbone weights {source!r}: {error}") from None
        if info["missing_keys"] or info["mismatched_keys"]:
            raise ValueError(
                f"{source!r} lacks tensors of the {backbone_config.model_type} backbone: missing "
                f"{sorted(info['missing_keys'])[:10]}, mis-shaped {list(info['mismatched_keys'])[:10]}."
            )
        state_dict = pretrained.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    mismatched = [key for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    if missing or mismatched:
        raise ValueError(
            f"{source!r} does not match the {backbone_config.model_type} backbone: missing keys {missing[:10]}, "
            f"size mismatch for {mismatched[:10]}."
        )
    return {key: state_dict[key] for key in expected}


def pretrained_backbone_state_dict(config: CTALConfig, source: str | os.PathLike | None) -> dict[str, torch.Tensor]:
    """The state dict of a `CTALBackbone` (`model.*`, and `final_norm.*` with a final norm) holding pretrained weights,
    read once for every backbone of a model.

    Named backbones: `source` is `None` (the building library's weights: timm's from the Hub, torchvision's download)
    or a file of the full timm / torchvision model. With
    `backbone_config`: a timm backbone takes the same, a folder, or a timm Hub id; a transformers backbone a Hub id,
    a folder saved with `save_pretrained`, or a state dict file (`None`: where `backbone_config` was loaded from)."""
    source = None if source is None else os.fspath(source)
    if config.backbone_config is None:
        full = read_backbone_state_dict(config, source)
        spec = BACKBONES[config.backbone]
        state_dict = {f"model.{key}": value for key, value in spec.builder.features_state_dict(config, full).items()}
        if spec.uses_final_norm(config):
            state_dict.update({f"final_norm.{name}": full[f"norm.{name}"] for name in ("weight", "bias")})
        return state_dict
    if _is_timm_backbone_config(config.backbone_config):
        state_dict = _timm_backbone_state_dict(config.backbone_config, source)
    else:
        state_dict = _auto_backbone_state_dict(config.backbone_config, source)
    return {f"model.{key}": value for key, value in state_dict.items()}


__all__ = ["read_backbone_state_dict", "pretrained_backbone_state_dict"]
