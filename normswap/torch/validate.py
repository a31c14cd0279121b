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

from ..errors import option
from ..errors import UnsupportedError
from ..report import ValidationReport
from ..validate.compare import OutputStats
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


def export(module: nn.Module, args: tuple[torch.Tensor, ...], path: str | os.PathLike) -> list[str]:
    """torch.onnx.export with the dynamo exporter (optimize=False, so BN stays in the original's graph), falling
    back to the TorchScript exporter (which folds Conv+BN in eval mode -- the same function). Inputs are named
    after forward's arguments, outputs ``output0``, ``output1``... so two exports line up; returns input names."""
    names = [n for n in forward_names(module)][:len(args)] or [f"input{k}" for k in range(len(args))]
    training = module.training
    module.eval()
    errors = []
    try:
        outputs = [f"output{k}" for k in range(len(_outputs(module, args)))]
        for dynamo in (True, False):
            try:
                with _quiet_exporter():
                    torch.onnx.export(module, args, str(path), dynamo=dynamo, input_names=names,
                                      output_names=outputs, **({"optimize": False} if dynamo else {}))
                m = onnx.load(str(path))
                if m.ir_version > IR_VERSION:
                    m.ir_version = IR_VERSION
                onnx.save_model(m, str(path))
                return [i.name for i in m.graph.input if i.name not in {t.name for t in m.graph.initializer}]
            except Exception as e:
                errors.append(f"{'dynamo' if dynamo else 'TorchScript'}: {str(e).splitlines()[0] if str(e) else e!r}")
    finally:
        module.train(training)
    raise UnsupportedError("torch.onnx could not export the module (" + "; ".join(errors)[:300] +
                           f"); pass {option('validate')} to skip validation")


def validate_modules(original: nn.Module, converted: nn.Module, args: tuple[torch.Tensor, ...], *, exact: bool,
                     provider: str, atol: float, rtol: float, min_cosine: float | None,
                     min_agreement: float | None, source: str) -> tuple[ValidationReport, ValidationReport]:
    """(original vs converted in ONNX Runtime, converted eager vs its own ONNX export)."""
    from ..validate.runner import validate_models
    with tempfile.TemporaryDirectory(prefix="normswap-torch-") as tmp:
        ref_path, cand_path = Path(tmp) / "original.onnx", Path(tmp) / "converted.onnx"
        names = export(original, args, ref_path)
        export(converted, args, cand_path)
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(names, args)}
        ref_model, cand_model = onnx.load(str(ref_path)), onnx.load(str(cand_path))
        comparison = validate_models(ref_model, cand_model, provider=provider, inputs=feeds, atol=atol, rtol=rtol,
                                     check="exact" if exact else "fidelity", min_cosine=min_cosine,
                                     min_agreement=min_agreement)
        comparison.inputs = source
        deployable = _eager_vs_onnx(converted, args, cand_model, feeds, comparison.providers, atol, rtol, source)
    return comparison, deployable


def _eager_vs_onnx(module: nn.Module, args, model: onnx.ModelProto, feeds, providers, atol, rtol,
                   source: str) -> ValidationReport:
    from ..onnx.activations import Activations
    from ..validate.runner import OPTIMIZATION
    training = module.training
    module.eval()
    try:
        eager_outputs = _outputs(module, args)
    finally:
        module.train(training)
    with tempfile.TemporaryDirectory() as tmp:
        run = Activations(model, [], tuple(providers), tmp, "exported")
        got = run.run(feeds, run.outputs)
    outputs = []
    for name, value in zip(run.outputs, eager_outputs):
        stats = OutputStats(name, atol, rtol)
        stats.add(value.detach().cpu().numpy(), np.asarray(got[name]))
        outputs.append(stats.result())
    return ValidationReport("exact", list(run.providers), "same", OPTIMIZATION, atol, rtol, source, outputs)
