"""Constant evaluation the way onnxruntime sees constants.

A value is constant when it is an initializer that cannot be overridden (not also a graph input, or IR < 4),
the output of a ``Constant`` node, or the output of a deterministic default-domain node whose inputs are all
constant (``ConstantOfShape``, ``Expand``, ``CastLike``, ``Shape`` of an initializer, ``Reshape``...). Such
small subgraphs are evaluated on demand with onnx's reference evaluator, which runs no user code. Values defined
in an enclosing graph are looked up there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper

from .external import tensor_array

if TYPE_CHECKING:
    from .graph import GraphIndex

NOT_EVALUATED = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    "If", "Loop", "Scan", "SequenceMap",
})
# Do not materialize computed constants larger than this (a constant subgraph producing a huge tensor).
MAX_EVALUATED_ELEMENTS = 1 << 26


def constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node, whichever attribute holds it."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, np.float32)
        if attr.name == "value_floats":
            return np.array(attr.floats, np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, np.int64)
        if attr.name == "value_ints":
            return np.array(attr.ints, np.int64)
    return None


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


class ConstantEvaluator:
    def __init__(self, index: "GraphIndex", opset: int) -> None:
        self.index = index
        self.opset = opset
        self._computed: dict[str, np.ndarray | None] = {}

    def value(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        idx = self.index
        if name in idx.initializers:
            if idx.is_overridable_initializer(name):
                return None
            return tensor_array(idx.initializers[name])
        if name in idx.inputs:
            return None
        p = idx.producer_of(name)
        if p is None:
            return idx.parent.constant(name) if idx.parent is not None and not idx.defines(name) else None
        if name in self._computed:
            return self._computed[name]
        result = self._evaluate(idx.nodes[p], name)
        self._computed[name] = result
        return result

    def _from_type_info(self, node: onnx.NodeProto) -> np.ndarray | None:
        """Values that need only the *type* of a run-time tensor: ``CastLike(const, x)`` needs x's element type,
        ``Shape(x)`` a fully static shape of x (onnxruntime folds both the same way)."""
        if node.op_type == "CastLike" and len(node.input) == 2 and self.value(node.input[1]) is None:
            source = self.value(node.input[0])
            like = self.index.value_type(node.input[1])
            if source is None or like is None or not like.elem_type:
                return None
            return source.astype(onnx.helper.tensor_dtype_to_np_dtype(like.elem_type))
        if node.op_type == "Shape" and self.value(node.input[0]) is None:
            vt = self.index.value_type(node.input[0])
            if vt is None or vt.dims is None or not all(isinstance(d, int) and d > 0 for d in vt.dims):
                return None
            dims = np.array(vt.dims, np.int64)
            start, end = _attr_int(node, "start", 0), _attr_int(node, "end", len(dims))
            return dims[start:end]
        return None

    def _evaluate(self, node: onnx.NodeProto, name: str) -> np.ndarray | None:
        if node.domain not in ("", "ai.onnx") or node.op_type in NOT_EVALUATED:
            return None
        if node.op_type == "Constant":
            return constant_node_value(node)
        if node.op_type in ("CastLike", "Shape"):
            special = self._from_type_info(node)
            if special is not None:
                return special
        feeds = {}
        for inp in node.input:
            if not inp:
                continue
            value = self.value(inp)
            if value is None:
                return None
            feeds[inp] = value
        try:
            from onnx.reference import ReferenceEvaluator
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception:  # an op the reference evaluator cannot run: treat as not constant
            return None
        out = dict(zip(node.output, results))
        value = out.get(name)
        if value is None or np.asarray(value).size > MAX_EVALUATED_ELEMENTS:
            return None
        return np.asarray(value)
