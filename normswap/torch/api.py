"""``normswap.convert`` / ``normswap.inspect`` for torch modules."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..options import CalibrationOptions, RefinementOptions, ValidationOptions
from ..stages import Stages
from ..errors import option
from ..errors import OutputError, UnsupportedError, UsageError, ValidationFailedError
from ..report import ConversionReport
from ..targets import REPLACEMENT_TARGETS, ReplaceOptions, auto_groups_note, get_target
from .calibrate import calibrate, module_device
from .refine import refine
from .convert import convert_module
from .data import Batches, as_args, positional_arity
from .sites import coupling_report


@dataclass
class TorchConversionResult:
    """A converted module (a new object: the input module is never touched) and its report."""

    model: nn.Module
    report: ConversionReport
    example: tuple[torch.Tensor, ...] | None = None

    def _check(self, keep_invalid: bool) -> None:
        if self.report.passed is False and not keep_invalid:
            raise ValidationFailedError("the converted module failed validation, so it was not written; inspect "
                                        f"the report, or pass {option('keep_invalid', True)}")

    def save(self, path: str | os.PathLike, *, keep_invalid: bool = False) -> Path:
        """Write the converted weights (state_dict) as safetensors, atomically, with the conversion recipe in the
        file's metadata (``normswap.restore`` rebuilds the converted module from a fresh original)."""
        from safetensors.torch import save_model

        from .recipe import metadata
        self._check(keep_invalid)
        path = Path(path)
        if not path.parent.exists():
            raise OutputError(f"output folder '{path.parent}' does not exist; create it first")
        from ..onnx.io import file_mode
        from ..onnx.io import remove_stale_temps, temp_prefix
        remove_stale_temps(path.parent)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_model(self.model, tmp, metadata=metadata(self.model, self.report))
            os.chmod(tmp, file_mode(path))
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        self.report.output = str(path)
        return path

    def export_onnx(self, path: str | os.PathLike, example: tuple[torch.Tensor, ...] | None = None, *,
                    keep_invalid: bool = False) -> Path:
        """Export the converted module to ONNX (atomically) with ``example`` inputs (default: those it saw)."""
        from ..onnx.io import load_model, save_model
        from .validate import export
        self._check(keep_invalid)
        args = as_args(example) if example is not None else self.example
        if args is None:
            raise UsageError("exporting needs example inputs; pass example=")
        with tempfile.TemporaryDirectory() as tmp:
            export(self.model, args, Path(tmp) / "m.onnx")  # a model onnxruntime runs, from either exporter
            save_model(load_model(Path(tmp) / "m.onnx").model, path)
        return Path(path)


def convert_torch(module: nn.Module, to: str, *, options: ReplaceOptions, calibration, example_inputs,
                  keep_unfoldable: bool, validate: bool, calibrating: CalibrationOptions, refining: RefinementOptions,
                  validating: ValidationOptions, progress: Callable[[int, int, str], None] | None
                  ) -> TorchConversionResult:
    target = get_target(to)
    clock = Stages()
    arity = positional_arity(module)
    device = module_device(module)
    data = Batches(calibration, arity, calibrating.batch_size, device) if calibration is not None else None
    example = as_args(example_inputs) if example_inputs is not None else (data.first() if data else None)
    converted, converter, flow, _ = convert_module(module, to, options, keep_unfoldable, example)
    clock.done("convert (trace and rewrite)")
    notes = [flow.problem] if flow.problem else []
    if options.groups_by_fit and data is None and to == "group":
        notes.append(auto_groups_note(options.groups))
    report = ConversionReport(to, target.exact, type(module).__name__, converter.records,
                              sum(1 for _ in module.modules()), sum(1 for _ in converted.modules()), notes=notes,
                              frontend="torch", dataflow=flow.source)
    if to in REPLACEMENT_TARGETS and converter.new_layers:
        if data is not None:
            report.calibration = calibrate(module, converted, converter.new_layers, data,
                                           head=flow.head if calibrating.refit_output_layer else None,
                                           choose_groups=options.groups_by_fit, memory_budget=calibrating.memory,
                                           progress=progress)
            clock.done("calibration")
            notes.extend(report.calibration.notes)
            if refining.enabled:
                norm_params = [p for layer in converter.new_layers for p in layer.module.parameters()]
                result = refine(module, converted, norm_params, data, refining, validating.task, progress)
                report.calibration.refinement = result
                notes.append(result.summary())
                changed = set(report.calibration.layers_changed)
                if result.kept and refining.scope == "all":
                    changed |= {n for n, m in converted.named_modules() if next(m.parameters(False), None) is not None}
                report.calibration.layers_changed = sorted(changed)
                clock.done("refinement")
        else:
            report.function_preserved = False
            notes.append("function NOT preserved: without calibration data the new layers use the BN's gamma and "
                         "beta; pass calibration data (a few hundred unlabeled samples)")
    elif calibration is not None and to not in REPLACEMENT_TARGETS:
        notes.append(f"calibration data ignored: {option('to', to)} is exact and has nothing to fit")
    if not converter.records:
        notes.append("nothing to convert: the module has no BatchNorm layer (it was not validated)")
    elif validate:
        from .validate import validate_modules
        inputs = validating.inputs
        held = as_args(inputs) if inputs is not None else example
        if held is None:
            raise UsageError("validation needs example inputs (example_inputs=, inputs= or calibration=); "
                             "or pass validate=False")
        from .calibrate import layer_drift
        eager = layer_drift(module, converted, converter.new_layers, held)
        try:
            report.validation, report.deployable = validate_modules(
                module, converted, held, exact=target.exact, provider=validating.provider, atol=validating.atol,
                rtol=validating.rtol, min_cosine=validating.min_cosine, min_agreement=validating.min_agreement,
                task=validating.task, eager=eager,
                source="given inputs" if inputs is not None else "example inputs")
        except UnsupportedError as e:  # the conversion stands; only its check could not run
            report.validation_error = f"validation could not run: {e}"
            notes.append(report.validation_error)
        clock.done("validation (ONNX export of both, onnxruntime)")
        if not target.exact and validating.inputs is None:
            notes.append("fidelity was measured on the example / calibration inputs; pass held-out inputs "
                         "(inputs=) for an unbiased measure")
    if converter.new_layers:
        report.judge_function()
    report.stage_seconds = clock.seconds
    return TorchConversionResult(converted, report, example)


def inspect_torch(module: nn.Module) -> list[dict]:
    return coupling_report(module)
