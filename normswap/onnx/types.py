"""Element types and shapes of every value, from ONNX shape inference run on a weightless skeleton.

The skeleton holds the nodes and small integer initializers (shapes, axes); every other initializer becomes a
typed graph input, so inference never touches (or copies) the weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from .walk import iter_graphs

# Integer initializers at most this large keep their values in the skeleton (shape tensors for Reshape, Slice
# starts, axes...); everything else -- the weights -- becomes a typed graph input.
SKELETON_VALUE_BYTES = 1 << 12
_SHAPE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


@dataclass(frozen=True)
class ValueType:
    """``elem_type`` is an ``onnx.TensorProto`` data type; ``dims`` is None when the rank is unknown, and a
    dimension is an int, a symbolic name (str) or None."""

    elem_type: int
    dims: tuple[int | str | None, ...] | None

    @property
    def rank(self) -> int | None:
        return None if self.dims is None else len(self.dims)


def _from_value_info(vi: onnx.ValueInfoProto) -> ValueType | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return ValueType(tt.elem_type, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:  # -1 / 0: dynamic (paddle2onnx writes -1)
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return ValueType(tt.elem_type, tuple(dims))


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its weights: nodes, value infos, local functions, small integer initializers; every
    other initializer and large Constant becomes a typed graph input. Cheap for any model size."""
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    g, src = skel.graph, model.graph
    g.name = src.name
    g.input.extend(src.input)
    for node in src.node:  # large Constant nodes become typed inputs: their values are not needed
        value = node.attribute[0].t if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if value is not None and node.attribute[0].name == "value" and (
                value.data_type not in _SHAPE_TYPES or len(value.raw_data) > SKELETON_VALUE_BYTES):
            g.input.append(onnx.helper.make_tensor_value_info(node.output[0], value.data_type, list(value.dims)))
        else:
            g.node.append(node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for section in (g.input, g.output, g.value_info):  # a non-positive dim_value is a dynamic dimension
        for vi in section:
            for k, d in enumerate(vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else ()):
                if d.HasField("dim_value") and d.dim_value <= 0:
                    d.dim_param = f"normswap_dynamic_{vi.name}_{k}"
    input_names = {i.name for i in src.input}
    for t in src.initializer:
        if t.data_type in _SHAPE_TYPES and t.data_location != onnx.TensorProto.EXTERNAL and \
                len(t.raw_data) + 8 * (len(t.int64_data) + len(t.int32_data)) <= SKELETON_VALUE_BYTES:
            g.initializer.append(t)
        elif t.name not in input_names:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return skel


class TypeTable:
    """Name -> ValueType, converted from the inferred value infos on first use (most are never asked for)."""

    def __init__(self) -> None:
        self._infos: dict[str, onnx.ValueInfoProto] = {}
        self._types: dict[str, ValueType | None] = {}

    def add_info(self, vi: onnx.ValueInfoProto) -> None:
        self._infos.setdefault(vi.name, vi)

    def set(self, name: str, value: ValueType) -> None:
        self._types[name] = value

    def get(self, name: str) -> ValueType | None:
        if name not in self._types:
            vi = self._infos.get(name)
            self._types[name] = None if vi is None else _from_value_info(vi)
        return self._types[name]


def infer_value_types(model: onnx.ModelProto) -> tuple[TypeTable, str | None]:
    """Element types and shapes over all graphs; second item is a note when inference failed."""
    note = None
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model), check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception as e:  # inference is best effort: rules that need a rank skip with a reason
        inferred, note = model, f"ONNX shape inference failed ({type(e).__name__}); ranks come from the model only"
    types = TypeTable()
    for _, graph in iter_graphs(inferred.graph):
        for section in (graph.value_info, graph.output, graph.input):  # the most specific first
            for vi in section:
                if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                    types.add_info(vi)
        for section in (graph.value_info, graph.output, graph.input):
            for vi in section:
                types.add_info(vi)
    for _, graph in iter_graphs(model.graph):
        for t in graph.initializer:
            types.set(t.name, ValueType(t.data_type, tuple(t.dims)))
    return types, note
