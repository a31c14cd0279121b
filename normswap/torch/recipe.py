"""The structure of a converted module, as a recipe a fresh instance of the original architecture can follow.

A converted module's ``state_dict`` does not fit the original class (BN buffers are gone, GroupNorm or
weight-norm parameters are new), so the safetensors file normswap writes carries, in its metadata, one entry per
structural edit: a BN site that became ``identity`` (folded), ``affine``, ``group`` (G, C, eps), ``channel_layer``
(C, eps), each with the names of the BN subclass's extra modules it kept (drop, act); a producer that absorbed a
fold and gained a bias (``bias``); a producer whose weight became ``g * v / ||v||`` (``weight_norm``, dim).
``restore`` applies the recipe to a fresh instance (no calibration, nothing run) and loads the weights strictly,
so the result computes exactly what the converted module computed. Read from the final converted module, so
group counts chosen by calibration are the ones recorded.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidModelError, UsageError
from ..report import ConversionReport
from .fold import output_axis, weight_normalized
from .modules import ChannelAffine, ChannelLayerNorm, WithExtras, set_submodule

METADATA_KEY = "normswap.recipe"
FORMAT = 1


def _site_entry(name: str, module: nn.Module) -> dict:
    extras = []
    if isinstance(module, WithExtras):
        extras, module = list(module.extras.keys()), module.norm
    entry: dict = {"site": name, "extras": extras}
    if isinstance(module, nn.Identity):
        entry["module"] = "identity"
    elif isinstance(module, ChannelAffine):
        entry.update(module="affine", channels=int(module.scale.numel()))
    elif isinstance(module, nn.GroupNorm):
        entry.update(module="group", groups=module.num_groups, channels=module.num_channels, eps=module.eps,
                     affine=module.affine)
    elif isinstance(module, ChannelLayerNorm):
        entry.update(module="channel_layer", channels=int(module.weight.numel()), eps=module.eps)
    else:
        raise TypeError(f"no recipe entry for a {type(module).__name__} at '{name}'")
    return entry


def recipe_of(converted: nn.Module, report: ConversionReport) -> list[dict]:
    """The structural edits that turn the original architecture into ``converted``."""
    entries: list[dict] = []
    for layer in report.layers:
        if layer.action == "kept":
            continue
        entries.append(_site_entry(layer.name, converted.get_submodule(layer.name)))
        if layer.rule in ("fold_module", "weight_fold_module") and layer.producer:
            entries.append({"producer": layer.producer, "bias": True})
        if layer.rule == "weight_fold_module" and layer.producer:
            producer = converted.get_submodule(layer.producer)
            entries.append({"producer": layer.producer, "weight_norm": output_axis(producer)})
    return entries


def metadata(converted: nn.Module, report: ConversionReport) -> dict[str, str]:
    return {METADATA_KEY: json.dumps({"format": FORMAT, "target": report.target,
                                      "edits": recipe_of(converted, report)})}


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on the device and in the floating dtype of the module it replaces."""
    ref = next((t for t in list(old.parameters()) + list(old.buffers()) if t.is_floating_point()), None)
    return new.to(ref.device, ref.dtype) if ref is not None else new


def _build(entry: dict, old: nn.Module) -> nn.Module:
    kind = entry["module"]
    if kind == "identity":
        new = nn.Identity()
    elif kind == "affine":
        c = entry["channels"]
        new = ChannelAffine(torch.ones(c), torch.zeros(c))
    elif kind == "group":
        new = nn.GroupNorm(entry["groups"], entry["channels"], eps=entry["eps"], affine=entry.get("affine", True))
    elif kind == "channel_layer":
        new = ChannelLayerNorm(entry["channels"], entry["eps"])
    else:
        raise InvalidModelError(f"unknown module kind '{kind}' in the normswap recipe; upgrade normswap")
    new = _like(new, old)
    if entry.get("extras"):
        new = WithExtras(new, {k: copy.deepcopy(getattr(old, k)) for k in entry["extras"]})
    return new.train(old.training)


def apply_recipe(module: nn.Module, edits: list[dict]) -> nn.Module:
    """Apply the recorded edits to ``module`` (a fresh instance of the original architecture), in place."""
    for entry in edits:
        try:
            if "site" in entry:
                set_submodule(module, entry["site"], _build(entry, module.get_submodule(entry["site"])))
            elif entry.get("bias"):
                producer = module.get_submodule(entry["producer"])
                if producer.bias is None:
                    w = producer.weight
                    out = w.shape[output_axis(producer)] * (producer.groups if output_axis(producer) == 1 else 1)
                    producer.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device),
                                                 requires_grad=w.requires_grad)
            elif "weight_norm" in entry:
                producer = module.get_submodule(entry["producer"])
                weight_normalized(producer)
        except AttributeError as e:
            raise UsageError(f"the module does not have the layer the recipe names ({e}); pass a fresh instance of "
                             "the architecture that was converted") from None
    return module


def read_recipe(path: str | os.PathLike) -> list[dict]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise UsageError(f"weights file '{path}' does not exist") from None
    except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types for bad headers
        raise InvalidModelError(f"'{path}' is not a safetensors file ({e})") from None
    if METADATA_KEY not in meta:
        raise InvalidModelError(f"'{path}' holds no normswap recipe: it was not written by normswap's convert "
                                "(load it with safetensors.torch.load_model instead)")
    recipe = json.loads(meta[METADATA_KEY])
    if recipe.get("format") != FORMAT:
        raise InvalidModelError(f"'{path}' has recipe format {recipe.get('format')}; this normswap reads {FORMAT}")
    return recipe["edits"]


def restore(module: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Rebuild a converted module from its safetensors file: apply the recipe stored in the file's metadata to
    ``module`` -- a fresh instance of the original architecture, edited in place -- and load the weights
    strictly. Returns ``module``, which computes what the converted module computed."""
    from safetensors.torch import load_model
    apply_recipe(module, read_recipe(path))
    try:
        load_model(module, str(Path(path)), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"the weights in '{path}' do not fit the module after the recipe ({first}); pass a fresh "
                         "instance of the architecture that was converted") from None
    return module
