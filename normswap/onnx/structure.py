"""Structural checks of a parsed model, before anything reads it: what would otherwise end in an internal error.

Every tensor (initializers, Constant and other tensor attributes, in every graph) must have a known element type
and a payload that matches its dims (raw bytes of exactly the element size times the element count, or that many
typed values); external tensors are checked against their files by ``external`` when they are read. Every node
must be a known operator with as many inputs and outputs as its schema allows (default domain), and read only
values defined before it (graph inputs, initializers, earlier node outputs, or an enclosing
graph's values): a graph out of topological order or with a cycle is refused. A BatchNormalization needs an
input and an output. Linear in the size of the model; no weight is copied.
"""
from __future__ import annotations

import functools

import numpy as np
import onnx

from ..errors import InvalidModelError
from .walk import subgraphs_of

_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _element_count(tensor: onnx.TensorProto) -> int:
    if any(d < 0 for d in tensor.dims):
        raise InvalidModelError(f"tensor '{tensor.name}' has a negative dimension {list(tensor.dims)}")
    return int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1


def check_tensor(tensor: onnx.TensorProto, where: str) -> None:
    """Known element type, payload consistent with the dims (external payloads are checked when read)."""
    what = f"tensor '{tensor.name}' ({where})"
    if tensor.data_type == onnx.TensorProto.UNDEFINED or tensor.data_type not in onnx.TensorProto.DataType.values():
        raise InvalidModelError(f"{what} has an unknown element type ({tensor.data_type}); the model is corrupt")
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return
    if tensor.external_data:
        raise InvalidModelError(f"{what} lists external data but is not marked EXTERNAL; the model is corrupt")
    count = _element_count(tensor)
    if tensor.data_type == onnx.TensorProto.STRING:
        if tensor.raw_data or len(tensor.string_data) != count:
            raise InvalidModelError(f"{what} is a string tensor of {count} elements holding "
                                    f"{len(tensor.string_data)} strings and {len(tensor.raw_data)} raw bytes")
        return
    from .external import tensor_nbytes
    try:
        expected = tensor_nbytes(tensor)
    except Exception:  # an element type numpy has no counterpart for
        raise InvalidModelError(f"{what} has element type {tensor.data_type}, which normswap cannot read") from None
    if tensor.HasField("raw_data"):
        held = len(tensor.raw_data)  # protobuf copies the bytes for this: about 0.2 s on a 677 MiB model
        if expected is not None and held != expected:
            raise InvalidModelError(f"{what} holds {held} bytes of data, but its dims {list(tensor.dims)} need "
                                    f"{expected}")
        return
    typed = [len(getattr(tensor, f)) for f in _TYPED_FIELDS if len(getattr(tensor, f))]
    if typed and tensor.data_type not in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        held = typed[0]
        complex_type = tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)
        needed = count * (2 if complex_type else 1)
        if held != needed:
            raise InvalidModelError(f"{what} holds {held} values, but its dims {list(tensor.dims)} need {needed}")
    elif not typed and count:
        raise InvalidModelError(f"{what} has dims {list(tensor.dims)} but no data")


@functools.lru_cache(maxsize=1024)
def _schema(op_type: str, opset: int):
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain="")
    except Exception:  # onnx.defs.SchemaError: no such operator
        return None


def _check_arity(node: onnx.NodeProto, opset: int, label: str) -> None:
    """A default-domain node must be a known operator with a number of inputs and outputs its schema allows."""
    if node.domain not in ("", "ai.onnx"):
        return
    schema = _schema(node.op_type, opset)
    if schema is None:
        raise InvalidModelError(f"{label} is '{node.op_type}', which is no ONNX operator at opset {opset}")
    inputs = given = len(node.input)  # an empty name still holds an optional input's place
    while inputs and not node.input[inputs - 1]:  # trailing empty names are omitted optional inputs
        inputs -= 1
    if given < schema.min_input or inputs > schema.max_input:
        raise InvalidModelError(f"{label} ({node.op_type}) has {inputs} input(s); the operator takes "
                                f"{schema.min_input} to {schema.max_input}")
    outputs = len(node.output)
    if not schema.min_output <= outputs <= schema.max_output:
        raise InvalidModelError(f"{label} ({node.op_type}) has {outputs} output(s); the operator gives "
                                f"{schema.min_output} to {schema.max_output}")


def _check_graph(graph: onnx.GraphProto, outer: set[str], path: str, opset: int) -> None:
    defined = (set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
               | {t.values.name for t in graph.sparse_initializer})  # a sparse initializer defines its name too
    for t in graph.initializer:
        check_tensor(t, f"initializer of {path}")
    for t in graph.sparse_initializer:
        check_tensor(t.values, f"sparse initializer of {path}")
        check_tensor(t.indices, f"sparse initializer of {path}")
    for k, node in enumerate(graph.node):
        label = f"node '{node.name or node.op_type}' (#{k} of {path})"
        _check_arity(node, opset, label)
        for name in node.input:
            if name and name not in defined:
                raise InvalidModelError(f"{label} reads '{name}', which no earlier node, input or initializer "
                                        "defines (the graph has a cycle or is not in topological order)")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                check_tensor(attr.t, f"attribute '{attr.name}' of {label}")
            elif attr.type == onnx.AttributeProto.TENSORS:
                for t in attr.tensors:
                    check_tensor(t, f"attribute '{attr.name}' of {label}")
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                check_tensor(attr.sparse_tensor.values, f"attribute '{attr.name}' of {label}")
        if node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx") and (
                not node.input or not node.input[0] or not node.output or not node.output[0]):
            raise InvalidModelError(f"{label} is a BatchNormalization without an input or an output")
        for sub in subgraphs_of(node):
            _check_graph(sub, defined, f"{path}/{node.name or node.op_type}", opset)
        defined.update(o for o in node.output if o)
    for out in graph.output:
        if out.name not in defined:
            raise InvalidModelError(f"output '{out.name}' of {path} is computed by no node")


def _text_fields(message, where: str):
    """(where, value) of every string field of ``message`` and the messages inside it, except tensor payloads
    (``raw_data`` and typed data are never touched: reading them would copy the weights)."""
    for field, value in message.ListFields() if not isinstance(message, onnx.TensorProto) else (
            (message.DESCRIPTOR.fields_by_name[n], getattr(message, n)) for n in ("name", "doc_string")):
        if field.type == field.TYPE_STRING:
            for v in (value if field.is_repeated else [value]):
                yield f"{where}.{field.name}", v
        elif field.type == field.TYPE_MESSAGE:
            for k, sub in enumerate(value if field.is_repeated else [value]):
                yield from _text_fields(sub, f"{where}.{field.name}[{k}]" if field.is_repeated else
                                        f"{where}.{field.name}")
    if isinstance(message, onnx.TensorProto):
        for k, entry in enumerate(message.external_data):
            yield f"{where}.external_data[{k}]", entry.value


def _holds_bytes(message) -> bool:
    """Whether some string field that ``_text_fields`` walks holds bytes (the same walk, without building the
    location of every field: that was most of the check's time on a 121-layer densenet)."""
    if isinstance(message, onnx.TensorProto):
        return (isinstance(message.name, bytes) or isinstance(message.doc_string, bytes)
                or any(isinstance(entry.value, bytes) for entry in message.external_data))
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            if any(isinstance(v, bytes) for v in value) if field.is_repeated else isinstance(value, bytes):
                return True
        elif field.type == field.TYPE_MESSAGE:
            if any(_holds_bytes(m) for m in value) if field.is_repeated else _holds_bytes(value):
                return True
    return False


def check_text(model: onnx.ModelProto) -> None:
    """Every name and text of the model is valid UTF-8: protobuf hands invalid strings back as bytes, which no
    name comparison, message or report can use (onnxruntime itself fails on them and retries). A fast walk
    first; the one that names the field only when it found one."""
    if not _holds_bytes(model):
        return
    for where, value in _text_fields(model, ""):
        if isinstance(value, bytes):
            raise InvalidModelError(f"the model's {where.lstrip('.')} is not valid UTF-8 ({value[:40]!r}); the model "
                                    "is corrupt "
                                    "(names must be text)")


def check_structure(model: onnx.ModelProto) -> None:
    """Raise ``InvalidModelError`` (exit 3) naming the tensor or node when the model is structurally broken."""
    from .io import opset_of
    check_text(model)
    _check_graph(model.graph, set(), "the main graph", opset_of(model))
