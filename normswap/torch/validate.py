"""Validating a converted module in ONNX Runtime: export both modules with torch.onnx, compare them with the
same validator as the ONNX path, and check that the converted module's ONNX export computes what the module
does in eager PyTorch (so the deployable artifact matches)."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import UnsupportedError
from ..report import ValidationReport
from ..validate.compare import DEFAULT_ATOL, DEFAULT_RTOL, OutputStats
from ..validate.agreement import TaskMeasure
from ..validate.float64 import yardstick_limit
from .data import forward_names

IR_VERSION = 10  # onnxruntime 1.31 reads IR <= 13; the exporter may write newer


def _outputs(module: nn.Module, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(*args)
    return [out] if isinstance(out, torch.Tensor) else list(out)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress prints, warnings and log lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


EXPORTERS = ("dynamo", "TorchScript")


def _export_once(module: nn.Module, args: tuple[torch.Tensor, ...], path: str, exporter: str, names: list[str],
                 outputs: list[str]) -> None:
    dynamo = exporter == "dynamo"
    with _quiet_exporter():
        torch.onnx.export(module, args, path, dynamo=dynamo, input_names=names, output_names=outputs,
                          **({"optimize": False} if dynamo else {}))


def _runtime_problem(path: str, args: tuple[torch.Tensor, ...], ran: dict | None = None) -> str | None:
    """Why onnxruntime (CPU, optimizations off) cannot load or run the exported model on ``args``, or None; its
    outputs by name go into ``ran`` when given (the deployable check reuses them instead of running again)."""
    import onnxruntime as ort
    from ..validate.providers import CPU, ORT_SILENT
    options = ort.SessionOptions()
    options.log_severity_level = ORT_SILENT
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(path, options, providers=[CPU])
        feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)}
        values = session.run(None, feeds)
    except Exception as e:  # noqa: BLE001
        return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if ran is not None:
        ran.update(zip((o.name for o in session.get_outputs()), values))
    return None


def export(module: nn.Module, args: tuple[torch.Tensor, ...], path: str | os.PathLike, *,
           output_count: int | None = None, ran: dict | None = None) -> tuple[list[str], str]:
    """torch.onnx.export with the dynamo exporter (optimize=False, so BN stays in the original's graph); when it
    fails, or onnxruntime cannot load or run what it wrote (dynamo's Conv3d export of torchvision's r3d_18), the
    TorchScript exporter (which folds Conv+BN in eval mode -- the same function). Inputs are named after
    forward's arguments, outputs ``output0``, ``output1``... so two exports line up (``output_count``: how many,
    when the caller already ran the module; else one forward counts them). ``ran`` receives onnxruntime's
    outputs of the check run (CPU). Returns (input names, the exporter that produced the model)."""
    names = [n for n in forward_names(module)][:len(args)] or [f"input{k}" for k in range(len(args))]
    training = module.training
    module.eval()
    errors = []
    try:
        count = len(_outputs(module, args)) if output_count is None else output_count
        outputs = [f"output{k}" for k in range(count)]
        for exporter in EXPORTERS:
            try:
                _export_once(module, args, str(path), exporter, names, outputs)
                m = onnx.load(str(path))
                if m.ir_version > IR_VERSION:
                    m.ir_version = IR_VERSION
                onnx.save_model(m, str(path))
            except Exception as e:  # noqa: BLE001 -- the exporter's own failure: try the other one
                errors.append(f"{exporter}: {str(e).splitlines()[0] if str(e) else e!r}")
                continue
            problem = _runtime_problem(str(path), args, ran)
            if problem is None:
                return [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}], exporter
            errors.append(f"{exporter}: onnxruntime cannot run its export ({problem})")
    finally:
        module.train(training)
    raise UnsupportedError("no torch.onnx exporter gave a model onnxruntime runs (" + "; ".join(errors)[:400] + ")")


def float64_outputs(module: nn.Module, args: tuple[torch.Tensor, ...]) -> list[np.ndarray] | None:
    """The module's outputs computed in float64 (a double copy, on the CPU), or None when it cannot run so."""
    import copy
    try:
        twin = copy.deepcopy(module).to("cpu", torch.float64).eval()
        args64 = tuple(a.detach().to("cpu", torch.float64) if a.is_floating_point() else a.detach().cpu()
                       for a in args)
        return [o.numpy() for o in _outputs(twin, args64)]
    except Exception:  # noqa: BLE001 -- some modules hold float32-only parts: the elementwise rule then applies
        return None


def _module_reference(module: nn.Module, names: list[str], outputs: list[str]):
    """A float64 reference in the form the ONNX validator takes: feeds by input name -> outputs by name."""
    def run(feeds, seconds: float | None = None):  # torch in double is fast: no budget to keep
        args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)
        values = float64_outputs(module, args)
        if values is None:
            from ..validate.float64 import Unavailable
            raise Unavailable("the module cannot run in float64")
        return dict(zip(outputs, values))
    return run, "torch (float64 copy of the module)"


def validate_modules(original: nn.Module, converted: nn.Module, args: tuple[torch.Tensor, ...], *, exact: bool,
                     provider: str, atol: float | None, rtol: float | None, min_cosine: float | None,
                     min_agreement: float | None, source: str, task: TaskMeasure = TaskMeasure(),
                     eager: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
                     ) -> tuple[ValidationReport, ValidationReport]:
    """(original vs converted in ONNX Runtime, converted eager vs its own ONNX export). ``eager``: both modules'
    outputs on ``args`` when the caller already ran them (``calibrate.layer_drift``): neither runs again."""
    from ..validate.runner import validate_models
    with tempfile.TemporaryDirectory(prefix="normswap-torch-") as tmp:
        ref_path, cand_path = Path(tmp) / "original.onnx", Path(tmp) / "converted.onnx"
        exported: dict[str, np.ndarray] = {}
        names, ref_exporter = export(original, args, ref_path, output_count=len(eager[0]) if eager else None)
        _, cand_exporter = export(converted, args, cand_path, output_count=len(eager[1]) if eager else None,
                                  ran=exported)
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        ref_model, cand_model = onnx.load(str(ref_path)), onnx.load(str(cand_path))
        reference64 = (_module_reference(original, names, [o.name for o in ref_model.graph.output])
                       if exact and atol is None and rtol is None else None)
        comparison = validate_models(ref_model, cand_model, provider=provider, inputs=feeds, atol=atol, rtol=rtol,
                                     check="exact" if exact else "fidelity", min_cosine=min_cosine,
                                     min_agreement=min_agreement, float64_reference=reference64, task=task)
        comparison.inputs = source
        comparison.exported_with = f"original: {ref_exporter}, converted: {cand_exporter}"
        deployable = _eager_vs_onnx(converted, args, cand_model, feeds, comparison.providers, atol, rtol, source,
                                    eager[1] if eager else None, exported)
        deployable.exported_with = cand_exporter
    return comparison, deployable


def _eager_vs_onnx(module: nn.Module, args, model: onnx.ModelProto, feeds, providers, atol, rtol,
                   source: str, eager_outputs: list[torch.Tensor] | None = None,
                   exported: dict[str, np.ndarray] | None = None) -> ValidationReport:
    """The module in eager PyTorch against its ONNX export in onnxruntime on ``providers``, judged by the noise
    floor of a float64 copy of the module on the first ``FLOAT64_SAMPLES`` samples (as exact validation judges).
    ``eager_outputs`` / ``exported``: the two runs when already done (the export's CPU check run serves when
    ``providers`` is the CPU alone)."""
    from ..onnx.activations import Activations
    from ..validate.float64 import FLOAT64_SAMPLES
    from ..validate.providers import CPU
    from ..validate.runner import OPTIMIZATION
    if eager_outputs is None:
        training = module.training
        module.eval()
        try:
            eager_outputs = _outputs(module, args)
        finally:
            module.train(training)
    names = [o.name for o in model.graph.output]
    if list(providers) == [CPU] and exported and all(n in exported for n in names):
        got, ran = exported, [CPU]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run = Activations(model, [], tuple(providers), tmp, "exported")
            got, ran, names = run.run(feeds, run.outputs), run.providers, run.outputs
    noise_rule = atol is None and rtol is None
    samples = len(args[0]) if args and args[0].ndim else 0
    few = min(samples, FLOAT64_SAMPLES)
    batch_major = few < samples and all(a.ndim and len(a) == samples for a in args) and all(
        o.ndim and len(o) == samples for o in eager_outputs)
    exact64 = None
    if noise_rule:
        exact64 = float64_outputs(module, tuple(a[:few] for a in args) if batch_major else args)
        if batch_major and exact64 is not None and any(np.ndim(v) == 0 or len(v) != few for v in exact64):
            exact64 = float64_outputs(module, args)  # an output that is not per sample: all samples
            batch_major = False
    level = yardstick_limit(model)
    outputs, stats_kept = [], []
    for k, (name, value) in enumerate(zip(names, eager_outputs)):
        stats = OutputStats(name, DEFAULT_ATOL if atol is None else atol, DEFAULT_RTOL if rtol is None else rtol)
        # the module's kernels and onnxruntime's round independently: the export's own error is bounded by the
        # model's float32 level, not by a multiple of eager's (which may happen to round almost exactly)
        stats.float32_level, stats.independent_kernels = level, True
        eager, onnx_value = value.detach().cpu().numpy(), np.asarray(got[name])
        stats.add(eager, onnx_value)
        if exact64 is not None:
            cut = (lambda v: v[:few]) if batch_major else (lambda v: v)
            stats.add_float64(cut(eager), cut(onnx_value), exact64[k])
        stats_kept.append(stats)
        outputs.append(stats.result())
    report = ValidationReport("exact", list(ran), "same", OPTIMIZATION,
                              DEFAULT_ATOL if atol is None else atol, DEFAULT_RTOL if rtol is None else rtol, source,
                              outputs)
    if exact64 is not None:
        judged = max((o.f64_samples for o in stats_kept), default=0)
        report.rule = "noise floor"
        report.float64_reference = f"torch (float64 copy of the module), {judged} sample(s)"
    elif noise_rule:
        report.rule_note = "the module cannot run in float64: judged elementwise within atol/rtol"
    return report
