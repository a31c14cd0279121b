"""The Python API: ``inspect``, ``convert``, ``validate`` -- the same verbs as the CLI.

Inputs are never mutated: a path is loaded fresh, a ``ModelProto`` is copied before it is edited.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import UsageError, ValidationFailedError
from .report import ConversionReport, InspectReport, ValidationReport
from .targets import TARGET_NAMES, get_target
from .validate.compare import DEFAULT_ATOL, DEFAULT_RTOL

ModelLike = str | os.PathLike | onnx.ModelProto
Inputs = str | os.PathLike | Mapping[str, np.ndarray] | None


def _load(model: ModelLike, copy: bool) -> tuple[onnx.ModelProto, str, bool]:
    """(model we may edit, description of the source, whether it had external data)."""
    from .onnx.io import load_model
    if isinstance(model, onnx.ModelProto):
        if not copy:
            return model, "<ModelProto>", False
        clone = onnx.ModelProto()
        clone.CopyFrom(model)
        return clone, "<ModelProto>", False
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model)
        return loaded.model, str(loaded.path), loaded.had_external_data
    raise UsageError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")


@dataclass
class ConversionResult:
    """A converted model and what was done to it. ``save()`` refuses a model that failed validation unless
    ``keep_invalid=True``."""

    model: onnx.ModelProto
    report: ConversionReport
    had_external_data: bool = False

    def save(self, path: str | os.PathLike, *, keep_invalid: bool = False,
             external_data: bool | None = None) -> list[Path]:
        """Write the model atomically; with external data when the input had it, when asked, or above 2 GB."""
        from .onnx.io import save_model
        if self.report.passed is False and not keep_invalid:
            raise ValidationFailedError("the converted model failed validation, so it was not written; "
                                        "inspect the report, or pass keep_invalid=True (--keep-invalid)")
        use_external = self.had_external_data if external_data is None else external_data
        written = save_model(self.model, path, external_data=use_external)
        self.report.output = str(path)
        return written


def convert(model: ModelLike, to: str = "fold", *, keep_unfoldable: bool = False, validate: bool = True,
            provider: str = "auto", inputs: Inputs = None, input_shapes: Mapping[str, tuple[int, ...]] | None = None,
            atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, seed: int = 0) -> ConversionResult:
    """Convert every BatchNormalization of an ONNX model for target ``to`` and (by default) validate the result
    against the original in ONNX Runtime. Validation failure is recorded in the report, not raised."""
    from .onnx.convert import convert_in_place
    from .onnx.io import graph_count
    if to not in TARGET_NAMES:
        raise UsageError(f"unknown target '{to}'; choose one of {', '.join(TARGET_NAMES)}")
    original, source, had_external = _load(model, copy=False)
    before = graph_count(original)
    if isinstance(model, onnx.ModelProto):  # the caller's object: edit a copy, validate against the object
        converted, reference = onnx.ModelProto(), original
        converted.CopyFrom(original)
    else:  # loaded for this call only: edit it directly (no second copy of the weights), reference = the file
        converted, reference = original, Path(source)
    records, notes = convert_in_place(converted, to, keep_unfoldable)
    kept = sum(r.action == "kept" for r in records)
    if kept:
        notes.append(f"{kept} BatchNormalization node(s) kept as they were; see each one's reason")
    report = ConversionReport(to, get_target(to).exact, source, records, before, graph_count(converted),
                              notes=notes)
    if validate:
        report.validation = validate_models_checked(reference, converted, provider, inputs, input_shapes, atol,
                                                    rtol, seed)
    return ConversionResult(converted, report, had_external)


def validate_models_checked(reference: onnx.ModelProto | Path, candidate: onnx.ModelProto, provider: str, inputs: Inputs,
                            input_shapes, atol: float, rtol: float, seed: int) -> ValidationReport:
    from .validate.runner import validate_models
    if atol < 0 or rtol < 0:
        raise UsageError("--atol and --rtol must be non-negative")
    return validate_models(reference, candidate, provider=provider, inputs=inputs, input_shapes=input_shapes,
                           atol=atol, rtol=rtol, seed=seed)


def validate(reference: ModelLike, candidate: ModelLike, *, provider: str = "auto", inputs: Inputs = None,
             input_shapes: Mapping[str, tuple[int, ...]] | None = None, atol: float = DEFAULT_ATOL,
             rtol: float = DEFAULT_RTOL, seed: int = 0) -> ValidationReport:
    """Run two ONNX models on the same inputs in ONNX Runtime and compare every output."""
    ref, _, _ = _load(reference, copy=False)
    cand, _, _ = _load(candidate, copy=False)
    return validate_models_checked(ref, cand, provider, inputs, input_shapes, atol, rtol, seed)


def inspect(model: ModelLike) -> InspectReport:
    """Every normalization site, and what ``--to fold`` would do with it (computed by the real conversion on a
    scratch copy, so inspect and convert always agree)."""
    from .onnx.convert import convert_in_place, other_norm_sites
    from .onnx.io import opset_of
    scratch, source, _ = _load(model, copy=True)
    opset, ir_version = opset_of(scratch), scratch.ir_version
    records, _ = convert_in_place(scratch, "fold")
    sites = [{"name": r.name, "op": r.op, "graph": r.graph, "channels": r.channels, "producer": r.producer,
              "producer_op": r.producer_op, "foldable": r.action == "folded", "action_under_fold": r.action,
              "reason": r.reason} for r in records]
    return InspectReport(source, opset, ir_version, sites + other_norm_sites(scratch))
