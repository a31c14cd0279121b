"""Batch-size sensitivity: what training at batch size ``b`` does to each BatchNorm of a trained model.

In training, BN normalizes with the mean and variance of the current batch instead of its running statistics.
For a batch ``B`` of ``b`` samples drawn from the user's data and a BN with input ``x``:

    y_run   = gamma * (x - running_mean) / sqrt(running_var + eps) + beta      (what the model learned)
    y_batch = gamma * (x - mean_B(x))    / sqrt(var_B(x) + eps)    + beta      (what training at b computes)

with ``mean_B`` / ``var_B`` (biased) over the batch and every axis but the channel axis 1. Per layer we report
the relative error of the layer output ``||y_batch - y_run|| / ||y_run||`` and of the model output when only
that layer uses the batch statistics (everything else as trained), averaged over ``batches`` batches of each
size (and at least ``MIN_SAMPLES`` samples per size), plus top-1 agreement of the model output where it is a
class score. A layer makes training at a batch size unreliable -- its batch statistics are too noisy for the
function the network learned -- when top-1 agreement falls below ``UNRELIABLE_AGREEMENT`` (class scores), or
else when the model output moves by ``UNRELIABLE_ERROR`` or more.

Shared by both frontends (pure numpy; no torch, no onnxruntime).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import UsageError, option
from .report import LayerSensitivity, SensitivityReport

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 32)
DEFAULT_BATCHES = 8  # batches drawn per batch size
MIN_SAMPLES = 64  # samples drawn per batch size at least (batch size 1: 64 batches)
UNRELIABLE_ERROR = 0.25  # relative error of the model output (outputs that are not class scores)
UNRELIABLE_AGREEMENT = 0.95  # top-1 agreement with the model as trained (class scores)


def parse_batch_sizes(sizes) -> tuple[int, ...]:
    """'1,2,4' or a sequence -> sorted unique positive ints."""
    try:
        values = [int(s) for s in (sizes.split(",") if isinstance(sizes, str) else sizes) if str(s).strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UsageError(f"{option('batch_sizes', sizes if isinstance(sizes, str) else ','.join(map(str, sizes)))} "
                         "must be positive integers such as 1,2,4,8,32")
    return tuple(sorted(set(values)))


def check_batches(batches: int) -> None:
    if batches < 1:
        raise UsageError(f"{option('batches', batches)} must be at least 1 (batches drawn per batch size)")


def draw_batches(samples: int, size: int, count: int, seed: int) -> list[np.ndarray]:
    """At least ``count`` index arrays of ``size`` distinct samples each, and ``MIN_SAMPLES`` samples in all
    (seeded; batches may share samples)."""
    rng = np.random.default_rng([seed, size])
    count = max(count, -(-MIN_SAMPLES // size))
    return [np.sort(rng.choice(samples, size=size, replace=False)) for _ in range(count)]


def batch_count(size: int, count: int) -> int:
    return max(count, -(-MIN_SAMPLES // size))


def batch_norm_batch_stats(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float) -> np.ndarray:
    """BN with the statistics of the batch ``x`` (float64): over axis 0 and every axis after the channel axis 1."""
    x = x.astype(np.float64)
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return gamma.reshape(shape) * (x - mean) / np.sqrt(var + eps) + beta.reshape(shape)


def relative_error(changed: np.ndarray, reference: np.ndarray) -> float:
    """``||changed - reference|| / ||reference||`` in float64 (inf when the reference is zero and they differ)."""
    ref = np.asarray(reference, np.float64)
    diff = float(np.linalg.norm(np.asarray(changed, np.float64) - ref))
    scale = float(np.linalg.norm(ref))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def top1(changed: np.ndarray, reference: np.ndarray) -> float | None:
    """Share of samples whose arg-max agrees (2-D class scores with more than one class), else None."""
    if np.ndim(reference) != 2 or np.shape(reference)[1] < 2:
        return None
    return float(np.mean(np.argmax(changed, 1) == np.argmax(reference, 1)))


class Accumulator:
    """Sums per (layer, batch size) of the layer error, the model error and top-1 agreement."""

    def __init__(self, layers: Sequence[tuple[str, str, int | None]]) -> None:
        self.layers = list(layers)  # (name, op, channels), in model order
        self.seen: dict[tuple[str, int], list[tuple[float, float, float | None]]] = {}

    def add(self, layer: str, size: int, layer_error: float, model_error: float, agreement: float | None) -> None:
        self.seen.setdefault((layer, size), []).append((layer_error, model_error, agreement))

    def report(self, source: str, frontend: str, sizes: Sequence[int], batches: int, samples: int,
               notes: list[str]) -> SensitivityReport:
        rows = []
        for depth, (name, op, channels) in enumerate(self.layers):
            layer_error, model_error, agreement = {}, {}, {}
            for size in sizes:
                seen = self.seen.get((name, size))
                if not seen:
                    continue
                layer_error[size] = float(np.mean([e[0] for e in seen]))
                model_error[size] = float(np.mean([e[1] for e in seen]))
                agreements = [e[2] for e in seen]
                agreement[size] = None if None in agreements else float(np.mean(agreements))
            unreliable = [b for b in model_error if (model_error[b] >= UNRELIABLE_ERROR if agreement.get(b) is None
                                                      else agreement[b] < UNRELIABLE_AGREEMENT)]
            rows.append(LayerSensitivity(name, op, channels, depth, layer_error, model_error, agreement,
                                         max(unreliable) if unreliable else None))
        measured = [b for b in sizes if any(b in r.model_error for r in rows)]
        return SensitivityReport(source, frontend, list(measured), batches, samples, UNRELIABLE_ERROR,
                                 UNRELIABLE_AGREEMENT, rows, notes)
