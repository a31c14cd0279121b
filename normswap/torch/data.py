"""Calibration and validation data for a torch module: a tensor, a tuple of tensors, or an iterable of batches."""
from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..errors import UsageError


def standard_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` with row-major strides. A tensor whose channel dim has size 1 can carry channels-last strides and
    still count as contiguous (e.g. ``torch.from_numpy(images[:, None])``); convolutions then produce
    channels-last outputs, and torch 2.13's CPU GroupNorm backward crashes (segfault) on channels-last inputs that
    do not require grad -- exactly what distillation, which trains only the norm parameters, runs."""
    expected, acc = [], 1
    for size in reversed(t.shape):
        expected.append(acc)
        acc *= max(size, 1)
    if tuple(reversed(expected)) == t.stride():
        return t
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


def positional_arity(module: nn.Module) -> int:
    """How many positional tensors forward takes (extra items of a batch, such as labels, are dropped)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 1
    return max(1, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                      for p in params))


def forward_names(module: nn.Module) -> list[str]:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ["input"]
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


class Batches:
    """Re-iterable batches of forward arguments. Tensors and tuples of tensors are sliced along dim 0; any
    other iterable (a DataLoader) is iterated as it is, once per pass -- a one-shot generator is kept in a list
    (its samples are then held in memory, which the report notes)."""

    def __init__(self, data, arity: int, batch_size: int, device: torch.device | str = "cpu") -> None:
        """Batches come out on ``device`` (the module's): calibration and distillation run where it is."""
        self.arity, self.batch_size, self.note, self.device = arity, batch_size, None, torch.device(device)
        if isinstance(data, torch.Tensor):
            data = (data,)
        if isinstance(data, (tuple, list)) and data and all(isinstance(t, torch.Tensor) for t in data):
            self.tensors: tuple[torch.Tensor, ...] | None = tuple(data)[:arity]
            if len({len(t) for t in self.tensors}) != 1:
                raise UsageError("the calibration tensors hold different numbers of samples")
            self.source: Iterable | None = None
        elif isinstance(data, Iterable):
            self.tensors = None
            self.source = data
            if iter(data) is data:  # a generator: it can be read once only
                self.source = list(data)
                self.note = "the calibration iterable could be read only once, so its batches were kept in memory"
        else:
            raise UsageError(f"calibration data must be a tensor, a tuple of tensors or an iterable of batches, "
                             f"not {type(data).__name__}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        if self.tensors is not None:
            n = len(self.tensors[0])
            for k in range(0, n, self.batch_size):
                yield tuple(self._place(t[k:k + self.batch_size]) for t in self.tensors)
            return
        for batch in self.source:
            if isinstance(batch, torch.Tensor):
                yield (self._place(batch),)
            elif isinstance(batch, (tuple, list)):
                yield tuple(self._place(t) for t in batch[:self.arity])
            elif isinstance(batch, dict):
                raise UsageError("dict batches are not supported; yield tensors or tuples of tensors")
            else:
                raise UsageError(f"a calibration batch is a {type(batch).__name__}, not a tensor or tuple")

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        return standard_layout(t.to(self.device, non_blocking=True) if t.device != self.device else t)

    def first(self) -> tuple[torch.Tensor, ...]:
        for batch in self:
            return batch
        raise UsageError("the calibration data is empty")

    def count(self) -> int:
        if self.tensors is not None:
            return -(-len(self.tensors[0]) // self.batch_size)
        try:
            return len(self.source)
        except TypeError:
            return sum(1 for _ in self)

    def samples(self) -> int:
        return sum(len(b[0]) for b in self)


def as_args(inputs) -> tuple[torch.Tensor, ...]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in inputs):
        return tuple(inputs)
    raise UsageError("example inputs must be a tensor or a tuple of tensors")
