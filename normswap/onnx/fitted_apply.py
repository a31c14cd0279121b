"""How calibration runs a new GroupNorm-family layer once it is fitted: ``y = A * x + B`` per sample and channel.

GroupNorm without affine is ``z = (x - m) * r`` with ``m`` the sample's group mean and ``r = 1 / sqrt(v + eps)``
(``v`` its group variance), so the fitted layer ``y = a * z + b`` is, exactly in real arithmetic,

    y = A * x + B,    A = a * r,    B = b - a * r * m        (per sample n and channel c, r and m of c's group)

``m`` and ``r`` come from the per-sample moments the layer's own fit was derived from (``_math.group_normalizer``,
the same algebra ``_math.group_fit_sums`` uses), so the layers downstream are fitted on the input that algebra
describes; the emitted nodes (Reshape, InstanceNormalization, Reshape, Mul, Add) compute the same values up to
float32 rounding. Two elementwise passes replace them inside calibration's segments only: the model written out
keeps its emitted nodes, with the fitted ``a``, ``b`` and group count.

Conditions (``plan_applies``; any layer that fails one runs its emitted nodes): a group count (not LayerNorm over
channels at each position), a float32 input of known rank, every emitted node in one segment, and no value
between them read by anything else.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from .._math import CONSTANT_CHANNEL, group_normalizer, unshift_moments
from .convert import NewNorm
from .segments import Plan, reads_of

SCALE = "normswap_apply_scale::"  # prefixes of the per-sample A and B fed to the segment that applies a layer
SHIFT = "normswap_apply_shift::"


@dataclass(frozen=True)
class Apply:
    """A fitted layer run as ``A * x + B`` in segment ``segment`` instead of its emitted ``nodes``."""

    norm: NewNorm
    nodes: frozenset[str]
    segment: int

    @property
    def scale(self) -> str:
        return SCALE + self.norm.y

    @property
    def shift(self) -> str:
        return SHIFT + self.norm.y


def plan_applies(graph: onnx.GraphProto, norms: Iterable[NewNorm], plan: Plan) -> dict[str, Apply]:
    """The layers (by output name) that calibration can run as ``A * x + B`` (see the module docstring). One pass
    over the graph."""
    wanted = {n.y: n for n in norms if n.groups is not None and n.elem_type == onnx.TensorProto.FLOAT
              and n.rank is not None and n.rank >= 2 and n.y in plan.segment_of}
    owner = {name: y for y, n in wanted.items() for name in n.record.new_nodes}
    inner: dict[str, str] = {}  # values the emitted nodes make, other than the layer's output -> the layer
    segments: dict[str, set[int]] = {y: set() for y in wanted}
    made_y: set[str] = set()
    for node in graph.node:
        y = owner.get(node.name)
        if y is None:
            continue
        for out in node.output:
            if out == y:
                made_y.add(y)
            elif out:
                inner[out] = y
            segments[y].add(plan.segment_of.get(out, -1))
    broken = {y for y, s in segments.items() if len(s) != 1 or -1 in s or y not in made_y}
    broken.update(inner[o.name] for o in graph.output if o.name in inner)
    for node in graph.node:
        y = owner.get(node.name)
        for name in reads_of(node):
            if name in inner and inner[name] != y:
                broken.add(inner[name])
    return {y: Apply(n, frozenset(n.record.new_nodes), segments[y].pop()) for y, n in wanted.items()
            if y not in broken}


def substitute(nodes: list[onnx.NodeProto], applies: Mapping[str, Apply]) -> list[onnx.NodeProto]:
    """``nodes`` with each applied layer's emitted nodes replaced, where the first of them stood, by
    ``Mul(x, A) -> Add(., B) -> y``."""
    owner = {name: a for a in applies.values() for name in a.nodes}
    out, placed = [], set()
    for node in nodes:
        apply = owner.get(node.name)
        if apply is None:
            out.append(node)
            continue
        if apply.norm.y in placed:
            continue
        placed.add(apply.norm.y)
        scaled = f"{apply.scale}scaled"
        out.append(onnx.helper.make_node("Mul", [apply.norm.x, apply.scale], [scaled], name=scaled))
        out.append(onnx.helper.make_node("Add", [scaled, apply.shift], [apply.norm.y], name=f"{apply.shift}add"))
    return out


def affine_inputs(norm: NewNorm, sx: np.ndarray, sxx: np.ndarray, positions: int, x_center: np.ndarray,
                  groups: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``A`` and ``B`` (float32, ``(N, C, 1, ...)`` to broadcast against x) for one batch, from its per-sample
    moments of ``x - x_center`` (``sx``, ``sxx``: (N, C) over ``positions`` positions) and the fitted ``a``,
    ``b`` and group count."""
    sx, sxx = np.asarray(sx, np.float64), np.asarray(sxx, np.float64)
    m, r = group_normalizer(sx, sxx, *unshift_moments(sx, sxx, positions, x_center), positions, groups, norm.eps,
                            CONSTANT_CHANNEL)
    scale = np.asarray(a, np.float64).reshape(1, -1) * r
    shift = np.asarray(b, np.float64).reshape(1, -1) - scale * m
    shape = shift.shape + (1,) * (norm.rank - 2)
    return scale.astype(np.float32).reshape(shape), shift.astype(np.float32).reshape(shape)
