"""Calibration statistics computed inside the onnxruntime graph, where the activations already are.

For a new layer with input ``x`` (C channels) and the original BN's output ``y`` (fed in), the per-channel least
squares ``y ~ a * z + b`` needs five sums over positions of z, z^2, y, y^2 and z*y, for ``z`` the layer's
normalized input under each candidate group count. For GroupNorm (any G) these follow exactly from five
per-sample, per-channel moments of ``x`` -- sum x, sum x^2, sum x*y, sum y, sum y^2 -- since z is x shifted and
scaled by per-(sample, group) constants (``_math.group_fit_sums``): every candidate group count shares one
pass, and no normalized tensor is ever built. ``x`` and ``y`` are centred first by per-channel constants (the
BN's running mean and beta) so float32 sums do not cancel when |mean| >> std.

LayerNorm over channels at each position (``None``) has no such shortcut: its z is computed (two-pass) and its
sums reduced directly.

Every sum is reduced over positions only, giving (N, C) per sample, so rows that pad a fixed-batch model can be
left out; the caller adds the rows up in float64. Nothing but these small arrays leaves the session.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

FLOAT = onnx.TensorProto.FLOAT


class _Builder:
    def __init__(self, graph: onnx.GraphProto, opset: int, prefix: str) -> None:
        self.graph, self.opset, self.prefix, self.k = graph, opset, prefix, 0

    def name(self, hint: str) -> str:
        self.k += 1
        return f"{self.prefix}/{hint}_{self.k}"

    def const(self, array: np.ndarray, hint: str) -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], hint: str, **attrs) -> str:
        out = self.name(hint)
        self.graph.node.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def reduce(self, op: str, x: str, axis: int, keepdims: int, hint: str) -> str:
        """Reduce over one axis: ``axes`` is an input from opset 13 (ReduceSum) / 18 (the others)."""
        as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if as_input:
            return self.node(op, [x, self.const(np.array([axis], np.int64), "axes")], hint, keepdims=keepdims)
        return self.node(op, [x], hint, axes=[axis], keepdims=keepdims)

    def per_channel(self, x: str, channels: int) -> str:
        return self.node("Reshape", [x, self.const(np.array([0, channels, -1], np.int64), "shape")], "rows")




def add_fit_stats(graph: onnx.GraphProto, opset: int, *, x: str, target: str, channels: int, eps: float,
                  x_center: np.ndarray, y_center: np.ndarray, channel_norm: bool, prefix: str,
                  elem_type: int = FLOAT) -> tuple[str, dict[str, str]]:
    """Append the nodes computing the sums for one layer to ``graph`` (``target`` must be fed) and declare them
    as outputs; returns the name of the (N, C, P) shape output and the output name of each sum: ``MOMENTS`` for
    GroupNorm candidates, ``Z_SUMS`` when ``channel_norm``. ``elem_type``: of ``x`` and ``target`` (cast to
    float32 unless they are)."""
    b = _Builder(graph, opset, prefix)

    def centred(value: str, center: np.ndarray, hint: str) -> str:
        rows = b.per_channel(value if elem_type == FLOAT else b.node("Cast", [value], hint, to=FLOAT), channels)
        return b.node("Sub", [rows, b.const(np.asarray(center, np.float32).reshape(1, channels, 1), "centre")],
                      f"{hint}c")

    def total(value: str, hint: str) -> str:
        return b.reduce("ReduceSum", value, 2, 0, hint)

    yc = centred(target, y_center, "y")
    shape = b.node("Shape", [yc], "shape")
    sums = {"sy": total(yc, "sy"), "syy": b.reduce("ReduceSumSquare", yc, 2, 0, "syy")}
    if channel_norm:
        xf = x if elem_type == FLOAT else b.node("Cast", [x], "x", to=FLOAT)
        mean = b.reduce("ReduceMean", xf, 1, 1, "mean")
        d = b.node("Sub", [xf, mean], "centered")
        var = b.reduce("ReduceMean", b.node("Mul", [d, d], "squared"), 1, 1, "var")
        std = b.node("Sqrt", [b.node("Add", [var, b.const(np.array(eps, np.float32), "eps")], "var_eps")], "std")
        z = b.per_channel(b.node("Div", [d, std], "z"), channels)
        sums.update(sz=total(z, "sz"), szz=total(b.node("Mul", [z, z], "zz"), "szz"),
                    szy=total(b.node("Mul", [z, yc], "zy"), "szy"))
    else:
        xc = centred(x, x_center, "x")
        sums.update(sx=total(xc, "sx"), sxx=b.reduce("ReduceSumSquare", xc, 2, 0, "sxx"),
                    sxy=total(b.node("Mul", [xc, yc], "xy"), "sxy"))
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in [shape, *sums.values()])
    return shape, sums
