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

import numpy as np


def bn_affine(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
              eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(s, t)`` with ``BN(x) = s * x + t`` per channel, in float64."""
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


def fold_bias(bias: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """New per-channel bias ``s * b + t`` (``b = 0`` when the producer has none)."""
    if bias is None:
        return t.copy()
    return np.asarray(bias, np.float64) * s + t


def per_channel_shape(channels: int, rank: int, axis: int = 1) -> tuple[int, ...]:
    """Shape that broadcasts a length-``channels`` vector along ``axis`` of a rank-``rank`` tensor,
    without a leading batch dimension (ONNX / numpy broadcasting aligns trailing dims)."""
    return (channels,) + (1,) * (rank - axis - 1)
