"""Replace BatchNormalization by LayerNorm over the channels at each position (``--layer-over channels``).

Before:  x -> BatchNormalization -> y
After:   x -> ReduceMean/Sub/Mul/ReduceMean/Add/Sqrt/Div (two-pass, over axis 1) -> Mul(a) -> Add(b) -> y
         (valid at every opset; measured faster on onnxruntime CPU than Transpose -> LayerNormalization ->
         Transpose, and stable: the variance is the mean of squared deviations)

Each sample at each position is normalized over its C channels (ConvNeXt-style), then scaled and shifted per
channel; ``a = gamma``, ``b = beta`` until calibration refits them. Not exact. Conditions: rank and element type
known, at least ``min_group_elements`` channels.
"""
from __future__ import annotations

from ...errors import option
from .base import FLOAT_TYPES, BnSite, Rewritten, Rule, Skip
from .emit import Emitter, channel_layer_norm


def match(site: BnSite) -> tuple[int, int] | Skip:
    if site.x_type is None or site.x_type.rank is None:
        return Skip(f"the rank of its input is unknown; pass {option('input_shapes')} so shape inference can find it")
    if site.x_type.elem_type not in FLOAT_TYPES:
        return Skip("the element type of its input is unknown or not floating point")
    if site.channels < site.options.min_group_elements:
        return Skip(f"it has only {site.channels} channels (< {site.options.min_group_elements}) to normalize over")
    return site.x_type.rank, site.x_type.elem_type


def rewrite(site: BnSite, m: tuple[int, int]) -> Rewritten:
    rank, elem = m
    e = Emitter(site, "to_layernorm_channels")
    scale, shift = channel_layer_norm(e, site.x, site.gamma, site.beta, rank, elem)
    return Rewritten(e.commit(), groups=None, scale=scale, shift=shift, detail="over channels at each position")


RULE = Rule("to_layernorm_channels", "BN replaced by LayerNorm over channels at each position", match, rewrite)
