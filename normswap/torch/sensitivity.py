"""Batch-size sensitivity of a torch module's BatchNorms (see ``normswap.batch_sensitivity`` for the measure).

The module runs in eval mode; forward hooks read each BN's input and output, and for the layer measured a hook
returns the output computed with the batch's statistics (written out, so nothing in the module changes and a
one-sample batch of 2-D input is measured too). Data moves to the module's device.
"""
from __future__ import annotations

import torch
from torch import nn

from ..batch_sensitivity import Accumulator, batch_count, draw_batches, relative_error, top1
from ..report import SensitivityReport
from .calibrate import module_device
from .data import as_args


def _batch_norms(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _first(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _with_batch_stats(x: torch.Tensor, m: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """BN of ``x`` with its batch's (biased) statistics over axis 0 and every axis after the channels -- what
    training computes, written out so that a batch of one sample of 2-D input (variance 0) is measured too."""
    axes = (0,) + tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dim=axes, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
    y = (x - mean) / torch.sqrt(var + m.eps)
    if m.weight is not None:
        y = y * m.weight.reshape(shape) + m.bias.reshape(shape)
    return y.to(x.dtype)


def batch_sensitivity_torch(module: nn.Module, data, sizes: tuple[int, ...], batches: int, seed: int,
                            progress=None) -> SensitivityReport:
    device = module_device(module)
    args = tuple(a.to(device) for a in as_args(data))  # the batches run where the module's parameters are
    samples = len(args[0])
    norms = _batch_norms(module)
    acc = Accumulator([(name, type(m).__name__, m.num_features) for name, m in norms])
    notes = [] if norms else ["no BatchNorm layer to measure"]
    usable = [b for b in sizes if b <= samples]
    if len(usable) < len(sizes):
        notes.append(f"batch sizes above the {samples} samples given were not measured: "
                     f"{', '.join(str(b) for b in sizes if b > samples)}")
    training = module.training
    module.eval()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    replace: dict[str, torch.Tensor] = {}

    def hook(name):
        def run(m, inputs, output):
            if name in replace:
                return replace[name]
            if not replace:  # the run with every layer as trained: record what each BN sees
                seen[name] = (inputs[0].detach(), output.detach())
            return None
        return run

    handles = [m.register_forward_hook(hook(name)) for name, m in norms]
    total, done = sum(batch_count(b, batches) for b in usable) * (1 + len(norms)), 0
    try:
        with torch.no_grad():
            for size in usable:
                for index in draw_batches(samples, size, batches, seed):
                    rows = torch.from_numpy(index).to(device)
                    batch = tuple(a[rows] for a in args)
                    seen.clear()
                    base = _first(module(*batch)).float().cpu().numpy()
                    done += 1
                    for name, m in norms:
                        x, y_run = seen[name]
                        y_batch = _with_batch_stats(x, m)
                        replace[name] = y_batch
                        out = _first(module(*batch)).float().cpu().numpy()
                        del replace[name]
                        acc.add(name, size, relative_error(y_batch.double().cpu().numpy(),
                                                           y_run.double().cpu().numpy()),
                                relative_error(out, base), top1(out, base))
                        done += 1
                        if progress:
                            progress(done, total, f"batch sensitivity: batch size {size}")
    finally:
        for h in handles:
            h.remove()
        module.train(training)
    return acc.report(type(module).__name__, "torch", usable, batches, samples, notes)
