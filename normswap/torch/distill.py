"""Distillation after calibration: the converted network learns the original's outputs, guarded by held-out data.

Scope ``all`` trains every parameter of the converted network; ``norms`` only the new layers' scale and shift.
The original is a frozen teacher; the loss is the mean squared error of the outputs (logits) on the unlabeled
calibration data. Adam; for all parameters each tensor's step is ``RMS_STEP`` times its root mean square (at
least ``RMS_FLOOR``): a fixed step large enough for the big tensors destroys a net whose weights are small
(99.7% -> 11% agreement in one step at 1e-3), and one small enough for them barely moves the rest (measured on
the digits nets: 1e-4 gave +0.6 point, the RMS-scaled step +1.1 on the separable net at 300 steps). The norms
alone train at ``LR_NORMS``. Random shifts of 1-2 pixels
were measured and not kept: on the digits nets they raised the held-out error (0.17 -> 0.25 after 300 steps)
where plain batches lowered it (0.17 -> 0.13; docs/fidelity.md).

Guard: a slice of the calibration data (``holdout``, default 15%) is held aside; the held-out error is measured
before training and every ``EVAL_EVERY`` steps, the best state is kept, and when no step beats the calibrated
parameters they are restored. What happened is returned as a ``DistillationReport``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError, option
from ..report import DistillationReport
from .data import Batches, standard_layout

RMS_STEP = 1e-2
RMS_FLOOR = 1e-3
LR_NORMS = 1e-2
EVAL_EVERY = 25
SCOPES = ("all", "norms")


class _Slice:
    """The batches of ``data`` whose sample (tensor data) or batch (iterables) index ``keep`` accepts."""

    def __init__(self, data: Batches, keep, by_sample: bool) -> None:
        self.data, self.keep, self.by_sample = data, keep, by_sample

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.by_sample:
            n = len(self.data.tensors[0])
            index = torch.tensor([k for k in range(n) if self.keep(k)], dtype=torch.long)
            for k in range(0, len(index), self.data.batch_size):
                rows = index[k:k + self.data.batch_size]
                yield tuple(standard_layout(t[rows].to(self.data.device)) for t in self.data.tensors)
            return
        for k, batch in enumerate(self.data):
            if self.keep(k):
                yield batch


def split(data: Batches, holdout: float) -> tuple[object, object | None, int]:
    """(training batches, held-out batches or None, held-out sample count). Tensor data: every
    ``round(1/holdout)``-th sample is held out (spread over the data, deterministic); an iterable: every such
    batch. Fewer than two parts to split: no held-out slice."""
    if not 0 <= holdout < 1:
        raise UsageError(f"{option('distill_holdout', holdout)} must be at least 0 and below 1")
    if holdout == 0:
        return data, None, 0
    every = max(2, round(1 / holdout))
    if data.tensors is not None:
        n = len(data.tensors[0])
        held = sum(1 for k in range(n) if k % every == every - 1)
        if held == 0:
            return data, None, 0
        return (_Slice(data, lambda k: k % every != every - 1, True),
                _Slice(data, lambda k: k % every == every - 1, True), held)
    batches = data.count()
    if batches < 2:
        return data, None, 0
    held_part = _Slice(data, lambda k: k % every == every - 1 or (batches < every and k == batches - 1), False)
    train_part = _Slice(data, lambda k: not (k % every == every - 1 or (batches < every and k == batches - 1)),
                        False)
    return train_part, held_part, sum(len(b[0]) for b in held_part)


def _output(result) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else result[0]


def _param_groups(params: list[nn.Parameter]) -> list[dict]:
    """One Adam group per tensor, its step scaled to the tensor's root mean square."""
    return [{"params": [p], "lr": RMS_STEP * max(float(p.detach().float().pow(2).mean().sqrt()), RMS_FLOOR)}
            for p in params]


def _error(original: nn.Module, converted: nn.Module, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            target = _output(original(*batch))
            total += float(F.mse_loss(_output(converted(*batch)), target, reduction="sum"))
            count += target.numel()
    return total / max(count, 1)


def distill(original: nn.Module, converted: nn.Module, norm_params: list[nn.Parameter], data: Batches, steps: int,
            scope: str = "all", holdout: float = 0.15, progress=None) -> DistillationReport:
    """Train ``converted`` (in place) towards ``original``'s outputs for ``steps`` steps; see the module doc."""
    if scope not in SCOPES:
        raise UsageError(f"{option('distill_scope', scope)} must be one of {', '.join(SCOPES)}")
    start = time.perf_counter()
    params = list(converted.parameters()) if scope == "all" else norm_params
    train, held, held_samples = split(data, holdout)
    guard = held if held is not None else train
    requires = {p: p.requires_grad for p in converted.parameters()}
    for p in converted.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(_param_groups(params) if scope == "all" else params, lr=LR_NORMS)
    modes = (original.training, converted.training)
    original.eval()
    converted.eval()
    try:
        before = best = _error(original, converted, guard)
        best_step, best_state, step = 0, [p.detach().clone() for p in params], 0
        while step < steps:
            ran = False
            for batch in train:
                ran = True
                with torch.no_grad():
                    target = _output(original(*batch))
                loss = F.mse_loss(_output(converted(*batch)), target)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                step += 1
                if step % EVAL_EVERY == 0 or step == steps:
                    error = _error(original, converted, guard)
                    if error < best and math.isfinite(error):
                        best, best_step = error, step
                        best_state = [p.detach().clone() for p in params]
                if progress:
                    progress(step, steps, "distilling")
                if step >= steps:
                    break
            if not ran:
                raise UsageError("the calibration data left no batch to train on after the held-out slice")
        with torch.no_grad():
            for p, value in zip(params, best_state):
                p.copy_(value)
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        original.train(modes[0])
        converted.train(modes[1])
    rate = f"{RMS_STEP:g} x each tensor's RMS" if scope == "all" else f"{LR_NORMS:g}"
    return DistillationReport(scope, step, best_step, held_samples, before, best, time.perf_counter() - start,
                              kept=best_step > 0, learning_rate=rate)
