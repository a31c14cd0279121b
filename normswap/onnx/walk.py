"""Walking an ONNX graph and its nested subgraphs (If / Loop / Scan bodies) without copying anything."""
from __future__ import annotations

from collections.abc import Iterator

import onnx


def subgraphs_of(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in a node's attributes (``g`` and ``graphs``)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def iter_graphs(graph: onnx.GraphProto, path: str = "main") -> Iterator[tuple[str, onnx.GraphProto]]:
    """``(path, graph)`` for a graph and every graph nested in it, outer graphs first."""
    yield path, graph
    for node in graph.node:
        for i, sub in enumerate(subgraphs_of(node)):
            yield from iter_graphs(sub, f"{path}/{node.name or node.op_type}[{i}]")


def iter_tensors(graph: onnx.GraphProto, main_initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every TensorProto that can carry weight data: initializers and tensor attributes, in all subgraphs
    (without ``graph``'s own initializers when ``main_initializers`` is False)."""
    for _, g in iter_graphs(graph):
        if g is not graph or main_initializers:
            yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads from enclosing scopes: used by its nodes, defined neither by its inputs,
    initializers nor nodes. Linear in the size of the graph and its subgraphs."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        defined.update(node.output)
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for sub in subgraphs_of(node):
            used |= free_names(sub)
    used.update(o.name for o in graph.output)
    return used - defined


def iter_all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a model except the main graph's dense initializers: subgraph initializers, the parts
    of sparse initializers and sparse attributes, tensor attributes, in every graph and every local function."""
    graphs = [g for _, g in iter_graphs(model.graph)]
    nodes = [n for g in graphs for n in g.node]
    for function in model.functions:
        for node in function.node:
            nodes.append(node)
            for sub in subgraphs_of(node):
                for _, g in iter_graphs(sub):
                    graphs.append(g)
                    nodes.extend(g.node)
    for g in graphs:
        if g is not model.graph:
            yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
    for node in nodes:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
                for sparse in attr.sparse_tensors:
                    yield sparse.values
                    yield sparse.indices
