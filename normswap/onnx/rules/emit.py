"""Node builders shared by the normalization rules: the forms that run fast and stay exact in ONNX Runtime.

GroupNorm is emitted as ``Reshape(N, G, -1) -> InstanceNormalization(1, 0) -> Reshape back -> Mul -> Add``:
valid from opset 6, measured faster on onnxruntime CPU than GroupNormalization-21, and numerically stable
(onnxruntime's InstanceNormalization uses a two-pass variance; GroupNormalization-21's function body computes
E[x^2] - E[x]^2 and loses all precision when |mean| >> std). InstanceNorm with per-channel affine is one
InstanceNormalization node. LayerNorm over channels is an explicit two-pass ReduceMean form (faster on
onnxruntime CPU than LayerNormalization on a channels-last view).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..._math import per_channel_shape
from .base import BnSite, cast_like

FLOAT = onnx.TensorProto.FLOAT


class Emitter:
    """Builds named nodes and constants for one BN site; every name carries the site and the rule."""

    def __init__(self, site: BnSite, rule: str) -> None:
        self.site, self.g, self.rule = site, site.graph, rule
        self.nodes: list[onnx.NodeProto] = []
        self.doc = f"normswap {rule}: replaces {site.name}"

    def value(self, hint: str) -> str:
        return self.g.new_value(f"{self.site.name}.{hint}")

    def const(self, array: np.ndarray, hint: str) -> str:
        return self.g.add_initializer(array, f"{self.site.name}.{hint}")

    def node(self, op: str, inputs: list[str], output: str | None = None, hint: str = "", **attrs) -> str:
        out = output or self.value(hint or op.lower())
        name = self.g.names.fresh(f"{self.site.name}/normswap_{self.rule}_{(hint or op).lower()}")
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, doc_string=self.doc, **attrs))
        return out

    def reduce(self, op: str, x: str, axes: list[int], hint: str) -> str:
        """Reduce over ``axes`` with keepdims; axes are an input from opset 18, an attribute before."""
        if self.g.opset >= 18:
            return self.node(op, [x, self.const(np.array(axes, np.int64), f"{hint}_axes")], hint=hint, keepdims=1)
        return self.node(op, [x], hint=hint, axes=axes, keepdims=1)

    def commit(self) -> list[str]:
        self.g.replace_node(self.site.index, self.nodes)
        return [n.name for n in self.nodes]


def _static_tail(site: BnSite) -> list[int] | None:
    dims = site.x_type.dims if site.x_type is not None else None
    if dims is not None and all(isinstance(d, int) and d > 0 for d in dims[1:]):
        return list(dims[1:])
    return None


def group_normalize(e: Emitter, x: str, groups: int) -> tuple[str, tuple[str, str, str]]:
    """``z`` = GroupNorm(x) without affine, in float32 (InstanceNormalization's type on onnxruntime CPU), and
    the three initializers that fix G (so calibration can change it)."""
    site = e.site
    consts = (e.const(np.array([0, groups, -1], np.int64), "group_shape"),
              e.const(np.ones(groups, np.float32), "unit_scale"), e.const(np.zeros(groups, np.float32), "zero_shift"))
    shaped = e.node("Reshape", [x, consts[0]], hint="to_groups")
    normalized = e.node("InstanceNormalization", [shaped, consts[1], consts[2]], hint="instancenorm",
                        epsilon=site.eps)
    tail = _static_tail(site)
    if tail is not None:
        shape = e.const(np.array([0] + tail, np.int64), "channel_shape")
    else:
        shape = e.node("Shape", [x], hint="input_shape")
    return e.node("Reshape", [normalized, shape], hint="from_groups"), consts


def to_float(e: Emitter, x: str, elem_type: int) -> str:
    return x if elem_type == FLOAT else e.node("Cast", [x], hint="to_float", to=FLOAT)


def from_float(e: Emitter, x: str, elem_type: int, output: str | None = None) -> str:
    if elem_type == FLOAT:
        return x
    return e.node("Cast", [x], output, hint="from_float", to=elem_type)


def affine(e: Emitter, z: str, scale: np.ndarray, shift: np.ndarray, rank: int, elem_type: int
           ) -> tuple[str, str]:
    """``y = z * scale + shift`` per channel into the BN's output name; returns the two initializer names."""
    shape = per_channel_shape(e.site.channels, rank)
    s = e.const(cast_like(scale.reshape(shape), elem_type), "norm_scale")
    t = e.const(cast_like(shift.reshape(shape), elem_type), "norm_shift")
    scaled = e.node("Mul", [z, s], hint="scale")
    e.node("Add", [scaled, t], e.site.y, hint="shift")
    return s, t


def instance_norm(e: Emitter, x: str, scale: np.ndarray, shift: np.ndarray, elem_type: int) -> tuple[str, str]:
    """One InstanceNormalization with per-channel scale and shift (float32 inside)."""
    xf = to_float(e, x, elem_type)
    s = e.const(scale.astype(np.float32), "norm_scale")
    t = e.const(shift.astype(np.float32), "norm_shift")
    y = e.node("InstanceNormalization", [xf, s, t], None if elem_type != FLOAT else e.site.y, hint="instancenorm",
               epsilon=e.site.eps)
    from_float(e, y, elem_type, e.site.y)
    return s, t


def channel_layer_norm(e: Emitter, x: str, scale: np.ndarray, shift: np.ndarray, rank: int, elem_type: int
                       ) -> tuple[str, str]:
    """LayerNorm over axis 1 at every position, with per-channel scale and shift, as a two-pass
    ReduceMean / Sub / Mul / ReduceMean / Add / Sqrt / Div form: valid at every opset, stable, and measured faster
    on onnxruntime CPU than Transpose -> LayerNormalization -> Transpose (1.2-1.3 vs 1.9 ms on 8x256x28x28)."""
    mean = e.reduce("ReduceMean", x, [1], "mean")
    d = e.node("Sub", [x, mean], hint="centered")
    var = e.reduce("ReduceMean", e.node("Mul", [d, d], hint="squared"), [1], "variance")
    eps = e.const(cast_like(np.array(e.site.eps), elem_type), "epsilon")
    std = e.node("Sqrt", [e.node("Add", [var, eps], hint="variance_eps")], hint="std")
    return affine(e, e.node("Div", [d, std], hint="normalized"), scale, shift, rank, elem_type)
