"""Fold BatchNormalization into the Gemm or MatMul that produces its (N, C) input.

Gemm.   Before: ``y = BN(alpha * A' @ B' + beta * C)``   (A' = A or A^T, B' = B or B^T by transA / transB)
        After:  ``y = alpha * A' @ B'' + 1 * C''`` with ``B''[:, n] = s[n] B'[:, n]`` (stored in B's own layout)
        and ``C'' = s * beta * C + t`` (``C`` = 0 when absent); ``beta`` becomes 1.
MatMul. Before: ``y = BN(A @ B [+ c])``     After: ``y = A @ B'' + c''`` with ``c'' = s * c + t``; the BN node
        becomes the Add (or the existing bias Add is reused), so the node count does not grow.

Conditions: the output is 2-D, so the BN's channel axis (1) is the weight's output axis -- after a 3-D MatMul
(B, T, K) @ (K, N) the BN normalizes T, which no weight column holds, and the rule skips (affine fallback);
B is a constant, floating-point 2-D matrix; C / c are constant and per-feature; the producer's output is read by
the BN (or the bias Add) alone; B'' and the new bias stay finite in B's dtype (float16 tops out at 65504).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ...errors import option
from ..._math import fold_bias, fold_matrix_columns, scaled_max_abs
from .base import (BnSite, Rewritten, Rule, Skip, attr, cast_like, constant_float_weight, elem_type_of, overflow_skip,
                   per_channel_vector, producer_through_bias_add, set_attr, single_reader)


@dataclass
class MatrixMatch:
    node: int
    add: int | None
    weight: np.ndarray
    transposed: bool
    folded_bias: np.ndarray  # float64: s * (bias, with Gemm's beta) + t


def match(site: BnSite) -> MatrixMatch | Skip | None:
    found = producer_through_bias_add(site, ("Gemm", "MatMul"))
    if found is None or isinstance(found, Skip):
        return found
    i, add_i, added = found
    g = site.graph
    node = g.nodes[i]
    if add_i is not None and node.op_type != "MatMul":
        return None  # Gemm carries its own bias: an Add after it is not this rule's pattern
    guard = single_reader(g, node.output[0], add_i if add_i is not None else site.index)
    if guard:
        return guard
    if site.x_type is None or site.x_type.rank is None:
        return Skip(f"the rank of the {node.op_type} output is unknown; pass {option('input_shapes')} so it can be "
                    "inferred")
    if site.x_type.rank != 2:
        return Skip(f"the {node.op_type} output is {site.x_type.rank}-D, so the BN's channel axis is not the "
                    "weight's output axis")
    weight = constant_float_weight(site, node)
    if isinstance(weight, Skip):
        return weight
    if weight.ndim != 2:
        return Skip(f"the {node.op_type}'s weight is not a 2-D matrix")
    transposed = node.op_type == "Gemm" and attr(node, "transB", 0) == 1
    n = weight.shape[0] if transposed else weight.shape[1]
    if n != site.channels:
        return Skip(f"the {node.op_type} has {n} output features but the BN has {site.channels}")
    bias = None
    if add_i is not None:
        bias = per_channel_vector(added, site.channels, 2)
        if bias is None:
            return Skip("the Add between the MatMul and the BN is not a per-feature bias")
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        c = g.constant(node.input[2])
        if c is None:
            return Skip("the Gemm's C input is not constant")
        beta = float(attr(node, "beta", 1.0))
        c64 = np.asarray(c, np.float64) * beta
        bias = per_channel_vector(c64, site.channels, 2)
        if bias is None:  # C varies along rows too: keep its full shape
            bias = c64
    w_type = elem_type_of(weight)
    peak = scaled_max_abs(weight, site.s, (n, 1) if transposed else (1, n))
    folded_bias = fold_bias(bias, site.s, site.t)
    too_large = (overflow_skip(f"folding would take the {node.op_type}'s weight to", peak, w_type)
                 or overflow_skip(f"folding would take the {node.op_type}'s bias to",
                                  float(np.max(np.abs(folded_bias), initial=0.0)), w_type))
    return too_large or MatrixMatch(i, add_i, weight, transposed, folded_bias)


def rewrite(site: BnSite, m: MatrixMatch) -> Rewritten:
    g = site.graph
    node = g.nodes[m.node]
    base = node.name or node.output[0]
    w_type = elem_type_of(m.weight)
    w_name = g.add_initializer(cast_like(fold_matrix_columns(m.weight, site.s, m.transposed), w_type),
                               f"{base}.weight_bnfolded")
    g.set_input(m.node, 1, w_name)
    b64 = m.folded_bias
    if node.op_type == "Gemm":
        g.set_input(m.node, 2, g.add_initializer(cast_like(b64, w_type), f"{base}.bias_bnfolded"))
        set_attr(node, "beta", 1.0)
        g.remove_node(site.index)
        g.rename_output(m.node, 0, site.y)
        node.doc_string = (node.doc_string + "\n" if node.doc_string else "") + f"normswap fold_gemm: absorbed {site.name}"
        return Rewritten([base], producer=m.node)
    bias_name = g.add_initializer(cast_like(b64, w_type), f"{base}.bias_bnfolded")
    add_name = g.names.fresh(f"{site.name}/normswap_fold_gemm_add")
    add = onnx.helper.make_node("Add", [node.output[0], bias_name], [site.y], name=add_name,
                                doc_string=f"normswap fold_gemm: bias of {site.name} folded into {base}")
    if m.add is not None:
        g.remove_node(m.add)
    g.replace_node(site.index, [add])
    return Rewritten([base, add_name], producer=m.node)


RULE = Rule("fold_gemm", "BN folded into the producing Gemm / 2-D MatMul", match, rewrite)
