"""``normswap.compare`` for torch modules: every target converted, measured in eager PyTorch.

The original runs once on the held-out inputs (and once in float64 for the exact targets' noise-floor check);
each converted module runs on the same inputs. Latency is eager PyTorch on the module's device, interleaved
round by round like the ONNX path, the fastest round kept.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from ..comparison import LATENCY_BATCH, LATENCY_ROUNDS, batch_independent, group_summary
from ..errors import UsageError, option
from ..report import CompareRow
from ..targets import get_target
from ..validate.agreement import TaskMeasure, task_agreement
from ..validate.compare import OutputStats
from ..validate.float64 import FLOAT64_SAMPLES
from .calibrate import module_device
from .data import as_args
from .validate import _outputs, float64_outputs


def compare_torch(module: nn.Module, names: tuple[str, ...], *, groups, calibration, inputs, example_inputs,
                  latency: bool, task: TaskMeasure) -> tuple[list[CompareRow], str, list[str], int]:
    from ..api import convert
    held = as_args(inputs) if inputs is not None else None
    notes = []
    if held is None:
        held = as_args(example_inputs) if example_inputs is not None else None
        if held is None:
            raise UsageError(f"comparing a torch module needs held-out inputs: pass {option('inputs')} (or "
                             f"{option('example_inputs')})")
        notes.append(f"measured on the example inputs; pass held-out samples ({option('inputs')}) for a "
                     "meaningful agreement")
    device = module_device(module)
    held = tuple(a.to(device) for a in held)  # measured where the module's parameters are
    module.eval()
    reference = [o.detach().cpu().numpy() for o in _outputs(module, held)]
    first = tuple(a[:FLOAT64_SAMPLES] for a in held)
    reference64 = float64_outputs(module, first) if any(get_target(n).exact for n in names) else None
    reference32 = [o.detach().cpu().numpy() for o in _outputs(module, first)]
    rows, models = [], []
    for name in names:
        result = convert(module, name, groups=groups if name == "group" else None,
                         calibration=calibration if name in ("group", "layer", "instance") else None,
                         example_inputs=held, validate=False, progress=False)
        report = result.report
        model = result.model.eval()
        got = [o.detach().cpu().numpy() for o in _outputs(model, held)]
        stats = OutputStats("output", track_spread=True, threshold=task.threshold)
        stats.add(reference[0], got[0])
        check = "exact" if report.exact else "fidelity"
        if report.exact and reference64 is not None:
            mine = _outputs(model, first)[0].detach().cpu().numpy()
            stats.add_float64(reference32[0], mine, reference64[0])
        comparison = stats.result(check)
        if task.metric is not None:
            agreement, measure = task_agreement(task.metric, reference, got), f"task metric '{task.metric_name}'"
        else:
            agreement = comparison.agreement
            measure = f"{comparison.agreement_measure} on output 0" if agreement is not None else None
        c = report.calibration
        rows.append(CompareRow(
            target=name, exact=report.exact, top1_agreement=comparison.top1_agreement, cosine=comparison.cosine,
            groups=group_summary(report) or None, batch_independent=batch_independent(report),
            parameters=sum(p.numel() for p in model.parameters()), nodes=report.nodes_after, latency_ms=None,
            original_latency_ms=None, calibration_seconds=c.seconds if c else None, calibrated=c is not None,
            passed=comparison.passed, kept=report.count("kept"),
            converted=len(report.layers) - report.count("kept") - report.count("skipped"),
            problem=comparison.problem, report=report, agreement=agreement, agreement_measure=measure))
        models.append(model)
    if not any(r.report.layers for r in rows):
        raise UsageError(f"nothing to compare: {type(module).__name__} has no BatchNorm layer")
    if any(r.target in ("group", "layer", "instance") and not r.calibrated for r in rows):
        notes.append("replacement targets were not calibrated: their agreement is what gamma/beta copied over "
                     f"keeps; pass {option('calibration')} data to measure what calibration recovers")
    batch = 0
    if latency:
        timed = tuple(a[:LATENCY_BATCH] for a in held)
        batch = len(timed[0])
        original_ms, times = _latencies(module, models, timed)
        for row, ms in zip(rows, times):
            row.latency_ms, row.original_latency_ms = ms, original_ms
    return rows, type(module).__name__, notes, batch


def _latencies(original: nn.Module, models: list[nn.Module], args) -> tuple[float, list[float]]:
    everything = [original, *models]
    best = [float("inf")] * len(everything)
    with torch.no_grad():
        for round_ in range(LATENCY_ROUNDS + 1):
            for k, m in enumerate(everything):
                t0 = time.perf_counter()
                m(*args)
                if args[0].is_cuda:
                    torch.cuda.synchronize()
                if round_:
                    best[k] = min(best[k], (time.perf_counter() - t0) * 1000)
    return best[0], best[1:]
