"""Comparing one output of the reference and the candidate, streamed over batches.

Exact checks with a float64 evaluation of the original (``add_float64``) pass when the candidate's error against
it is within ``NOISE_MULTIPLE`` x the original's own float32 error + ``NOISE_FLOOR`` on the samples evaluated in
float64, and within the model's float32 level (``float32_level``, see ``float64.yardstick_limit``) of the
original's float32 run on every sample (the noise-floor rule); otherwise when
``|cand - ref| <= atol + rtol * |ref|`` everywhere (``numpy.allclose``). Both need NaNs and infinities in the
same places. Half-precision outputs (float16 / bfloat16) are compared with at least ``HALF_ATOL`` /
``HALF_RTOL``, since their last bit is ~1e-3 of the value. Fidelity checks (non-exact targets) pass when the
cosine similarity is at least ``min_cosine`` and the task agreement (``agreement``: top-1, whole sequence,
per-pixel argmax or map IoU, by the output's shape) at least ``min_agreement`` (each only when given); with
neither gate, a fidelity check is *measured*, not passed (``passed`` is None).
Neither passes over no values, or when the reference output holds NaN or infinity.

A comparison that cannot tell two models apart carries a ``caution``: the reference output is the same for
every sample (within atol; a model that ignores its input would match it), or every reference value lies within
atol of zero in an exact check (an all-zero output would pass).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import option
from ..report import OutputComparison
from .agreement import DEFAULT_THRESHOLD, Agreement

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
NOISE_MULTIPLE = 8.0
"""An exact rewrite passes when its error against the float64 evaluation of the original is at most this many
times the original's own float32 error against it. The converted model carries the float32 rounding of every
weight the rewrite computed (relative ``u`` each) on top of the rounding of its arithmetic, while the original's
error against its own float64 evaluation carries no weight rounding (both use the stored weights): a correct fold
of a paddle2onnx classifier measured 3.4x, a channel scaled by 1.01 in the last conv of real exports 30-37x..."""
NOISE_FLOOR = 1e-6
"""... plus this fraction of the output's largest magnitude (a few float32 ulps: an original that happens to
round almost exactly must not fail a rewrite that rounds ordinarily)."""
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
    agreement = Agreement()
    agreement.add(np.asarray(ref), np.asarray(cand))
    return agreement.value if agreement.measure == "top-1" else None


class OutputStats:
    """Running comparison of one output over batches (sums in float64)."""

    def __init__(self, name: str, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                 track_spread: bool = True, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.name, self.atol, self.rtol, self.track_spread = name, atol, rtol, track_spread
        self.shape: list[int] | None = None
        self.dtype = ""
        self.same_shape = self.same_nonfinite = self.within = True
        self.max_abs = self.sum_abs = self.max_ref = self.dot = self.rr = self.cc = 0.0
        self.count = 0
        self.agreement = Agreement(threshold)
        self.reference_finite = True
        self.first_sample: np.ndarray | None = None  # the reference of sample 0, to see whether outputs vary
        self.samples = 0
        self.spread = 0.0  # max |ref[i] - ref[0]| over samples i (finite values)
        self.f64_samples = 0  # samples with a float64 reference (add_float64)
        self.f64_scale = self.original_error = self.converted_error = 0.0
        self.float32_level = 0.0  # relative error a float32 run of this model may have (float64.yardstick_limit)
        self.independent_kernels = False  # the two sides run different kernels (torch eager vs onnxruntime)
        self.applied_atol = atol  # raised for half-precision outputs

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        ref_a, cand_a = np.asarray(ref), np.asarray(cand)
        self.dtype = str(ref_a.dtype)
        if self.shape is None:
            self.shape = list(ref_a.shape)
        elif ref_a.ndim:
            self.shape[0] += ref_a.shape[0]
        if ref_a.shape != cand_a.shape:
            self.same_shape = False
            return
        r, c = ref_a.astype(np.float64), cand_a.astype(np.float64)
        self.reference_finite &= bool(np.isfinite(r).all())
        self._track_spread(r)
        finite = np.isfinite(r) & np.isfinite(c)
        self.same_nonfinite &= bool(np.array_equal(np.where(finite, 0, r), np.where(finite, 0, c), equal_nan=True))
        rf, cf = r[finite], c[finite]
        diff = np.abs(rf - cf)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
            self.max_ref = max(self.max_ref, float(np.abs(rf).max()))
        self.sum_abs += float(diff.sum())
        self.count += diff.size
        self.dot += float(np.dot(rf, cf))
        self.rr += float(np.dot(rf, rf))
        self.cc += float(np.dot(cf, cf))
        a, rt = effective_tolerance(ref_a.dtype, self.atol, self.rtol)
        self.applied_atol = a
        self.within &= bool(np.all(diff <= a + rt * np.abs(rf)))
        if self.track_spread:  # model outputs: the task's decision (layer outputs only need their cosine)
            self.agreement.add(r, c)

    def add_float64(self, ref: np.ndarray, cand: np.ndarray, ref64: np.ndarray) -> None:
        """The same samples' float64 evaluation of the original: how far the original's float32 run (``ref``)
        and the candidate are from it (largest absolute errors; their scale is ``max |ref64|``)."""
        r64 = np.asarray(ref64, np.float64)
        r, c = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
        if r64.shape != r.shape or r.shape != c.shape:
            return
        finite = np.isfinite(r64) & np.isfinite(r) & np.isfinite(c)
        if not finite.any():
            return
        self.f64_samples += r.shape[0] if r.ndim else 1
        self.f64_scale = max(self.f64_scale, float(np.abs(r64[finite]).max()))
        self.original_error = max(self.original_error, float(np.abs(r[finite] - r64[finite]).max()))
        self.converted_error = max(self.converted_error, float(np.abs(c[finite] - r64[finite]).max()))

    def _noise_floor_pass(self) -> bool:
        """Relative to each output's largest magnitude: within ``NOISE_MULTIPLE`` x the original's own float32
        error (+ ``NOISE_FLOOR``) of the float64 reference on the samples it covers; and on every sample, within
        that bound plus the original's error (the triangle inequality) or the model's float32 level, whichever is
        larger, of the original's float32 output (a few samples' float32 error need not be the largest: a
        softmax's saturated samples round almost exactly). With ``independent_kernels`` (a module against its own
        export: two implementations whose float32 noises are independent, so one side's error bounds nothing of
        the other's) the float32 level also bounds the error against float64."""
        if self.f64_scale == 0:
            return self.converted_error == 0 and self.max_abs == 0
        original = self.original_error / self.f64_scale
        allowed = NOISE_MULTIPLE * original + NOISE_FLOOR
        if self.independent_kernels:
            allowed = max(allowed, self.float32_level)
        everywhere = self.max_abs <= max(allowed + original, self.float32_level) * max(self.max_ref, self.f64_scale)
        return self.converted_error / self.f64_scale <= allowed and everywhere

    def _track_spread(self, r: np.ndarray) -> None:
        """How far the reference moves from sample 0's along the leading (batch) axis."""
        if not self.track_spread or r.ndim == 0 or r.shape[0] == 0:
            return
        if self.first_sample is None:
            self.first_sample = r[0].copy()
        if self.first_sample.shape != r.shape[1:]:
            self.spread = math.inf  # no common sample shape: not a batch axis, assume it varies
            return
        self.samples += r.shape[0]
        with np.errstate(invalid="ignore"):
            moved = np.abs(r - self.first_sample)
        moved = moved[np.isfinite(moved)]
        if moved.size:
            self.spread = max(self.spread, float(moved.max()))

    def caution(self, check: str) -> str | None:
        if not self.count or not self.reference_finite:
            return None
        atol = self.applied_atol
        if check == "exact" and not self.f64_samples and self.max_ref <= atol:  # the noise rule is relative
            return (f"every reference value is within atol ({atol:g}) of zero (largest {self.max_ref:.3g}): "
                    f"an all-zero output would pass; lower {option('atol')} or validate with inputs that give larger "
                    "outputs")
        if self.f64_samples and self.f64_scale > 0:  # the noise-floor rule's tolerance, in absolute terms
            atol = ((NOISE_MULTIPLE + 1) * self.original_error / self.f64_scale + NOISE_FLOOR) * \
                max(self.max_ref, self.f64_scale)
        if self.samples >= 2 and self.spread <= atol:
            return (f"the reference output is the same for all {self.samples} samples (it moves by at most "
                    f"{self.spread:.3g}, tolerance {atol:.3g}): a model ignoring its input would pass; validate with "
                    f"inputs that change the output (real samples as {option('inputs')})")
        return None

    @property
    def cosine(self) -> float:
        if self.rr == 0 and self.cc == 0:
            return 1.0
        if self.rr == 0 or self.cc == 0:
            return 0.0
        return self.dot / math.sqrt(self.rr * self.cc)

    def result(self, check: str = "exact", min_cosine: float | None = None,
               min_agreement: float | None = None) -> OutputComparison:
        shape = self.shape or []
        if not self.same_shape:
            return OutputComparison(self.name, shape, self.dtype, None, None, None, None, None, False)
        max_rel = self.max_abs / self.max_ref if self.max_ref > 0 else (0.0 if self.max_abs == 0 else math.inf)
        agreement, measure = self.agreement.value, self.agreement.measure
        top1 = agreement if measure == "top-1" else None
        passed: bool | None
        if check == "exact" and self.f64_samples:
            passed = self.same_nonfinite and self._noise_floor_pass()
        elif check == "exact":
            passed = self.same_nonfinite and self.within
        elif min_cosine is None and min_agreement is None:  # nothing to pass: measured only
            passed = None if self.same_nonfinite else False
        else:
            passed = (self.same_nonfinite and (min_cosine is None or self.cosine >= min_cosine)
                      and (min_agreement is None or agreement is None or agreement >= min_agreement))
        problem = None
        if not self.reference_finite:
            problem = "the reference output holds NaN or infinity: nothing can be confirmed"
        elif not self.count:
            problem = "no values were compared (no samples)"
        mean_abs = self.sum_abs / self.count if self.count else 0.0
        comparison = OutputComparison(self.name, shape, self.dtype, _finite(self.max_abs), _finite(max_rel),
                                      _finite(mean_abs), _finite(self.cosine), top1, False if problem else passed,
                                      problem, self.caution(check), agreement=agreement,
                                      agreement_measure=measure, agreements=self.agreement.extras)
        if self.f64_samples and self.f64_scale > 0:
            comparison.original_error = self.original_error / self.f64_scale
            comparison.converted_error = self.converted_error / self.f64_scale
            comparison.error_ratio = (self.converted_error / self.original_error if self.original_error > 0
                                      else (0.0 if self.converted_error == 0 else None))
        return comparison


def compare_output(name: str, ref: np.ndarray, cand: np.ndarray, atol: float = DEFAULT_ATOL,
                   rtol: float = DEFAULT_RTOL) -> OutputComparison:
    """Exact comparison of one pair of arrays."""
    stats = OutputStats(name, atol, rtol)
    stats.add(ref, cand)
    return stats.result()
