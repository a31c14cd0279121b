"""Exact BatchNorm arithmetic shared by every frontend, in float64.

BatchNorm in inference mode is a per-channel affine map::

    y = gamma * (x - mean) / sqrt(var + eps) + beta  =  s * x + t
    s = gamma / sqrt(var + eps),    t = beta - mean * s

Folding it into a producer that is linear in its weight ``W`` along an output-channel axis scales that axis of
``W`` by ``s`` and maps the producer's bias ``b`` to ``s * b + t``. The functions here compute in float64 and
return float64 arrays; callers cast back to the producer's dtype once, at the end. Nothing here imports torch or
onnxruntime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def bn_affine(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
              eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(s, t)`` with ``BN(x) = s * x + t`` per channel, in float64 (non-finite where the parameters
    are: callers refuse those first, see ``nonfinite_problem``, unless asked to rewrite them anyway)."""
    with np.errstate(all="ignore"):
        s = np.asarray(gamma, np.float64) / np.sqrt(np.asarray(var, np.float64) + np.float64(eps))
        t = np.asarray(beta, np.float64) - np.asarray(mean, np.float64) * s
    return s, t


def batchnorm_reference(x: np.ndarray, gamma, beta, mean, var, eps: float, axis: int = 1) -> np.ndarray:
    """Direct float64 evaluation of inference BatchNorm over channel ``axis`` (the definition, for tests)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    x64 = np.asarray(x, np.float64)
    g, b, m, v = (np.asarray(a, np.float64).reshape(shape) for a in (gamma, beta, mean, var))
    return g * (x64 - m) / np.sqrt(v + np.float64(eps)) + b


def fold_conv_weight(weight: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Conv (any rank, any ``group``): weight ``(M, C/group, k...)``, output channel ``m`` is row ``m``.

    ``W'[m] = s[m] * W[m]``.
    """
    w = np.asarray(weight, np.float64)
    return w * s.reshape((-1,) + (1,) * (w.ndim - 1))


def fold_conv_transpose_weight(weight: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose: weight ``(C_in, M/group, k...)``; output channel ``g*(M/group) + j`` lives in
    ``W[g*C_in/group:(g+1)*C_in/group, j]`` (axis 1, per group).

    ``W'[i, j] = s[(i // (C_in/group)) * (M/group) + j] * W[i, j]``.
    """
    w = np.asarray(weight, np.float64)
    c_in, m_per_group = w.shape[0], w.shape[1]
    if c_in % group:
        raise ValueError(f"ConvTranspose weight has {c_in} input channels, not divisible by group={group}")
    grouped = w.reshape((group, c_in // group, m_per_group) + w.shape[2:])
    scale = s.reshape((group, 1, m_per_group) + (1,) * (w.ndim - 2))
    return (grouped * scale).reshape(w.shape)


def fold_matrix_columns(weight: np.ndarray, s: np.ndarray, transposed: bool) -> np.ndarray:
    """Gemm / MatMul weight ``B`` with ``Y = A @ B`` (``(K, N)``) or ``Y = A @ B.T`` (``transposed``, ``(N, K)``).

    Output feature ``n`` is column ``n`` of ``B`` (row ``n`` when transposed): ``B'[:, n] = s[n] * B[:, n]``.
    """
    w = np.asarray(weight, np.float64)
    return w * (s.reshape(-1, 1) if transposed else s.reshape(1, -1))


def nonfinite_problem(params: list[np.ndarray], eps: float) -> str | None:
    """What makes a BN's (scale, bias, mean, variance, epsilon) not a finite affine map, or None."""
    for value, role in zip(params, ("scale", "bias", "mean", "variance")):
        bad = int(value.size - np.count_nonzero(np.isfinite(np.asarray(value, np.float64))))
        if bad:
            return f"{bad} NaN or infinite value(s) in its {role}"
    if not np.isfinite(eps) or eps < 0:
        return f"epsilon {eps}"
    negative = int(np.count_nonzero(np.asarray(params[3], np.float64) + eps <= 0))
    if negative:
        return f"{negative} variance(s) + epsilon not positive"
    return None


def scaled_max_abs(weight: np.ndarray, s: np.ndarray, scale_shape: tuple[int, ...]) -> float:
    """``max |weight * s.reshape(scale_shape)|`` without forming the product: the per-channel extremes of
    ``weight`` (reduced over the axes where ``scale_shape`` is 1) times ``|s|``. ``weight`` must already be viewed
    so that ``s.reshape(scale_shape)`` broadcasts against it. 0 when no ``|s|`` exceeds 1: scaling by at most 1
    cannot take a weight out of its dtype's range, so the weight is not read at all."""
    if float(np.max(np.abs(s), initial=0.0)) <= 1.0:
        return 0.0
    axes = tuple(k for k, d in enumerate(scale_shape) if d == 1)
    hi = np.asarray(np.max(weight, axis=axes, keepdims=True), np.float64)
    lo = np.asarray(np.min(weight, axis=axes, keepdims=True), np.float64)
    return float(np.max(np.maximum(np.abs(hi), np.abs(lo)) * np.abs(s.reshape(scale_shape))))


def fold_bias(bias: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """New per-channel bias ``s * b + t`` (``b = 0`` when the producer has none)."""
    if bias is None:
        return t.copy()
    return np.asarray(bias, np.float64) * s + t


def per_channel_shape(channels: int, rank: int, axis: int = 1) -> tuple[int, ...]:
    """Shape that broadcasts a length-``channels`` vector along ``axis`` of a rank-``rank`` tensor,
    without a leading batch dimension (ONNX / numpy broadcasting aligns trailing dims)."""
    return (channels,) + (1,) * (rank - axis - 1)


# ---- replacement norms: group choice, reference normalization, closed-form affine fit -----------------------

MIN_GROUP_ELEMENTS = 16
"""A group must hold at least this many values per sample (channels per group x spatial size): a group of one
or two values normalizes to a constant (GroupNorm(C, C) on an (N, C) input outputs beta for any input)."""


def divisors_up_to(n: int, limit: int) -> list[int]:
    """Divisors of ``n`` that are at most ``limit``, largest first."""
    return [d for d in range(min(n, limit), 0, -1) if n % d == 0]


def choose_groups(channels: int, spatial: int, *, groups: int | None = None, group_size: int | None = None,
                  min_elements: int = MIN_GROUP_ELEMENTS, say_asked: bool = True) -> tuple[int | None, str]:
    """Pick the group count for ``channels`` channels over ``spatial`` positions.

    With ``groups`` G: the largest divisor of C not above G; with ``group_size`` S: C / S groups when S divides C,
    else the largest divisor of C not above C / S. Then the largest allowed count whose groups hold at least
    ``min_elements`` values per sample. Returns ``(G, how)`` or ``(None, why not)``.
    """
    if (groups is None) == (group_size is None):
        raise ValueError("give exactly one of groups or group_size")
    from .errors import option
    target = groups if groups is not None else max(1, channels // group_size)
    for g in divisors_up_to(channels, max(1, target)):
        if (channels // g) * spatial >= min_elements:
            how = f"{g} groups of {channels // g} channels"
            if g != target and say_asked:
                if channels % target:
                    why = (f"{target} does not divide {channels}" if groups is not None
                           else f"{channels} channels are not a multiple of {group_size}")
                else:
                    why = f"{target} groups would hold fewer than {min_elements} values per sample"
                asked = option("groups", groups) if groups is not None else option("group_size", group_size)
                how += f" (asked {asked}: {why})"
            return g, how
    return None, (f"even one group holds only {channels * spatial} values per sample (< {min_elements}); "
                  "normalizing it would discard the signal")


def group_choice_note(groups: int, channels: int, by_fit: bool, limit: int) -> str:
    """What a GroupNorm layer's reason adds to ``choose_groups``'s: for ``groups="auto"`` that calibration picks
    the count (this one stands until it does), else the InstanceNorm warning when each group holds one channel."""
    if by_fit:
        from .errors import option
        return (f"; {option('groups', 'auto')}: calibration chooses among the counts up to {limit} by fit "
                "(without calibration data this one stays)")
    return one_channel_per_group_note(groups, channels)


def one_channel_per_group_note(groups: int, channels: int) -> str:
    """Said of a GroupNorm layer whose groups hold one channel each (it is then an InstanceNorm)."""
    if groups != channels or channels < 2:
        return ""
    from .errors import option
    return ("; one channel per group: InstanceNorm, which discards each channel's mean over positions (calibration "
            f"cannot restore it; {option('groups', 'auto')} chooses G by fit)")


def allowed_groups(channels: int, spatial: int, limit: int, min_elements: int = MIN_GROUP_ELEMENTS) -> list[int]:
    """Group counts a layer may use: divisors of C not above ``limit`` whose groups hold enough values."""
    return [g for g in divisors_up_to(channels, max(1, limit)) if (channels // g) * spatial >= min_elements]


GROUP_FIT_SLACK = 0.02
"""When calibration chooses a layer's group count by fit, it keeps the largest count whose squared error is
within this fraction of the best one (closest to what was asked for)."""


def pick_groups_by_fit(sse: dict[int, float]) -> int:
    """The largest group count whose total squared error is within ``GROUP_FIT_SLACK`` of the smallest."""
    best = min(sse.values())
    return max(g for g, e in sse.items() if e <= best * (1 + GROUP_FIT_SLACK) + 1e-12)


def group_normalize(x: np.ndarray, groups: int, eps: float) -> np.ndarray:
    """GroupNorm without affine, float64: each sample's channels split in ``groups`` contiguous groups, each group
    normalized over its channels and all positions (two-pass variance). ``groups=1`` is LayerNorm over (C, ...),
    ``groups=C`` is InstanceNorm."""
    x64 = np.asarray(x, np.float64)
    n, c = x64.shape[:2]
    r = x64.reshape(n, groups, -1)
    mean = r.mean(axis=2, keepdims=True)
    d = r - mean
    var = (d * d).mean(axis=2, keepdims=True)
    return (d / np.sqrt(var + eps)).reshape(x64.shape)


def channel_normalize(x: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the channel axis alone, at every position (ConvNeXt-style), float64, two-pass variance."""
    x64 = np.asarray(x, np.float64)
    mean = x64.mean(axis=1, keepdims=True)
    d = x64 - mean
    return d / np.sqrt((d * d).mean(axis=1, keepdims=True) + eps)


CONSTANT_CHANNEL = 1e-6
"""A channel whose normalized input or target varies by less than this fraction of its mean square is constant
to float32 precision (the sums may come from float32 reductions): its fit is ``a = 0``, ``b = mean(y)``."""


class AffineFit:
    """Streaming per-channel least squares ``y ~ a * z + b`` over batches of (N, C, ...) arrays, in float64.

    Holds five sums per channel, so memory does not depend on how much data is seen.
    """

    def __init__(self, channels: int, center: np.ndarray | None = None) -> None:
        self.n = np.zeros(channels)
        self.sz = np.zeros(channels)
        self.szz = np.zeros(channels)
        self.sy = np.zeros(channels)
        self.syy = np.zeros(channels)
        self.szy = np.zeros(channels)
        self.center = np.zeros(channels) if center is None else np.asarray(center, np.float64).reshape(channels)

    def add(self, z: np.ndarray, y: np.ndarray) -> None:
        """Add a batch of normalized inputs ``z`` and targets ``y`` (N, C, ...)."""
        axes = (0,) + tuple(range(2, np.ndim(z)))
        z64 = np.asarray(z, np.float64)
        y64 = np.asarray(y, np.float64) - self.center.reshape((1, -1) + (1,) * (np.ndim(z) - 2))
        self.add_sums(z64.size // z64.shape[1], z64.sum(axes), (z64 * z64).sum(axes), y64.sum(axes),
                      (y64 * y64).sum(axes), (z64 * y64).sum(axes))

    def add_sums(self, count: int, sz, szz, sy, syy, szy) -> None:
        """Add sums computed elsewhere (per channel, over ``count`` values each; ``y`` already minus the
        centre)."""
        self.n += count
        self.sz += sz
        self.szz += szz
        self.sy += sy
        self.syy += syy
        self.szy += szy

    def unexplained(self, sse: np.ndarray) -> float:
        """The share of the target's variance (over all channels) that the fit with per-channel ``sse`` leaves
        unexplained: 0 a perfect fit, 1 no better than each channel's mean."""
        spread = float(np.sum(self.syy - self.sy * self.sy / np.maximum(self.n, 1)))
        return float(np.sum(sse)) / spread if spread > 0 else 0.0

    def solve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(a, b, sse)`` per channel. A channel whose z or y does not vary (``CONSTANT_CHANNEL``) gets ``a = 0``
        and ``b = mean(y)``.
        Sums are over ``y - center`` (exact algebra, better conditioned); ``b`` is shifted back."""
        n = np.maximum(self.n, 1)
        mz, my = self.sz / n, self.sy / n
        var_z = self.szz / n - mz * mz
        cov = self.szy / n - mz * my
        var_y = self.syy / n - my * my
        ok = (var_z > CONSTANT_CHANNEL * np.maximum(self.szz / n, 1e-30)) & (
            var_y > CONSTANT_CHANNEL * np.maximum(self.syy / n, 1e-30))
        a = np.where(ok, cov / np.where(ok, var_z, 1), 0.0)
        b = my - a * mz
        sse = self.syy - 2 * a * self.szy - 2 * b * self.sy + a * a * self.szz + 2 * a * b * self.sz + b * b * n
        return a, b + self.center, np.maximum(sse, 0.0)


def unshift_moments(sx: np.ndarray, sxx: np.ndarray, positions: int,
                    x_center: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Moments of ``x`` from moments of ``x - x_center`` (a per-channel shift), exactly:
    ``sum x = sx + P c``, ``sum x^2 = sxx + 2 c sx + P c^2`` (``sum x y = sxy + c sy`` is the caller's)."""
    if x_center is None:
        return sx, sxx
    shift = np.asarray(x_center, np.float64).reshape(1, -1)
    return sx + positions * shift, sxx + 2 * shift * sx + positions * shift * shift


def group_normalizer(sx_centred: np.ndarray, sxx_centred: np.ndarray, sx: np.ndarray, sxx: np.ndarray,
                     positions: int, groups: int, eps: float, precision: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample group mean ``m`` and inverse deviation ``r = 1 / sqrt(v + eps)`` of GroupNorm(x, groups), each
    repeated to the group's channels ((N, C) each), from the per-channel moments ``sx``, ``sxx`` over ``positions``
    positions (``*_centred``: the same moments as given, before ``unshift_moments``, which set what the sums
    resolve). A group whose variance within a sample is below ``precision`` of its mean square as given is
    constant there: its ``r`` is 0, so its z is 0 exactly."""
    n, c = sx.shape
    k = c // groups
    count = positions * k
    resolution = precision * sxx_centred.reshape(n, groups, k).sum(2) / count  # what the given sums resolve
    mean = sx.reshape(n, groups, k).sum(2) / count
    var = np.maximum(sxx.reshape(n, groups, k).sum(2) / count - mean * mean, 0.0)
    inverse = np.where(var <= resolution, 0.0, 1.0 / np.sqrt(var + eps))
    return np.repeat(mean, k, axis=1), np.repeat(inverse, k, axis=1)


def group_fit_sums(sx: np.ndarray, sxx: np.ndarray, sxy: np.ndarray, sy: np.ndarray, syy: np.ndarray,
                   positions: int, groups: int, eps: float, x_center: np.ndarray | None = None,
                   precision: float = 1e-12) -> tuple[np.ndarray, ...]:
    """Per-channel sums of ``z, z^2, y, y^2, z*y`` over samples and positions, for ``z = GroupNorm(x, groups)``
    without affine, from per-sample, per-channel moments of ``x`` over ``positions`` positions (all (N, C)):
    ``sx = sum x``, ``sxx = sum x^2``, ``sxy = sum x*y``, ``sy = sum y``, ``syy = sum y^2``.

    In a group of ``k`` channels, ``z = (x - m) * r`` with ``m`` the group mean and ``r = 1 / sqrt(v + eps)``
    (``v`` the population variance over the group's ``k * positions`` values), so per channel
    ``sum z = r (sx - P m)``, ``sum z^2 = r^2 (sxx - 2 m sx + P m^2)``, ``sum z y = r (sxy - m sy)``. Exact
    algebra, in float64. When the moments were taken of ``x - x_center`` (a per-channel shift, so float32 sums
    do not cancel), they are first shifted back exactly (``unshift_moments``). ``precision``: the relative
    precision of the given sums (float32 reductions: ``CONSTANT_CHANNEL``); a group whose variance within a
    sample is below that fraction of its mean square as given is constant there, and its z is 0 exactly
    (default: float64 sums)."""
    sx, sxx, sxy, sy, syy = (np.asarray(a, np.float64) for a in (sx, sxx, sxy, sy, syy))
    return _group_fit_sums(*_unshifted(sx, sxx, sxy, sy, syy, positions, x_center), positions, groups, eps,
                           precision)


def _unshifted(sx, sxx, sxy, sy, syy, positions: int, x_center: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """``(sx, sxx)`` as given (centred), then ``sum x``, ``sum x^2``, ``sum x y`` shifted back, ``sy``, ``syy``:
    what ``_group_fit_sums`` takes."""
    cross = sxy if x_center is None else sxy + np.asarray(x_center, np.float64).reshape(1, -1) * sy
    return (sx, sxx, *unshift_moments(sx, sxx, positions, x_center), cross, sy, syy)


def _group_fit_sums(sx_centred, sxx_centred, sx, sxx, sxy, sy, syy, positions: int, groups: int, eps: float,
                    precision: float) -> tuple[np.ndarray, ...]:
    m, r = group_normalizer(sx_centred, sxx_centred, sx, sxx, positions, groups, eps, precision)
    sz = (r * (sx - positions * m)).sum(0)
    szz = (r * r * (sxx - 2 * m * sx + positions * m * m)).sum(0)
    szy = (r * (sxy - m * sy)).sum(0)
    return sz, szz, sy.sum(0), syy.sum(0), szy


def solve_candidates(fits: dict) -> tuple[int | None, np.ndarray, np.ndarray, dict | None]:
    """Solve the AffineFit of every candidate group count of one layer: ``(groups, a, b, sse)`` for the count
    ``pick_groups_by_fit`` prefers (``sse`` is None when there was only one candidate)."""
    solved = {g: fit.solve() for g, fit in fits.items()}
    if len(solved) == 1:
        ((groups, (a, b, _)),) = solved.items()
        return groups, a, b, None
    sse = {g: float(r[2].sum()) for g, r in solved.items()}
    groups = pick_groups_by_fit(sse)
    a, b, _ = solved[groups]
    return groups, a, b, sse


def fit_choice_note(groups: int, sse: dict) -> str:
    tried = ", ".join(f"G={g}: {e:.3g}" for g, e in sorted(sse.items()))
    return f"; calibration chose {groups} group(s) by fit (squared error {tried})"


class _GramSums:
    """``[h, 1]^T [h, 1]``, ``[h, 1]^T o`` and ``sum o^2`` over the rows seen, in float64."""

    def __init__(self) -> None:
        self.gram: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.sum_oo, self.count = 0.0, 0

    def add(self, h64: np.ndarray, o64: np.ndarray) -> None:
        if not len(h64):
            return
        gram, cross = h64.T @ h64, h64.T @ o64
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.sum_oo += float((o64 * o64).sum())
        self.count += o64.size

    def mse(self, w: np.ndarray) -> float:
        """Mean squared error of ``[h, 1] @ w`` to the targets seen."""
        return (self.sum_oo - 2 * float(np.sum(w * self.cross)) + float(np.sum(w * (self.gram @ w)))) / self.count


REFIT_FOLDS = 4
"""Folds of the output-layer refit's cross-validation: each fit sees three quarters of the samples (two folds,
half of them, rejected refits that held on digits at 64 samples)."""


@dataclass(frozen=True)
class RefitOutcome:
    """``new``: the refitted weights, or None when they were not shown to generalize (``held_out`` not below
    ``before``, or too few rows to tell). ``before``: the current weights' error on all rows (fitted on none of
    them); ``after``: the refit's error on the rows it was fitted on; ``held_out``: the estimate of its
    error on rows it was not fitted on, cross-validated (None: fewer than two rows)."""

    new: np.ndarray | None
    before: float
    after: float
    held_out: float | None


class LinearRefit:
    """Streaming closed-form refit of a linear layer ``o ~ h @ W (+ c)`` against target outputs ``o``, whatever
    the number of samples: rows take turns among ``REFIT_FOLDS`` folds in the order they are streamed, and each
    fold keeps a (K+1)^2 Gram matrix, a (K+1) x M cross matrix and its targets' square sum in float64.

    With K features and fewer samples than K + 1 the least-squares refit interpolates the calibration data and
    fails elsewhere (digits, 8 samples: top-1 agreement 0.675 with it, 0.975 without). So a refit is kept only
    when it lowers the error out of sample: fitted on all folds but one and scored on that one, for each fold
    (cross-validation), against the current weights' error on every row, which they were not fitted on."""

    def __init__(self, bias: bool = True, folds: int = REFIT_FOLDS) -> None:
        self.bias = bias
        self.folds = tuple(_GramSums() for _ in range(folds))
        self.rows = 0

    @staticmethod
    def _total(parts) -> np.ndarray | None:
        parts = [p for p in parts if p is not None]
        return sum(parts[1:], parts[0].copy()) if parts else None

    @property
    def gram(self) -> np.ndarray | None:
        return self._total(f.gram for f in self.folds)

    @property
    def cross(self) -> np.ndarray | None:
        return self._total(f.cross for f in self.folds)

    def add(self, h: np.ndarray, o: np.ndarray) -> None:
        h64, o64 = np.asarray(h, np.float64), np.asarray(o, np.float64)
        if self.bias:
            h64 = np.hstack([h64, np.ones((len(h64), 1))])
        k = len(self.folds)
        for fold in range(k):  # the stream's row r goes to fold r % k
            rows = slice((fold - self.rows) % k, None, k)
            self.folds[fold].add(h64[rows], o64[rows])
        self.rows += len(h64)

    def mse(self, w: np.ndarray) -> float:
        """Mean squared error of ``[h, 1] @ w`` to every target seen."""
        seen = [f for f in self.folds if f.count]
        return sum(f.mse(w) * f.count for f in seen) / sum(f.count for f in seen)

    def refit(self, current: np.ndarray, ridge: float) -> RefitOutcome:
        """The ridge refit on all rows, kept only when its cross-validated error is below ``current``'s."""
        gram, cross = self.gram, self.cross
        new = ridge_solve(gram, cross, ridge)
        before, after = self.mse(current), self.mse(new)
        seen = [f for f in self.folds if f.count]
        if len(seen) < 2:
            return RefitOutcome(None, before, after, None)
        held_out = sum(f.mse(ridge_solve(gram - f.gram, cross - f.cross, ridge)) * f.count for f in seen) / sum(
            f.count for f in seen)
        return RefitOutcome(new if held_out < before else None, before, after, held_out)

    def note(self, outcome: RefitOutcome, what: str) -> str:
        """What happened to ``what`` (the layer, named), for the calibration report."""
        if outcome.held_out is None:
            return (f"{what} not refitted: one sample cannot show that a refit holds beyond it (mean squared error "
                    f"{outcome.before:.3g})")
        if outcome.new is None:
            return (f"{what} kept: a refit would not lower the error on samples it was not fitted on "
                    f"({outcome.held_out:.3g} vs {outcome.before:.3g}; {outcome.after:.3g} on those it was)")
        return (f"refitted {what}: mean squared error to the original outputs {outcome.before:.3g} -> "
                f"{outcome.after:.3g} ({outcome.held_out:.3g} on samples left out of the fit, cross-validated)")


def ridge_solve(gram: np.ndarray, cross: np.ndarray, ridge: float) -> np.ndarray:
    """Solve ``(G + ridge * mean(diag G) * I) W = X`` for the closed-form least-squares refit of a linear layer."""
    k = gram.shape[0]
    lam = ridge * max(float(np.trace(gram)) / k, 1e-12)
    return np.linalg.solve(gram + lam * np.eye(k), cross)


MOMENTS = ("sx", "sxx", "sxy", "sy", "syy")
"""Per-sample, per-channel sums a GroupNorm candidate's fit is derived from (``group_fit_sums``)."""
Z_SUMS = ("sz", "szz", "sy", "syy", "szy")
"""Per-sample, per-channel sums of an explicitly normalized ``z`` (LayerNorm over channels)."""


class CandidateSums:
    """One layer's per-sample sums over the calibration data ((samples, C) each: small, from float32
    reductions), solved for every candidate group count at once when the data has been seen. ``y_center`` /
    ``x_center``: the per-channel shifts the sums were taken after (``AffineFit`` and ``group_fit_sums`` undo
    them exactly)."""

    def __init__(self, norm, candidates: tuple[int | None, ...], y_center: np.ndarray, x_center: np.ndarray,
                 channels: int, eps: float) -> None:
        self.norm, self.candidates = norm, candidates
        self.y_center, self.x_center, self.channels, self.eps = y_center, x_center, channels, eps
        self.rows: dict[str, list[np.ndarray]] = {}
        self.count = 0
        self.positions = 1

    def add(self, rows: int, positions: int, sums: dict) -> None:
        """Add the first ``rows`` rows of one batch's (N, C) sums, each over ``positions`` positions."""
        self.positions = positions
        self.count += rows * positions
        for k, v in sums.items():
            self.rows.setdefault(k, []).append(np.asarray(v)[:rows])

    def target_fit(self) -> AffineFit:
        """An AffineFit holding only the target's sums (count, ``sum y``, ``sum y^2``), before any candidate is
        solved: what ``calibration_checks.input_scale`` reads."""
        fit = AffineFit(self.channels, self.y_center)
        if self.rows:
            sy, syy = (np.concatenate(self.rows[k]).astype(np.float64).sum(0) for k in ("sy", "syy"))
            zeros = np.zeros(self.channels)
            fit.add_sums(self.count, zeros, zeros, sy, syy, zeros)
        return fit

    def fits(self) -> dict[int | None, AffineFit]:
        got = {k: np.concatenate(v).astype(np.float64) for k, v in self.rows.items()}
        out = {}
        moments = None
        if got and any(g is not None for g in self.candidates):  # shifted back once for every candidate
            moments = _unshifted(*(got[k] for k in MOMENTS), self.positions, self.x_center)
        for groups in self.candidates:
            fit = out[groups] = AffineFit(self.channels, self.y_center)
            if not got:
                continue
            if groups is None:
                fit.add_sums(self.count, *(got[k].sum(0) for k in Z_SUMS))
            else:
                fit.add_sums(self.count, *_group_fit_sums(*moments, self.positions, groups, self.eps,
                                                          CONSTANT_CHANNEL))
        return out
