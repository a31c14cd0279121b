"""Fold BatchNormalization into the Conv or ConvTranspose that produces its input.

Before:  x -> Conv(W, b) [-> Add(c)] -> BatchNormalization(gamma, beta, mean, var, eps) -> y
After:   x -> Conv(W', b') -> y

With ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s`` (float64):
- Conv: weight ``(M, C/group, k...)``, ``W'[m] = s[m] W[m]``;
- ConvTranspose: weight ``(C_in, M/group, k...)``, output channel ``g*M/group + j`` is ``W[g-th block of
  C_in/group rows, j]`` -- it is scaled there, per group;
- ``b' = s * (b + c) + t`` (``b``, ``c`` = 0 when absent).

Conditions: the Conv's output (and the Add's) is read by the BN alone and is no graph output; W, b and c are
constant; W is floating point; ``c`` is per-channel (varies only along axis 1); channel counts agree; W' and b'
stay finite in their own dtype (a float16 weight scaled past 65504 is not folded). The folded
weight is a new initializer, so a weight shared with another node is never changed for that node. Results are
cast once to the weight's dtype (the bias keeps its own dtype).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..._math import fold_bias, fold_conv_transpose_weight, fold_conv_weight, scaled_max_abs
from .base import (BnSite, Rewritten, Rule, Skip, attr, cast_like, constant_float_weight, elem_type_of, overflow_skip,
                   per_channel_vector, producer_through_bias_add, single_reader)

OPS = ("Conv", "ConvTranspose")


@dataclass
class ConvMatch:
    conv: int
    add: int | None
    weight: np.ndarray
    bias: np.ndarray | None
    folded_bias: np.ndarray  # float64


def _weight_peak(site: BnSite, weight: np.ndarray, op_type: str, group: int) -> float:
    """Largest |folded weight|, without forming it (0 where every |s| <= 1: nothing grows)."""
    if op_type == "Conv":
        return scaled_max_abs(weight, site.s, (site.channels,) + (1,) * (weight.ndim - 1))
    c_in, per_group = weight.shape[0], weight.shape[1]
    grouped = weight.reshape((group, c_in // group, per_group) + weight.shape[2:])
    return scaled_max_abs(grouped, site.s, (group, 1, per_group) + (1,) * (weight.ndim - 2))


def match(site: BnSite) -> ConvMatch | Skip | None:
    found = producer_through_bias_add(site, OPS)
    if found is None or isinstance(found, Skip):
        return found
    conv_i, add_i, added = found
    g = site.graph
    conv = g.nodes[conv_i]
    guard = single_reader(g, conv.output[0], add_i if add_i is not None else site.index)
    if guard:
        return guard
    weight = constant_float_weight(site, conv)
    if isinstance(weight, Skip):
        return weight
    if weight.ndim < 3:
        return Skip(f"the {conv.op_type}'s weight has shape {tuple(weight.shape)}, not (out, in, k...)")
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        bias = g.constant(conv.input[2])
        if bias is None:
            return Skip(f"the {conv.op_type}'s bias is not constant")
    group = int(attr(conv, "group", 1))
    if group < 1 or (conv.op_type == "ConvTranspose" and weight.shape[0] % group):
        return Skip(f"the {conv.op_type}'s group={group} does not divide its {weight.shape[0]} input channels")
    out_channels = weight.shape[0] if conv.op_type == "Conv" else weight.shape[1] * group
    if out_channels != site.channels:
        return Skip(f"the {conv.op_type} has {out_channels} output channels but the BN has {site.channels}")
    if bias is not None and bias.shape != (out_channels,):
        from ...errors import InvalidModelError
        raise InvalidModelError(f"{conv.op_type} '{conv.name or conv.output[0]}' has a bias of shape "
                                f"{tuple(bias.shape)}; a {conv.op_type} bias is a vector of its {out_channels} "
                                "output channels (the model is invalid)")
    add_bias = None
    if add_i is not None:
        add_bias = per_channel_vector(added, site.channels, weight.ndim)
        if add_bias is None:
            return Skip("the Add between the conv and the BN is not a per-channel bias")
    bias_in = bias.astype(np.float64) if bias is not None else None
    if add_bias is not None:
        bias_in = add_bias if bias_in is None else bias_in + add_bias
    folded_bias = fold_bias(bias_in, site.s, site.t)
    w_type = elem_type_of(weight)
    too_large = (overflow_skip(f"folding would take the {conv.op_type}'s weight to",
                               _weight_peak(site, weight, conv.op_type, group), w_type)
                 or overflow_skip(f"folding would take the {conv.op_type}'s bias to",
                                  float(np.max(np.abs(folded_bias), initial=0.0)),
                                  elem_type_of(bias) if bias is not None else w_type))
    return too_large or ConvMatch(conv_i, add_i, weight, bias, folded_bias)


def rewrite(site: BnSite, m: ConvMatch) -> Rewritten:
    g = site.graph
    conv = g.nodes[m.conv]
    if conv.op_type == "Conv":
        w64 = fold_conv_weight(m.weight, site.s)
    else:
        w64 = fold_conv_transpose_weight(m.weight, site.s, int(attr(conv, "group", 1)))
    b64 = m.folded_bias
    w_type = elem_type_of(m.weight)
    b_type = elem_type_of(m.bias) if m.bias is not None else w_type
    base = conv.name or conv.output[0]
    g.set_input(m.conv, 1, g.add_initializer(cast_like(w64, w_type), f"{base}.weight_bnfolded"))
    g.set_input(m.conv, 2, g.add_initializer(cast_like(b64, b_type), f"{base}.bias_bnfolded"))
    if m.add is not None:
        g.remove_node(m.add)
    g.remove_node(site.index)
    g.rename_output(m.conv, 0, site.y)
    conv.doc_string = (conv.doc_string + "\n" if conv.doc_string else "") + f"normswap fold_conv: absorbed {site.name}"
    return Rewritten([base], producer=m.conv)


RULE = Rule("fold_conv", "BN folded into the producing Conv / ConvTranspose (also through a bias Add)",
            match, rewrite)
