"""Agreement in the terms of the task: how often the converted model decides what the original decided.

Cosine similarity of raw outputs is a poor proxy (a recognizer at cosine 0.986 changed 44% of its decoded
strings), so each output shape gets the decision its task makes from it, counted over every validated sample:

- ``(N, K)``, K >= 2 -- class scores: **top-1** agreement, the share of samples whose argmax agrees.
- ``(N, T, K)``, K >= 2 -- sequences (a CTC recognizer's per-step scores): **whole-sequence** agreement, the share
  of samples whose argmax agrees at every position (identical argmax paths decode to identical strings), and
  the per-position share as a second figure.
- ``(N, C, ...)`` with C > 1 and two or more spatial axes -- score maps (segmentation): **per-pixel argmax**
  agreement over axis 1.
- ``(N, 1, ...)`` with two or more spatial axes and every reference value in [0, 1] -- probability maps (a DB text
  detector, a saliency map): **IoU** of the two maps thresholded at ``threshold`` (``> threshold``), pooled over
  all samples; 1 when neither marks anything.

Any other output has no agreement measure (None). A user's own task metric (``TaskMeasure.metric``) sees every
output of both models and replaces these.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.5
TaskMetric = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]
"""``metric(reference_outputs, candidate_outputs)``: one array per model output (in the reference's output order,
every validated sample along axis 0) for each model; returns the agreement, in 0..1."""


@dataclass(frozen=True)
class TaskMeasure:
    """How agreement is measured: the probability-map threshold, and optionally the user's own metric."""

    threshold: float = DEFAULT_THRESHOLD
    metric: TaskMetric | None = None

    @property
    def metric_name(self) -> str | None:
        if self.metric is None:
            return None
        return getattr(self.metric, "__name__", type(self.metric).__name__)


def measure_for(shape: Sequence[int]) -> str | None:
    """The measure an output of this shape gets before its values are seen ('map IoU' also needs them in [0, 1])."""
    if len(shape) == 2 and shape[1] >= 2:
        return "top-1"
    if len(shape) == 3 and shape[2] >= 2:
        return "whole-sequence argmax"
    if len(shape) >= 4 and shape[1] > 1:
        return "per-pixel argmax"
    if len(shape) >= 4 and shape[1] == 1:
        return "map IoU"
    return None


class Agreement:
    """Streaming agreement of one output over batches (see the module doc)."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.threshold = threshold
        self.kind: str | None = None
        self.decided = False
        self.hits = self.total = 0  # the main measure's agreeing and counted units
        self.position_hits = self.positions = 0  # sequences: per position
        self.intersection = self.union = 0
        self.in_unit_range = True

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.shape != cand.shape or ref.ndim == 0:
            self.kind, self.decided = None, True
            return
        kind = measure_for(ref.shape)
        if self.decided and kind != self.kind:
            self.kind = None  # batches of different ranks: no common measure
            return
        self.kind, self.decided = kind, True
        if kind == "top-1":
            self.hits += int(np.sum(np.argmax(ref, axis=1) == np.argmax(cand, axis=1)))
            self.total += ref.shape[0]
        elif kind == "whole-sequence argmax":
            same = np.argmax(ref, axis=2) == np.argmax(cand, axis=2)
            self.hits += int(np.sum(same.all(axis=1)))
            self.total += ref.shape[0]
            self.position_hits += int(same.sum())
            self.positions += same.size
        elif kind == "per-pixel argmax":
            same = np.argmax(ref, axis=1) == np.argmax(cand, axis=1)
            self.hits += int(same.sum())
            self.total += same.size
        elif kind == "map IoU":
            finite = ref[np.isfinite(ref)]
            self.in_unit_range &= bool(finite.size == 0 or (finite.min() >= 0 and finite.max() <= 1))
            a, b = ref > self.threshold, cand > self.threshold
            self.intersection += int(np.sum(a & b))
            self.union += int(np.sum(a | b))

    @property
    def measure(self) -> str | None:
        """The name of the measure, with its threshold for maps; None when none applies."""
        if self.kind == "map IoU":
            return f"map IoU (> {self.threshold:g})" if self.in_unit_range else None
        return self.kind if self.total else None

    @property
    def value(self) -> float | None:
        if self.measure is None:
            return None
        if self.kind == "map IoU":
            return self.intersection / self.union if self.union else 1.0
        return self.hits / self.total

    @property
    def extras(self) -> dict[str, float]:
        """Second figures: per-position agreement of sequences."""
        if self.kind == "whole-sequence argmax" and self.positions:
            return {"per-position argmax": self.position_hits / self.positions}
        return {}


def task_agreement(metric: TaskMetric, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """The user's metric on the two models' outputs, checked to be a number in 0..1."""
    from ..errors import UsageError
    value = metric(list(reference), list(candidate))
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"the task metric returned {type(value).__name__}, not a number in 0..1") from None
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"the task metric returned {value:g}; it must return an agreement in 0..1")
    return value


__all__ = ["Agreement", "DEFAULT_THRESHOLD", "TaskMeasure", "TaskMetric", "measure_for", "task_agreement"]
