"""Operators the float64 reference evaluator runs in its own way: right and fast, with a deadline.

onnx's reference evaluator is the numpy yardstick of the noise-floor rule, but two of its operators make it
unusable on real exports:

- **BatchNormalization** of opsets 9-13 with a ``momentum`` attribute (every paddle2onnx export) is evaluated in
  training mode: the batch's statistics are blended in, so a sample's output depends on the batch it sits in
  (onnxruntime's does not). Here it is always ``y = scale * (x - mean) / sqrt(var + epsilon) + B`` with the
  running statistics -- inference mode -- unless ``training_mode=1`` (opset 14+), which computes batch statistics as
  the spec says.
- **Conv** / **ConvTranspose** are pure-Python loops there (minutes on a 736x736 detector head). Here each kernel
  offset is one strided slice and one batched matrix product (``O(prod(kernel))`` numpy calls, BLAS inside).

Every operator checks the evaluation's deadline before it computes (``Deadline``), so a model too slow to evaluate
is abandoned between two of its heavy nodes instead of running for minutes.
"""
from __future__ import annotations

import itertools
import time

import numpy as np
from onnx.reference.op_run import OpRun

from ..onnx.conv_geometry import conv_pads, transpose_geometry


class DeadlineExceeded(Exception):
    """The float64 evaluation ran past its time budget."""


class Deadline:
    """A monotonic-clock deadline shared by the operators of one evaluator (``None``: no limit)."""

    def __init__(self) -> None:
        self.at: float | None = None

    def start(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def check(self) -> None:
        if self.at is not None and time.monotonic() > self.at:
            raise DeadlineExceeded()


def _defaults(x: np.ndarray, w: np.ndarray, dilations, strides, group) -> tuple[list[int], list[int], list[int], int]:
    spatial = x.ndim - 2
    kernel = list(w.shape[2:])
    return (kernel, list(dilations) if dilations is not None else [1] * spatial,
            list(strides) if strides is not None else [1] * spatial, int(group or 1))


def _auto_pad(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _make(deadline: Deadline):
    """The operator classes for one evaluator, bound to its deadline."""

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=None, momentum=None, training_mode=None, spatial=None,
                 is_test=None, consumed_inputs=None):
            deadline.check()
            eps = 1e-5 if epsilon is None else float(epsilon)
            axes = tuple(k for k in range(x.ndim) if k != 1)
            train = bool(training_mode)
            if train:  # opset 14+ training mode: the batch's statistics, and the running ones updated
                m, v = x.mean(axis=axes), x.var(axis=axes)
            else:
                m, v = mean, var
            shape = (-1,) + (1,) * (x.ndim - 2)
            y = (x - m.reshape(shape)) / np.sqrt(v.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
            y = y.astype(x.dtype, copy=False)
            if not train:
                return (y,)
            mom = 0.9 if momentum is None else float(momentum)
            return (y, (mean * mom + m * (1 - mom)).astype(mean.dtype), (var * mom + v * (1 - mom)).astype(var.dtype))

    class Conv(OpRun):
        op_domain = ""

        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
                 strides=None):
            deadline.check()
            return (conv(x, w, b, _auto_pad(auto_pad), dilations, group, pads, strides),)

    class ConvTranspose(OpRun):
        op_domain = ""

        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
                 output_padding=None, output_shape=None, pads=None, strides=None):
            deadline.check()
            return (conv_transpose(x, w, b, _auto_pad(auto_pad), dilations, group, output_padding, output_shape,
                                   pads, strides),)

    from onnx.reference.ops.op_average_pool import AveragePool_19
    from onnx.reference.ops.op_max_pool import MaxPool as ReferenceMaxPool

    class AveragePool(AveragePool_19):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, count_include_pad=None, dilations=None, kernel_shape=None,
                 pads=None, strides=None):
            deadline.check()
            if ceil_mode or (dilations is not None and any(d != 1 for d in dilations)):
                return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                                    dilations=dilations, kernel_shape=kernel_shape, pads=pads, strides=strides)
            return (pool(x, "avg", _auto_pad(auto_pad), kernel_shape, pads, strides, bool(count_include_pad)),)

    class MaxPool(ReferenceMaxPool):
        op_domain = ""

        def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
                 storage_order=None, strides=None):
            deadline.check()
            if (ceil_mode or len(self.output) > 1
                    or (dilations is not None and any(d != 1 for d in dilations))):
                return super()._run(x, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                    kernel_shape=kernel_shape, pads=pads, storage_order=storage_order,
                                    strides=strides)
            return (pool(x, "max", _auto_pad(auto_pad), kernel_shape, pads, strides, False),)

    return [BatchNormalization, Conv, ConvTranspose, AveragePool, MaxPool]


def pool(x: np.ndarray, kind: str, auto_pad: str | None, kernel_shape, pads, strides,
         count_include_pad: bool) -> np.ndarray:
    """MaxPool / AveragePool without dilation or ceil mode: the max or mean of each window, padding excluded
    (``-inf`` for max; for the mean counted only with ``count_include_pad``); one strided slice per offset."""
    kernel = list(kernel_shape)
    st = list(strides) if strides is not None else [1] * len(kernel)
    size = list(x.shape[2:])
    begin, end = conv_pads(auto_pad, pads, size, kernel, st, [1] * len(kernel))
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)), constant_values=fill)
    inside = np.pad(np.ones(size), list(zip(begin, end))) if kind == "avg" and not count_include_pad else None
    out = [(size[i] + begin[i] + end[i] - kernel[i]) // st[i] + 1 for i in range(len(size))]
    y = np.full(x.shape[:2] + tuple(out), fill, dtype=x.dtype)
    count = np.zeros(out) if inside is not None else None
    for k in itertools.product(*(range(kk) for kk in kernel)):
        window = tuple(slice(k[i], k[i] + (out[i] - 1) * st[i] + 1, st[i]) for i in range(len(out)))
        part = xp[(slice(None), slice(None)) + window]
        if kind == "max":
            np.maximum(y, part, out=y)
        else:
            y += part
            if count is not None:
                count += inside[window]
    if kind == "avg":
        y /= count if count is not None else float(np.prod(kernel))
    return y


def conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, auto_pad: str | None = None, dilations=None,
         group=None, pads=None, strides=None) -> np.ndarray:
    """ONNX Conv: ``y[n, g*Og+o, p] = sum_{c, k} w[g*Og+o, c, k] * xpad[n, g*Cg+c, p*s + k*d] + b``, one strided slice
    and one batched matmul per kernel offset ``k``."""
    kernel, dil, st, g = _defaults(x, w, dilations, strides, group)
    size = list(x.shape[2:])
    begin, end = conv_pads(auto_pad, pads, size, kernel, st, dil)
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(begin, end)))
    out = [(size[i] + begin[i] + end[i] - (kernel[i] - 1) * dil[i] - 1) // st[i] + 1 for i in range(len(size))]
    n, c = x.shape[:2]
    cg, og = c // g, w.shape[0] // g
    wg = w.reshape(g, og, cg, -1)
    y = np.zeros((n, g, og, int(np.prod(out))), dtype=np.result_type(x, w))
    for j, k in enumerate(itertools.product(*(range(kk) for kk in kernel))):
        window = tuple(slice(k[i] * dil[i], k[i] * dil[i] + (out[i] - 1) * st[i] + 1, st[i]) for i in range(len(out)))
        xs = xp[(slice(None), slice(None)) + window].reshape(n, g, cg, -1)
        y += np.matmul(wg[:, :, :, j], xs)
    y = y.reshape(n, g * og, *out)
    if b is not None:
        y += b.reshape((-1,) + (1,) * len(out))
    return y


def conv_transpose(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None, auto_pad: str | None = None,
                   dilations=None, group=None, output_padding=None, output_shape=None, pads=None,
                   strides=None) -> np.ndarray:
    """ONNX ConvTranspose (weight ``(C, M/group, k...)``): every input position ``i`` adds ``w[c, o, k] * x[n, c, i]``
    at output position ``i*s + k*d - pad_begin``; one batched matmul and one strided slice-add per offset ``k``."""
    kernel, dil, st, g = _defaults(x, w, dilations, strides, group)
    size = list(x.shape[2:])
    nd = len(size)
    full, begin, target = transpose_geometry(size, kernel, st, dil, output_padding, output_shape, pads, auto_pad)
    n, c = x.shape[:2]
    cg, og = c // g, w.shape[1]
    xg = x.reshape(n, g, cg, -1)
    wg = w.reshape(g, cg, og, -1).transpose(0, 3, 2, 1)  # (g, k, og, cg)
    shift = [max(0, -bg) for bg in begin]  # an output that starts before the first input position
    canvas = np.zeros((n, g, og) + tuple(sh + max(f, bg + t) for sh, f, bg, t in zip(shift, full, begin, target)),
                      dtype=np.result_type(x, w))
    for j, k in enumerate(itertools.product(*(range(kk) for kk in kernel))):
        part = np.matmul(wg[:, j], xg).reshape(n, g, og, *size)
        first = [shift[i] + k[i] * dil[i] for i in range(nd)]
        window = tuple(slice(first[i], first[i] + (size[i] - 1) * st[i] + 1, st[i]) for i in range(nd))
        canvas[(slice(None),) * 3 + window] += part
    crop = tuple(slice(shift[i] + begin[i], shift[i] + begin[i] + target[i]) for i in range(nd))
    y = canvas[(slice(None),) * 3 + crop].reshape(n, g * og, *target)
    if b is not None:
        y = y + b.reshape((-1,) + (1,) * nd)
    return y


def float64_ops(deadline: Deadline) -> list[type]:
    """The replacement operators for one ``ReferenceEvaluator`` (its ``new_ops``), sharing ``deadline``."""
    return _make(deadline)


__all__ = ["Deadline", "DeadlineExceeded", "conv", "conv_transpose", "float64_ops"]
