"""Two segment models in one: calibration runs segment ``s`` of the original and of the converted model in one
onnxruntime session and one run per batch, instead of two of each.

The second model's names (values, initializers, nodes, in every subgraph) get a prefix, so the two dataflows
cannot collide, except the ones ``links`` maps to a value of the first model: a converted segment's fit target
(the original's BN output, which the first model computes) and the data inputs both read. A linked BN output
then flows from the original's nodes to the fit sums inside the session instead of being bound into a second
one (it is still written out when a later segment of the original reads it, as its activation does). Every
node computes what it computed in its own session. Fusing needs both models to agree
on what their nodes mean (IR version, opset imports, local functions); ``can_fuse`` says whether they do.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import onnx

from .walk import subgraphs_of


def can_fuse(first: onnx.ModelProto, second: onnx.ModelProto) -> bool:
    """Whether segments of the two models can share a graph: same IR version, opset imports and functions."""
    def opsets(m):
        return sorted((o.domain, o.version) for o in m.opset_import)

    return (first.ir_version == second.ir_version and opsets(first) == opsets(second)
            and [f.SerializeToString() for f in first.functions] == [f.SerializeToString() for f in second.functions])


def rename_values(graph: onnx.GraphProto, rename: Callable[[str], str], node_prefix: str) -> None:
    """Rename every value of ``graph`` and of its subgraphs in place (inputs, outputs, value infos, initializers,
    node inputs and outputs; empty names stay empty); node names get ``node_prefix``."""
    for vi in (*graph.input, *graph.output, *graph.value_info):
        vi.name = rename(vi.name)
    for t in graph.initializer:
        t.name = rename(t.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = rename(sparse.values.name)
    for node in graph.node:
        node.input[:] = [rename(i) if i else i for i in node.input]
        node.output[:] = [rename(o) if o else o for o in node.output]
        if node.name:
            node.name = node_prefix + node.name
        for sub in subgraphs_of(node):
            rename_values(sub, rename, node_prefix)


def fuse(first: onnx.ModelProto, second: onnx.ModelProto, prefix: str, links: Mapping[str, str],
         drop_outputs: set[str] = frozenset()) -> onnx.ModelProto:
    """``first`` (edited in place and returned) with ``second``'s graph added, every name of it prefixed with
    ``prefix`` except its inputs in ``links``, which read ``links[name]`` of ``first`` instead (a value its nodes
    compute or one of its inputs). ``first``'s outputs in ``drop_outputs`` are no longer written out. ``second``
    is consumed (renamed in place)."""
    known = {i.name for i in first.graph.input} | {o for n in first.graph.node for o in n.output}
    linked = {name: to for name, to in links.items() if to in known}
    rename = lambda name: linked.get(name) or prefix + name  # noqa: E731
    g = second.graph
    rename_values(g, rename, prefix)
    out = first.graph
    out.node.extend(g.node)
    out.initializer.extend(g.initializer)
    out.sparse_initializer.extend(g.sparse_initializer)
    out.value_info.extend(g.value_info)
    out.input.extend(vi for vi in g.input if vi.name not in known)  # a linked input is first's value
    kept = [o for o in out.output if o.name not in drop_outputs]
    del out.output[:]
    out.output.extend(kept)
    out.output.extend(g.output)
    return first
