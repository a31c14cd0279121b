"""Weight normalization: fold BN into its producer, then express the producer's weight as ``g * v / ||v||``.

Before:  x -> Conv(W, b) -> BatchNormalization -> y
After:   v -> ReduceL2(all axes but the output-channel axis) -> n;  v / n * g -> W';  x -> Conv(W', b') -> y

``v`` is the folded weight and ``g = ||v||`` per output channel (computed in float64), so the model carries
weight-norm parameters (direction ``v``, magnitude ``g``) and computes exactly what the original did. The
output-channel axis is 0 for Conv and Gemm with transB=1, 1 for ConvTranspose, MatMul and Gemm with transB=0
(for a grouped ConvTranspose, axis 1 holds one channel of each group, as in ``torch.nn.utils.weight_norm(dim=1)``).
Conditions: those of the fold rules, no all-zero output channel (its direction is undefined) and ``g`` finite in
the weight's dtype; otherwise the site stays folded, reported.
"""
from __future__ import annotations

import numpy as np

from .base import BnSite, Rewritten, Rule, attr, cast_like, elem_type_of, overflow_skip
from .emit import Emitter
from .fold_conv import RULE as FOLD_CONV
from .fold_gemm import RULE as FOLD_GEMM


def output_axis(op_type: str, node) -> int:
    if op_type == "Conv" or (op_type == "Gemm" and attr(node, "transB", 0) == 1):
        return 0
    return 1


def reparametrize(site: BnSite, producer: int) -> tuple[list[str], str]:
    """Replace the producer's weight input by ``g * v / ||v||``; returns (new node names, detail)."""
    g = site.graph
    node = g.nodes[producer]
    v_name = node.input[1]
    v = g.constant(v_name)
    axis = output_axis(node.op_type, node)
    axes = [k for k in range(v.ndim) if k != axis]
    norms = np.sqrt(np.sum(np.square(v.astype(np.float64)), axis=tuple(axes), keepdims=True))
    if not np.all(norms > 0):
        return [], "weight norm not applied: an output channel of the folded weight is all zeros"
    too_large = overflow_skip("the magnitude g", float(np.max(norms)), elem_type_of(v))
    if too_large:
        return [], f"weight norm not applied: {too_large.reason}"
    e = Emitter(site, "to_weightnorm")
    magnitude = e.const(cast_like(norms, elem_type_of(v)), "weight_g")
    norm = e.reduce("ReduceL2", v_name, axes, "weight_v_norm")
    direction = e.node("Div", [v_name, norm], hint="weight_direction")
    weight = e.node("Mul", [direction, magnitude], hint="weight")
    g.insert_before(producer, e.nodes)
    g.set_input(producer, 1, weight)
    return [n.name for n in e.nodes], f"weight = g * v / ||v|| over axes {axes}"


def _wrap(fold: Rule) -> Rule:
    def rewrite(site: BnSite, m) -> Rewritten:
        folded = fold.rewrite(site, m)
        nodes, detail = reparametrize(site, folded.producer)
        return Rewritten(folded.new_nodes + nodes, producer=folded.producer, detail=detail)
    return Rule(f"weight_{fold.name}", f"{fold.summary}, then weight-normalized", fold.match, rewrite)


RULES: tuple[Rule, ...] = (_wrap(FOLD_CONV), _wrap(FOLD_GEMM))
