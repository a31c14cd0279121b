"""Closed-form refit of the layer that produces a model output, to the original model's outputs.

After the norm layers are calibrated, the features ``h`` reaching the final Gemm / MatMul head still differ a
little from the original's. The head ``o = h W + c`` is refitted by ridge-regularized least squares
``[h, 1] [W; c] ~ o_original`` over the calibration data (streamed: a (K+1)^2 Gram matrix and a (K+1) x M cross
matrix), and kept only if it lowers the mean squared error to the original outputs on calibration samples it
was not fitted on (cross-validated over four folds, ``LinearRefit``): with fewer samples than features the refit
interpolates the calibration data and fails on any other.

Conditions: the head is a Gemm (transA = 0) or a MatMul (optionally followed by an Add of a constant bias) that
writes a graph output, with a 2-D input, a constant initializer weight read by it alone, and a bias (if any)
likewise.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

from .._math import LinearRefit
from .external import tensor_array
from .graph import overwrite_initializer
from .rules.base import attr, set_attr, site_name

RIDGE = 1e-3  # relative to the mean diagonal of the Gram matrix


@dataclass
class Head:
    name: str
    node: onnx.NodeProto
    input: str
    output: str
    weight: str
    bias: str | None
    transposed: bool


def _uses(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    return counts


def find_head(model: onnx.ModelProto) -> Head | None:
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer} - {i.name for i in g.input}
    uses = _uses(g)

    def own(name: str | None) -> bool:
        return name is None or (name in inits and uses.get(name, 0) == 1)

    for out in g.output:
        node = producer.get(out.name)
        bias = None
        if node is not None and node.op_type == "Add":
            mm = next((producer.get(i) for i in node.input if producer.get(i) is not None
                       and producer[i].op_type == "MatMul"), None)
            if mm is None:
                continue
            bias = next((i for i in node.input if i in inits), None)
            node = mm
        if node is None or node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Gemm":
            if attr(node, "transA", 0) != 0:
                continue
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if own(node.input[1]) and own(bias):
            return Head(site_name(node), node, node.input[0], out.name, node.input[1], bias,
                        node.op_type == "Gemm" and attr(node, "transB", 0) == 1)
    return None


def _current(model: onnx.ModelProto, head: Head, outputs: int) -> np.ndarray:
    """The head's effective [W; c] as a (K+1, M) float64 matrix."""
    inits = {t.name: t for t in model.graph.initializer}
    w = tensor_array(inits[head.weight]).astype(np.float64)
    w = w.T if head.transposed else w
    alpha = float(attr(head.node, "alpha", 1.0)) if head.node.op_type == "Gemm" else 1.0
    beta = float(attr(head.node, "beta", 1.0)) if head.node.op_type == "Gemm" else 1.0
    c = np.zeros(outputs)
    if head.bias is not None:
        c = np.broadcast_to(tensor_array(inits[head.bias]).astype(np.float64) * beta, (outputs,))
    return np.vstack([alpha * w, c[None, :]])


def refit_head(model: onnx.ModelProto, head: Head, pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> str:
    """Refit ``head`` in ``model`` (edited in place) from (features, original outputs) batches; returns a note."""
    fit = LinearRefit(bias=head.bias is not None)  # no bias to hold the constant column: fit without it
    for h, o in pairs:
        if h.ndim != 2 or o.ndim != 2:
            return f"head {head.name} not refitted: its input or output is not 2-D"
        fit.add(h, o)
    if fit.gram is None:
        return f"head {head.name} not refitted: no data"
    current = _current(model, head, fit.cross.shape[1])
    outcome = fit.refit(current if head.bias is not None else current[:-1], RIDGE)
    new = outcome.new
    if new is None:
        return fit.note(outcome, f"head {head.name}")
    inits = {t.name: t for t in model.graph.initializer}
    weight = new[:-1] if head.bias is not None else new
    overwrite_initializer(inits[head.weight], weight.T if head.transposed else weight)
    if head.bias is not None:
        overwrite_initializer(inits[head.bias], new[-1])
    if head.node.op_type == "Gemm":
        set_attr(head.node, "alpha", 1.0)
        set_attr(head.node, "beta", 1.0)
    return fit.note(outcome, f"head {head.name}")
