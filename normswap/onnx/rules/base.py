"""What every rewrite rule shares: the BatchNorm site, Skip results, and the Rule record.

A rule has three parts: ``match(site) -> Match | Skip | None`` (None: the rule does not apply to this kind of
producer at all), guards inside ``match`` that each return a ``Skip`` with a reason, and
``rewrite(site, match) -> list of new or rewritten node names``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ...errors import option
from ..._math import bn_affine, nonfinite_problem
from ...targets import DEFAULT_REPLACE_OPTIONS, ReplaceOptions
from ..graph import GraphIndex
from ..types import ValueType

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                         onnx.TensorProto.BFLOAT16})


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass
class BnSite:
    """An inference BatchNormalization whose parameters are constant: ``y = s * x + t`` along axis 1."""

    graph: GraphIndex
    index: int
    name: str
    x: str
    y: str
    s: np.ndarray
    t: np.ndarray
    channels: int
    x_type: ValueType | None
    eps: float
    options: ReplaceOptions
    gamma: np.ndarray
    beta: np.ndarray

    @property
    def node(self) -> onnx.NodeProto:
        return self.graph.nodes[self.index]


@dataclass
class Rewritten:
    """What a rewrite produced: the new or rewritten nodes, the node that absorbed the BN (fold), and for a new
    normalization its group count and the initializers holding its per-channel scale and shift."""

    new_nodes: list[str]
    producer: int | None = None
    groups: int | None = None
    scale: str | None = None
    shift: str | None = None
    detail: str = ""
    group_candidates: tuple[int, ...] = ()  # group counts calibration may choose among (by measured fit)
    group_consts: tuple[str, str, str] | None = None  # initializers fixing G: reshape shape, IN scale, IN bias


@dataclass(frozen=True)
class Rule:
    name: str
    summary: str
    match: Callable[[BnSite], Any]
    rewrite: Callable[[BnSite, Any], Rewritten]


def attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for k, a in enumerate(node.attribute):
        if a.name == name:
            del node.attribute[k]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


def site_name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _param_reason(graph: GraphIndex, name: str, role: str) -> str:
    if graph.is_overridable_initializer(name):
        return (f"its {role} '{name}' is an initializer that is also a graph input, so onnxruntime lets callers "
                "override it; remove it from the graph inputs to make it constant")
    return f"its {role} '{name}' is not constant (computed from graph inputs at run time)"


def read_bn_site(graph: GraphIndex, i: int, options: ReplaceOptions = DEFAULT_REPLACE_OPTIONS) -> BnSite | Skip:
    """Check the guards every BN rewrite shares and read its per-channel affine ``(s, t)`` in float64."""
    node = graph.nodes[i]
    if attr(node, "training_mode", 0) == 1 or attr(node, "is_test", 1) == 0:
        return Skip("training_mode=1: it normalizes with the batch statistics, so it is not a fixed affine map; "
                    "export the model in eval mode")
    if attr(node, "spatial", 1) == 0:
        return Skip("spatial=0 (per-activation statistics, opset < 9) is not supported; upgrade the opset")
    if any(o for o in node.output[1:]):
        return Skip("its running-statistics outputs are used by the graph")
    if len(node.input) < 5:
        return Skip("it has fewer than five inputs")
    params = []
    for name, role in zip(node.input[1:5], ("scale", "bias", "mean", "variance")):
        value = graph.constant(name)
        if value is None:
            return Skip(_param_reason(graph, name, role))
        params.append(value)
    sizes = {p.size for p in params}
    if len(sizes) != 1 or any(p.ndim != 1 for p in params):
        return Skip("its scale, bias, mean and variance are not vectors of one common length")
    if any(not np.issubdtype(p.dtype, np.floating) and p.dtype.name != "bfloat16" for p in params):
        return Skip("its parameters are not floating point")
    eps = float(attr(node, "epsilon", 1e-5))
    problem = nonfinite_problem(params, eps)
    if problem and not options.allow_nonfinite:
        from ...errors import InvalidModelError
        raise InvalidModelError(f"BatchNormalization '{site_name(node)}' has {problem}; fix the model, or pass "
                                f"{option('allow_nonfinite', True)} to rewrite it anyway")
    s, t = bn_affine(*params, eps)
    x_type = graph.value_type(node.input[0])
    channels = int(params[0].size)
    if x_type is not None and x_type.dims is not None:
        if len(x_type.dims) < 2:
            return Skip(f"its input has rank {len(x_type.dims)}; BatchNormalization needs (N, C, ...)")
        c = x_type.dims[1]
        if isinstance(c, int) and c not in (0, channels):
            return Skip(f"its input has {c} channels but its parameters have {channels}")
    return BnSite(graph, i, site_name(node), node.input[0], node.output[0], s, t, channels, x_type, eps, options,
                  params[0].astype(np.float64), params[1].astype(np.float64))


_LARGEST = {onnx.TensorProto.FLOAT16: 65504.0, onnx.TensorProto.BFLOAT16: 3.3895313892515355e38,
            onnx.TensorProto.FLOAT: float(np.finfo(np.float32).max), onnx.TensorProto.DOUBLE: float("inf")}


def overflow_skip(what: str, peak: float, elem_type: int) -> Skip | None:
    """Guard: a value computed in float64 must stay finite once stored as ``elem_type`` (float16 tops out at
    65504: a BN scale of 1e3 on weights near 100 would become infinity)."""
    largest = _LARGEST.get(elem_type, float("inf"))
    if not largest < peak < float("inf"):  # NaN / inf come from parameters allowed by allow_nonfinite
        return None
    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return Skip(f"{what} would reach {peak:.3g}, beyond the largest {name} ({largest:.6g})")


def cast_like(array: np.ndarray, elem_type: int) -> np.ndarray:
    """Cast a float64 result once, at the end, to the ONNX element type it will be stored as."""
    return np.asarray(array).astype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def elem_type_of(array: np.ndarray) -> int:
    return onnx.helper.np_dtype_to_tensor_dtype(array.dtype)


def per_channel_vector(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """If ``value`` broadcast against a rank-``rank`` tensor varies only along axis 1 (length ``channels``),
    return it as a float64 vector of length ``channels``; else None."""
    v = np.asarray(value)
    if v.ndim > rank:
        return None
    padded = v.reshape((1,) * (rank - v.ndim) + v.shape)
    target = [1] * rank
    target[1] = channels
    if any(d not in (1, target[k]) for k, d in enumerate(padded.shape)):
        return None
    return np.broadcast_to(padded.astype(np.float64), target).reshape(channels).copy()


def single_reader(graph: GraphIndex, value: str, reader: int) -> Skip | None:
    """Guard: ``value`` must be read by node ``reader`` alone, and not be a graph output."""
    n = graph.use_count(value)
    if n == 1 and graph.live_consumers(value) == [reader]:
        return None
    others = n - 1
    return Skip(f"the producer's output '{value}' also feeds {others} other consumer(s) "
                f"(or is a graph output), which must keep seeing the unnormalized value")


DEFAULT_DOMAINS = ("", "ai.onnx")


def producer_through_bias_add(site: BnSite, ops: tuple[str, ...]
                              ) -> tuple[int, int | None, np.ndarray | None] | Skip | None:
    """Find the node of type ``ops`` producing the BN's input, directly or through one ``Add`` of a constant.

    Returns ``(producer, add or None, added constant or None)``, a ``Skip`` when an Add sits between them but
    cannot be folded, or None when no such producer exists.
    """
    g = site.graph
    p = g.producer_of(site.x)
    if p is None or g.nodes[p].domain not in DEFAULT_DOMAINS:
        return None
    node = g.nodes[p]
    if node.op_type in ops:
        return p, None, None
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    for k in (0, 1):
        q = g.producer_of(node.input[k])
        if q is None or g.nodes[q].op_type not in ops or g.nodes[q].domain not in DEFAULT_DOMAINS:
            continue
        const = g.constant(node.input[1 - k])
        if const is None:
            return Skip(f"the Add between the {g.nodes[q].op_type} and the BN adds a non-constant value")
        return single_reader(g, site.x, site.index) or (q, p, const)
    return None


def constant_float_weight(site: BnSite, node: onnx.NodeProto) -> np.ndarray | Skip:
    """Guard: the producer's weight (input 1) is a floating-point constant."""
    weight = site.graph.constant(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return Skip(f"the {node.op_type}'s weight is not constant")
    if elem_type_of(weight) not in FLOAT_TYPES:
        return Skip(f"the {node.op_type}'s weight is not floating point")
    return weight
