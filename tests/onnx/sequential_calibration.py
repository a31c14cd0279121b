"""The test oracle for calibration: the plain sequential fit, level by level, with whole-model runs and every
normalized input computed in float64 numpy -- slow and obvious, the way the segmented calibration must fit."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from normswap._math import AffineFit, channel_normalize, group_normalize, solve_candidates
from normswap.onnx.graph import overwrite_initializer
from normswap.onnx.walk import free_names, subgraphs_of


def _levels(graph: onnx.GraphProto, outputs: set[str]) -> dict[str, int]:
    level: dict[str, int] = {}
    result: dict[str, int] = {}
    for node in graph.node:
        reads = [i for i in node.input if i]
        for sub in subgraphs_of(node):
            reads.extend(free_names(sub))
        base = max((level.get(i, 0) for i in reads), default=0)
        for out in node.output:
            level[out] = result[out] = base + 1 if out in outputs else base
    return {k: v for k, v in result.items() if k in outputs}


def _run(model: onnx.ModelProto, names: list[str], data: dict) -> dict[str, np.ndarray]:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, data)))


def sequential_fit(reference: onnx.ModelProto, converted: onnx.ModelProto, norms, data: dict,
                   choose_groups: bool = True) -> None:
    """Fit ``norms`` of ``converted`` (edited in place) level by level; the head is not refitted."""
    inits = {t.name: t for t in converted.graph.initializer}
    levels = _levels(converted.graph, {n.y for n in norms})
    for level in sorted(set(levels.values())):
        group = [n for n in norms if levels[n.y] == level]
        xs = _run(converted, [n.x for n in group], data)
        ys = _run(reference, [n.y for n in group], data)
        for n in group:
            candidates = (n.group_candidates if choose_groups and len(n.group_candidates) > 1
                          and n.group_consts is not None else (n.groups,))
            fits = {}
            for g in candidates:
                z = channel_normalize(xs[n.x], n.eps) if g is None else group_normalize(xs[n.x], g, n.eps)
                fits[g] = AffineFit(n.channels)
                fits[g].add(z, ys[n.y])
            chosen, a, b, _ = solve_candidates(fits)
            if chosen != n.groups:
                shape, ones, zeros = n.group_consts
                overwrite_initializer(inits[shape], np.array([0, chosen, -1], np.int64), keep_shape=False)
                overwrite_initializer(inits[ones], np.ones(chosen, np.float32), keep_shape=False)
                overwrite_initializer(inits[zeros], np.zeros(chosen, np.float32), keep_shape=False)
                n.groups = chosen
            overwrite_initializer(inits[n.scale], a)
            overwrite_initializer(inits[n.shift], b)
