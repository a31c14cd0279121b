"""Calibration: refit the per-channel scale and shift of every new normalization so that its output matches the
original BN's output on unlabeled data -- the network keeps what it learned.

For a new layer with normalized input ``z`` (GroupNorm / LayerNorm / InstanceNorm of its input, no affine) and
the original BN's output ``y``, the fit is the closed-form per-channel least squares ``y ~ a * z + b`` over every
sample and position (``_math.AffineFit``: five running sums per channel, so memory does not grow with the data).

Layers are fitted level by level in topological order: a layer's level is one more than the deepest new layer
upstream of it, and all layers of one level are fitted in the same pass over the data, with every upstream layer
already fitted -- each fit sees the converted network it will live in, so error does not accumulate. Each pass
runs only the prefix of the converted model that computes the values it needs (onnxruntime would run the whole
graph); the original's values are computed once and kept when they fit in ``TARGET_CACHE_BYTES``, else by a
prefix per pass. ``z`` is
computed in float64 numpy from the layer's input as onnxruntime produces it in the converted model. Afterwards
the layer producing a model output (a Gemm / MatMul head) can be refitted in closed form to the original outputs
(``refit_head``).
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx

from ..report import CalibrationReport
from .._math import AffineFit, channel_normalize, fit_choice_note, group_normalize, solve_candidates
from ..errors import UsageError
from .activations import Activations, iter_batches, prefix_model, sample_count
from .io import load_model
from .convert import NewNorm
from .graph import overwrite_initializer
from .refit_head import find_head, refit_head
from .walk import free_names, subgraphs_of

DEFAULT_BATCH_SIZE = 64
TARGET_CACHE_BYTES = 256 << 20
"""The original model's BN outputs (and outputs) over the calibration data are kept for all passes when they fit
in this many bytes: the original then runs once instead of once per level. Above it they are recomputed per
level, so memory stays bounded whatever the data size."""
Progress = Callable[[int, int, str], None]


class _Targets:
    """What the original model computes on the calibration data, for every pass: cached when small enough."""

    def __init__(self, model: onnx.ModelProto, names: list[str], data: Mapping[str, np.ndarray], batch_size: int,
                 providers: tuple[str, ...], workdir: str) -> None:
        self.model, self.providers, self.workdir = model, providers, workdir
        self.cache: list[dict[str, np.ndarray]] | None = None
        batches = list(iter_batches(data, batch_size))
        full = Activations(prefix_model(model, names), [], providers, workdir, "reference")
        first = full.run(batches[0], names)
        if sum(v.nbytes for v in first.values()) * len(batches) <= TARGET_CACHE_BYTES:
            self.cache = [first] + [full.run(b, names) for b in batches[1:]]

    def runner(self, names: list[str]):
        """A function (batch index, batch) -> values of ``names``."""
        if self.cache is not None:
            return lambda k, batch: self.cache[k]
        run = Activations(prefix_model(self.model, names), [], self.providers, self.workdir, "reference")
        return lambda k, batch: run.run(batch, names)


def norm_levels(graph: onnx.GraphProto, norms: list[NewNorm]) -> dict[str, int]:
    """Level of each new norm (by output name): 1 + the deepest new norm upstream of it. Linear in the graph."""
    outputs = {n.y for n in norms}
    level: dict[str, int] = {}
    result: dict[str, int] = {}
    for node in graph.node:
        reads = [i for i in node.input if i]
        for sub in subgraphs_of(node):
            reads.extend(free_names(sub))
        base = max((level.get(i, 0) for i in reads), default=0)
        for out in node.output:
            if out in outputs:
                result[out] = base + 1
                level[out] = base + 1
            else:
                level[out] = base
    return result


def _candidates(norm: NewNorm, choose_groups: bool) -> tuple[int | None, ...]:
    """Group counts to fit for a layer: all allowed ones when choosing by fit, else its own."""
    if choose_groups and len(norm.group_candidates) > 1 and norm.group_consts is not None:
        return norm.group_candidates
    return (norm.groups,)


def _normalized(norm: NewNorm, groups: int | None, x: np.ndarray) -> np.ndarray:
    return channel_normalize(x, norm.eps) if groups is None else group_normalize(x, groups, norm.eps)


def _apply_groups(inits: dict[str, onnx.TensorProto], norm: NewNorm, groups: int, sse: dict) -> None:
    """Re-point the emitted GroupNorm at ``groups`` groups (reshape shape and unit InstanceNorm parameters)."""
    shape, ones, zeros = norm.group_consts
    overwrite_initializer(inits[shape], np.array([0, groups, -1], np.int64), keep_shape=False)
    overwrite_initializer(inits[ones], np.ones(groups, np.float32), keep_shape=False)
    overwrite_initializer(inits[zeros], np.zeros(groups, np.float32), keep_shape=False)
    norm.groups = norm.record.groups = groups
    norm.record.reason += fit_choice_note(groups, sse)


def calibrate(reference: onnx.ModelProto | Path, converted: onnx.ModelProto, norms: list[NewNorm],
              data: Mapping[str, np.ndarray], providers: tuple[str, ...], *, batch_size: int = DEFAULT_BATCH_SIZE,
              refit_output_layer: bool = True, choose_groups: bool = True, progress: Progress | None = None
              ) -> CalibrationReport:
    """Fit every main-graph NewNorm of ``converted`` (edited in place) to ``reference`` on ``data``."""
    start = time.perf_counter()
    samples = sample_count(data)
    if samples is None:
        raise UsageError("the calibration arrays hold different numbers of samples; give every input the same "
                         "first dimension")
    fitted = [n for n in norms if n.graph == "main"]
    report = CalibrationReport(samples, batch_size, 0, 0.0, "all" if refit_output_layer else "norms")
    skipped = len(norms) - len(fitted)
    if skipped:
        report.notes.append(f"{skipped} layer(s) inside control-flow bodies keep the copied gamma/beta "
                            "(calibration reads main-graph values only)")
    inits = {t.name: t for t in converted.graph.initializer}
    levels = norm_levels(converted.graph, fitted)
    by_level: dict[int, list[NewNorm]] = {}
    for n in fitted:
        by_level.setdefault(levels[n.y], []).append(n)
    batches = -(-samples // batch_size)
    head = find_head(converted) if refit_output_layer else None
    total = (len(by_level) + (head is not None)) * batches
    done = 0
    with tempfile.TemporaryDirectory(prefix="normswap-calib-") as workdir:
        ref_model = load_model(reference, lazy_external=True).model if isinstance(reference, Path) else reference
        targets_of = _Targets(ref_model, [n.y for n in fitted] + ([head.output] if head else []), data, batch_size,
                              providers, workdir)
        if targets_of.cache is not None:
            report.passes += 1
        for level in sorted(by_level):
            group = by_level[level]
            original = targets_of.runner([n.y for n in group])
            candidate = Activations(prefix_model(converted, [n.x for n in group]), [], providers, workdir,
                                    "candidate")
            fits = {n.y: {g: AffineFit(n.channels) for g in _candidates(n, choose_groups)} for n in group}
            for k, batch in enumerate(iter_batches(data, batch_size)):
                targets = original(k, batch)
                inputs = candidate.run(batch, [n.x for n in group])
                for n in group:
                    for g, fit in fits[n.y].items():
                        fit.add(_normalized(n, g, inputs[n.x]), targets[n.y])
                done += 1
                if progress:
                    progress(done, total, f"calibrating level {level}/{len(by_level)}")
            for n in group:
                chosen, a, b, sse = solve_candidates(fits[n.y])
                if chosen != n.groups:
                    _apply_groups(inits, n, chosen, sse)
                overwrite_initializer(inits[n.scale], a)
                overwrite_initializer(inits[n.shift], b)
                n.record.calibrated = True
                report.layers_changed.append(n.record.name)
            report.passes += 1
        if head is not None:
            original = targets_of.runner([head.output])
            candidate = Activations(prefix_model(converted, [head.input]), [], providers, workdir, "candidate")

            def pairs():
                nonlocal done
                for k, batch in enumerate(iter_batches(data, batch_size)):
                    yield (candidate.run(batch, [head.input])[head.input], original(k, batch)[head.output])
                    done += 1
                    if progress:
                        progress(done, total, "refitting the output layer")
            outcome = refit_head(converted, head, pairs())
            report.passes += 1
            report.notes.append(outcome)
            if outcome.startswith("refitted"):
                report.head = head.name
                report.layers_changed.append(head.name)
    report.seconds = time.perf_counter() - start
    return report
