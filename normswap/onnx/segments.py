"""Cutting a model into segments at its calibration levels, so calibration runs every node once.

A new normalization can be fitted only when every new layer upstream of it is fitted. Running a prefix of the
model per level costs depth x model; instead the graph is cut into segments. Walking the nodes in topological
order, a node's segment is the largest segment among the values it reads (graph inputs and constants: 0), and

- a *late* node -- one that applies a new layer's fitted scale or shift -- lands at least one segment after the
  segment of that layer's input ``x``: the layer is fitted between the two segments;
- a *raised* value -- the output ``y`` of an original BatchNormalization -- is computed in the segment of its
  input but counts as one segment later for its readers, so the original is cut exactly where the converted
  model is.

Segment ``s`` then reads values of earlier segments (kept between segments by the caller) and writes what later
segments read. Only the nodes the caller's ``roots`` depend on are kept. Linear in the graph.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import option
from .walk import free_names, subgraphs_of


@dataclass
class Segment:
    index: int
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    reads: list[str] = field(default_factory=list)   # values from earlier segments or graph inputs
    writes: list[str] = field(default_factory=list)  # values produced here that later segments or the caller need


@dataclass
class Plan:
    segments: list[Segment]
    segment_of: dict[str, int]  # value name -> segment that computes it (graph inputs: absent)
    last_use: dict[str, int]    # value name -> last segment that needs it
    dead_after: dict[int, list[str]] = field(default_factory=dict)  # segment -> values no later segment needs


def reads_of(node: onnx.NodeProto) -> list[str]:
    names = [i for i in node.input if i]
    for sub in subgraphs_of(node):
        names.extend(free_names(sub))
    return names


def _needed(graph: onnx.GraphProto, roots: Iterable[str]) -> list[bool]:
    """Which nodes the ``roots`` depend on (backward liveness, one pass)."""
    needed = set(roots)
    keep = [False] * len(graph.node)
    for i in range(len(graph.node) - 1, -1, -1):
        node = graph.node[i]
        if any(o in needed for o in node.output):
            keep[i] = True
            needed.update(reads_of(node))
    return keep


def plan_segments(graph: onnx.GraphProto, *, roots: Iterable[str], late: Mapping[int, str] | None = None,
                  raised: Mapping[str, str] | None = None, export: Mapping[str, int] | None = None,
                  hold: Iterable[str] = (), count: int | None = None) -> Plan:
    """Cut ``graph`` into segments (see the module docstring).

    ``late``: node index -> the value ``x`` whose segment the node must follow; ``raised``: value -> the value
    ``x`` whose segment + 1 it counts as; ``export``: value -> segment that must write it for the caller (it is
    kept to the end of that segment); ``hold``: values the caller needs after the last segment; ``count``: at
    least this many segments."""
    late, raised, export = dict(late or {}), dict(raised or {}), dict(export or {})
    constants = {t.name for t in graph.initializer}
    keep = _needed(graph, set(roots) | set(export) | set(hold))
    folded = _constant_nodes(graph, keep, constants, late)
    folded_outputs = {o: i for i in folded for o in graph.node[i].output}
    segment_of: dict[str, int] = {}
    placed: list[tuple[int, onnx.NodeProto, list[str]]] = []
    for i, node in enumerate(graph.node):
        if not keep[i] or i in folded:
            continue
        reads = reads_of(node)
        s = max((segment_of.get(r, 0) for r in reads), default=0)
        if i in late:
            s = max(s, segment_of.get(late[i], 0) + 1)
        for o in node.output:
            segment_of[o] = segment_of.get(raised[o], 0) + 1 if o in raised else s
        placed.append((s, node, reads))
    total = max([s for s, _, _ in placed] + [(count or 1) - 1]) + 1
    segments = [Segment(k) for k in range(total)]
    last_use: dict[str, int] = {}
    copies: list[set[int]] = [set() for _ in range(total)]  # constant nodes each segment computes itself
    for s, node, reads in placed:
        segments[s].nodes.append(node)
        for r in reads:
            if r in folded_outputs:
                _with_inputs(graph, folded_outputs[r], folded_outputs, copies[s])
            else:
                last_use[r] = max(last_use.get(r, 0), s)
    for name in list(export) + list(hold):
        if name in folded_outputs:  # a constant the caller wants: computed by the last segment that needs it
            _with_inputs(graph, folded_outputs[name], folded_outputs, copies[min(export.get(name, total - 1),
                                                                                 total - 1)])
    for k, seg in enumerate(segments):
        seg.nodes[:0] = [graph.node[i] for i in sorted(copies[k])]
    for name, s in export.items():
        last_use[name] = max(last_use.get(name, 0), s)
    for name in hold:
        last_use[name] = total
    for seg in segments:
        made = {o for n in seg.nodes for o in n.output}
        seen: set[str] = set()
        for n in seg.nodes:
            for r in reads_of(n):
                if r not in made and r not in constants and r not in seen:
                    seen.add(r)
                    seg.reads.append(r)
        seg.writes = [o for n in seg.nodes for o in n.output
                      if o and (last_use.get(o, -1) > seg.index or export.get(o) == seg.index)]
    dead_after: dict[int, list[str]] = {}
    for name, last in last_use.items():
        dead_after.setdefault(last, []).append(name)
    return Plan(segments, segment_of, last_use, dead_after)


NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}


def _constant_nodes(graph: onnx.GraphProto, keep: list[bool], constants: set[str],
                    late: Mapping[int, str]) -> set[int]:
    """Indices of the kept nodes that read only constants (initializers, other such nodes): shape arithmetic,
    Constant nodes, weights a paddle2onnx export computes from initializers. They get no segment of their own:
    each segment that reads one computes it (onnxruntime folds it into an initializer when the session is made).
    Kept between segments instead, they reached later segments as graph inputs, where onnxruntime can neither
    fold them nor prepack a Conv weight among them (no speed change measured on the PP-OCRv4 detector, whose
    slow segments had another cause: ``validate.runner.make_session``)."""
    known = set(constants)
    out: set[int] = set()
    for i, node in enumerate(graph.node):
        if not keep[i] or i in late or node.op_type in NONDETERMINISTIC:
            continue
        reads = reads_of(node)
        if all(r in known for r in reads):
            out.add(i)
            known.update(o for o in node.output if o)
    return out


def _with_inputs(graph: onnx.GraphProto, index: int, producers: Mapping[str, int], into: set[int]) -> None:
    """Add constant node ``index`` and the constant nodes it reads (transitively) to ``into``."""
    stack = [index]
    while stack:
        i = stack.pop()
        if i in into:
            continue
        into.add(i)
        stack.extend(producers[r] for r in reads_of(graph.node[i]) if r in producers)


@dataclass
class GraphTables:
    """A graph's initializers and declared inputs by name, built once for all of its segments (each segment
    would otherwise scan every initializer: quadratic on a 122-segment densenet121)."""

    initializers: dict[str, onnx.TensorProto]
    inputs: dict[str, onnx.ValueInfoProto]

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> "GraphTables":
        return cls({t.name: t for t in graph.initializer}, {i.name: i for i in graph.input})


def segment_model(model: onnx.ModelProto, segment: Segment, dtypes: Mapping[str, np.dtype],
                  relax_batch: bool, replacements: Mapping[str, np.ndarray] | None = None,
                  tables: GraphTables | None = None) -> onnx.ModelProto:
    """A runnable model of one segment: its nodes, the initializers they read, its reads as inputs (graph inputs
    keep their declared type, with a free batch dimension when ``relax_batch``; kept values are rank-free tensors
    of the element type in ``dtypes``) and its writes as outputs. ``replacements`` give other values to some
    constants (initializers or Constant outputs) in this copy. Only the initializers it reads are copied.
    ``tables``: the model's ``GraphTables``, when the caller builds many segments of it."""
    from onnx import numpy_helper
    from .io import without_field
    replacements = replacements or {}
    graph = model.graph
    tables = tables or GraphTables.of(graph)
    out = without_field(model, "graph")
    g = out.graph
    g.CopyFrom(without_field(graph, "node", "initializer", "input", "output", "value_info"))
    for node in segment.nodes:
        if len(node.output) == 1 and node.output[0] in replacements:
            node = onnx.helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                         value=numpy_helper.from_array(replacements[node.output[0]]))
        g.node.append(node)
    reads: dict[str, None] = {}  # in first-read order
    for n in segment.nodes:
        reads.update(dict.fromkeys(reads_of(n)))
    declared = tables.inputs
    constants = [numpy_helper.from_array(replacements[name], name) if name in replacements
                 else tables.initializers[name] for name in reads if name in tables.initializers]
    g.initializer.extend(constants)
    for name in segment.reads:
        if name in declared:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(declared[name])
            dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
            if relax_batch and len(dims):
                dims[0].Clear()
                dims[0].dim_param = "normswap_batch"
            g.input.append(vi)
        elif dtypes.get(name) is None:
            from ..errors import UnsupportedError
            raise UnsupportedError(f"calibration would have to keep the non-tensor value '{name}' (a sequence or "
                                   f"map) between segments, which it cannot; convert without {option('calibration')}")
        else:
            g.input.append(onnx.helper.make_tensor_value_info(
                name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[name])), None))
    if model.ir_version < 4:  # initializers must also be graph inputs before IR 4
        g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in constants)
    g.output.extend(onnx.ValueInfoProto(name=n) for n in segment.writes)
    return out
