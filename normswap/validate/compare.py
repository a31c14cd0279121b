"""Comparing one output of the reference and the candidate.

Tolerances are named constants: exact rewrites pass when ``|cand - ref| <= atol + rtol * |ref|`` everywhere
(``numpy.allclose``), NaNs in the same places. Half-precision outputs (float16 / bfloat16) are compared with at
least ``HALF_ATOL`` / ``HALF_RTOL``, since their last bit is ~1e-3 of the value.
"""
from __future__ import annotations

import math

import numpy as np

from ..report import OutputComparison

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
HALF_ATOL = 1e-2
HALF_RTOL = 1e-2


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def effective_tolerance(dtype: np.dtype, atol: float, rtol: float) -> tuple[float, float]:
    if dtype.itemsize <= 2 and (dtype.kind == "f" or dtype.name == "bfloat16"):
        return max(atol, HALF_ATOL), max(rtol, HALF_RTOL)
    return atol, rtol


def top1_agreement(ref: np.ndarray, cand: np.ndarray) -> float | None:
    """Share of rows whose argmax agrees, for class-score outputs shaped (N, K) with K >= 2."""
    if ref.ndim != 2 or ref.shape[1] < 2 or ref.shape != cand.shape:
        return None
    return float(np.mean(np.argmax(ref, axis=1) == np.argmax(cand, axis=1)))


def compare_output(name: str, ref: np.ndarray, cand: np.ndarray, atol: float = DEFAULT_ATOL,
                   rtol: float = DEFAULT_RTOL) -> OutputComparison:
    ref_a, cand_a = np.asarray(ref), np.asarray(cand)
    dtype = str(ref_a.dtype)
    if ref_a.shape != cand_a.shape:
        return OutputComparison(name, list(ref_a.shape), dtype, None, None, None, None, None, False)
    r, c = ref_a.astype(np.float64), cand_a.astype(np.float64)
    same_nan = bool(np.array_equal(np.isnan(r), np.isnan(c)))
    finite = np.isfinite(r) & np.isfinite(c)
    diff = np.abs(r - c)[finite]
    max_abs = float(diff.max()) if diff.size else 0.0
    mean_abs = float(diff.mean()) if diff.size else 0.0
    scale = float(np.abs(r[finite]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    rf, cf = r[finite], c[finite]
    nr, nc = float(np.linalg.norm(rf)), float(np.linalg.norm(cf))
    if nr == 0 and nc == 0:
        cosine = 1.0
    elif nr == 0 or nc == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(rf, cf) / (nr * nc))
    a, rt = effective_tolerance(ref_a.dtype, atol, rtol)
    inf_match = bool(np.array_equal(r[~np.isnan(r) & ~np.isfinite(r)], c[~np.isnan(r) & ~np.isfinite(r)]))
    passed = same_nan and inf_match and bool(np.all(np.abs(rf - cf) <= a + rt * np.abs(rf)))
    return OutputComparison(name, list(ref_a.shape), dtype, _finite(max_abs), _finite(max_rel), _finite(mean_abs),
                            _finite(cosine), top1_agreement(r, c), passed)
