"""Turn a BatchNormalization into the exact per-channel affine it computes in inference.

Before:  x -> BatchNormalization(gamma, beta, mean, var, eps) -> y
After:   x -> Mul(s) -> Add(t) -> y,   s = gamma / sqrt(var + eps),  t = beta - mean * s

``s`` and ``t`` have shape ``(C, 1, ..., 1)`` (rank - 2 trailing ones; ``(C,)`` on (N, C) input) and the element
type of ``x`` -- with BatchNormalization-15's mixed precision (fp16 ``x``, fp32 parameters) they are fp16, so
the graph stays type-consistent. Conditions: the rank and element type of ``x`` are known; ``s`` and ``t`` are
finite in that type (else the BN is kept: it normalizes ``x - mean`` first, where the affine would overflow).
One BN becomes two nodes.
"""
from __future__ import annotations

import onnx

from ...errors import option
from ..._math import per_channel_shape
import numpy as np

from .base import FLOAT_TYPES, BnSite, Rewritten, Rule, Skip, cast_like, overflow_skip


def _x_elem_type(site: BnSite) -> int | None:
    if site.x_type is not None and site.x_type.elem_type:
        return site.x_type.elem_type
    return None


def match(site: BnSite) -> int | Skip:
    if site.x_type is None or site.x_type.rank is None:
        return Skip(f"the rank of its input is unknown; pass {option('input_shapes')} so shape inference can find it")
    elem = _x_elem_type(site)
    if elem not in FLOAT_TYPES:
        return Skip("the element type of its input is unknown or not floating point")
    return (overflow_skip("its scale", float(np.max(np.abs(site.s), initial=0.0)), elem)
            or overflow_skip("its shift", float(np.max(np.abs(site.t), initial=0.0)), elem) or elem)


def rewrite(site: BnSite, elem_type: int) -> Rewritten:
    g = site.graph
    shape = per_channel_shape(site.channels, site.x_type.rank)
    scale = g.add_initializer(cast_like(site.s.reshape(shape), elem_type), f"{site.name}.affine_scale")
    shift = g.add_initializer(cast_like(site.t.reshape(shape), elem_type), f"{site.name}.affine_shift")
    mid = g.new_value(f"{site.name}.affine_scaled")
    mul_name = g.names.fresh(f"{site.name}/normswap_affine_mul")
    add_name = g.names.fresh(f"{site.name}/normswap_affine_add")
    doc = f"normswap affine: exact per-channel form of {site.name}"
    g.replace_node(site.index, [
        onnx.helper.make_node("Mul", [site.x, scale], [mid], name=mul_name, doc_string=doc),
        onnx.helper.make_node("Add", [mid, shift], [site.y], name=add_name, doc_string=doc),
    ])
    return Rewritten([mul_name, add_name], scale=scale, shift=shift)


RULE = Rule("affine", "BN replaced by an exact per-channel Mul + Add", match, rewrite)
