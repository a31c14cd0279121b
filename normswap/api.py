"""The Python API: ``inspect``, ``convert``, ``validate`` -- the same verbs as the CLI.

Inputs are never mutated: a path is loaded fresh, a ``ModelProto`` is copied before it is edited.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from .errors import option
from .errors import UnsupportedError, UsageError, ValidationFailedError
from .options import CALIBRATION_BATCH  # noqa: F401 -- kept importable from here, where it lived
from .options import REFINEMENT_KEYWORDS, CalibrationOptions, RefinementOptions, ValidationOptions, stage_options
from .stages import Stages
from .progress import auto_progress
from .batch_sensitivity import DEFAULT_BATCHES, DEFAULT_BATCH_SIZES
from .report import ConversionReport, InspectReport, SensitivityReport, ValidationReport
from .validate.agreement import DEFAULT_THRESHOLD, TaskMeasure, TaskMetric
from .targets import (LAYER_OVER, REPLACEMENT_TARGETS, TARGET_NAMES, ReplaceOptions, auto_groups_note, get_target,
                      resolve_groups)

ModelLike = str | os.PathLike | onnx.ModelProto
Inputs = str | os.PathLike | Mapping[str, np.ndarray] | None
Progress = Callable[[int, int, str], None]


def _graphsurgeon_graph(model) -> bool:
    """True for an ``onnx_graphsurgeon.Graph``, without importing onnx-graphsurgeon when the caller has not."""
    gs = sys.modules.get("onnx_graphsurgeon")
    return gs is not None and isinstance(model, gs.Graph)


def _load(model: ModelLike, copy: bool) -> tuple[onnx.ModelProto, str, bool]:
    """(model we may edit, description of the source, whether it had external data). An onnx-graphsurgeon
    Graph is exported to a ModelProto of its own (its IR version and opsets kept)."""
    from .onnx.io import load_model
    if _graphsurgeon_graph(model):
        from .onnx.structure import check_structure
        exported = sys.modules["onnx_graphsurgeon"].export_onnx(model)
        check_structure(exported)
        return exported, "<onnx_graphsurgeon.Graph>", False
    if isinstance(model, onnx.ModelProto):
        from .onnx.structure import check_structure
        check_structure(model)
        if not copy:
            return model, "<ModelProto>", False
        clone = onnx.ModelProto()
        clone.CopyFrom(model)
        return clone, "<ModelProto>", False
    if isinstance(model, (str, os.PathLike)):
        loaded = load_model(model, lazy_external=True)
        return loaded.model, str(loaded.path), loaded.had_external_data
    raise UsageError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")


@dataclass
class ConversionResult:
    """A converted model and what was done to it. ``save()`` refuses a model that failed validation unless
    ``keep_invalid=True``."""

    model: onnx.ModelProto
    report: ConversionReport
    had_external_data: bool = False
    graph: object | None = None  # the converted model as an onnx_graphsurgeon.Graph, when one was given

    def save(self, path: str | os.PathLike, *, keep_invalid: bool = False, external_data: bool | None = None,
             progress: Progress | None = None, protected: Iterable[str | os.PathLike] = ()) -> list[Path]:
        """Write the model atomically; with external data when the input had it, when asked, or above 2 GB. No
        file the source model reads, nor any in ``protected`` (other files the caller reads), is ever removed or
        overwritten (a data file the replaced output used is removed only when none of them reads it)."""
        from .onnx.io import save_model
        reads = _check_not_a_read_file(self.model, self.report.source, path)
        if self.report.passed is False and not keep_invalid:
            raise ValidationFailedError("the converted model failed validation, so it was not written; "
                                        f"inspect the report, or pass {option('keep_invalid', True)}")
        use_external = self.had_external_data if external_data is None else external_data
        written = save_model(self.model, path, external_data=use_external, progress=progress,
                             protected=[*reads, *map(Path, protected)])
        self.report.output = str(path)
        return written


def _check_not_a_read_file(model: onnx.ModelProto, source: str, dest: str | os.PathLike) -> list[Path]:
    """Refuse to write over the source model's external data, or any file the model still reads lazily (the
    source model file itself may be replaced); returns those files and the source model."""
    from .onnx.external import bound_ref, is_external
    from .paths import WritePlan, external_files
    files = {Path(bound_ref(t)[0]) for t in model.graph.initializer if is_external(t)}
    if Path(source).is_file():
        files.update(external_files(Path(source)))
    if files:
        WritePlan(sorted(files)).add(dest, "the output")
    return sorted(files) + ([Path(source)] if Path(source).is_file() else [])


def _check_target(to: str, layer_over: str) -> None:
    if to not in TARGET_NAMES:
        raise UsageError(f"unknown target '{to}'; choose one of {', '.join(TARGET_NAMES)}")
    if layer_over not in LAYER_OVER:
        raise UsageError(f"{option('layer_over')} must be one of {', '.join(LAYER_OVER)} (got {layer_over!r})")


VALIDATION_HOLDOUT = 0.15  # of the calibration data, held aside to validate on when no --inputs are given


def hold_aside(calib: Mapping[str, np.ndarray], share: float):
    """(calibration data, validation inputs) from calibration data alone: the last ``share`` of the samples (at
    least one) validate and are not calibrated on; with ``share`` 0 (exact targets: nothing is fitted), or one
    sample, all of it validates."""
    from .validate.inputs import CheckedFeeds
    count = next((len(v) for v in calib.values() if np.ndim(v)), 0)
    held = max(1, round(count * share)) if share and count >= 2 else 0
    if not held:
        return calib, CheckedFeeds(calib, f"the {option('calibration')} data ({count} samples; nothing is fitted "
                                          "to it)" if share == 0 else f"the {option('calibration')} data")
    cut = {k: (v[:count - held], v[count - held:]) if np.ndim(v) and len(v) == count else (v, v)
           for k, v in calib.items()}
    return ({k: a for k, (a, _) in cut.items()},
            CheckedFeeds({k: b for k, (_, b) in cut.items()}, f"{held} sample(s) held aside from the "
                         f"{option('calibration')} data (not calibrated on); pass {option('inputs')} for your own"))


def exporter_folded_hint(model: onnx.ModelProto) -> str:
    """Said when a model without BatchNormalization comes from torch.onnx: its exporter folds BN by default."""
    if not model.producer_name.lower().startswith("pytorch"):
        return ""
    return ("; torch.onnx.export folds BatchNorm into the convs by default -- to keep it, export the module in eval "
            "mode with dynamo=True, optimize=False (the TorchScript exporter, dynamo=False, always folds it), or "
            "convert the torch module itself (normswap convert --torch-model)")


def task_measure(task_metric: TaskMetric | None, map_threshold: float) -> TaskMeasure:
    """The agreement settings, checked: a callable metric, a threshold strictly inside (0, 1)."""
    return ValidationOptions(task_metric=task_metric, map_threshold=map_threshold).task


def _upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter
    from .onnx.io import opset_of
    current = opset_of(model)
    if opset < current:
        raise UsageError(f"{option('opset', opset)} is below the model's opset {current}; normswap only upgrades")
    if opset == current:
        return model
    try:
        upgraded = version_converter.convert_version(model, opset)
    except Exception as e:
        raise UnsupportedError(f"onnx's version converter cannot take this model to opset {opset} "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                               f"try a lower {option('opset')}") from None
    upgraded.ir_version = model.ir_version if model.ir_version >= 8 or opset < 15 else max(model.ir_version, 8)
    return upgraded


def _shape_probe(reference: onnx.ModelProto | Path, calibration: Mapping[str, np.ndarray] | None,
                 input_shapes, seed: int, provider: str):
    """A function that runs the original model once to read concrete shapes of the named values."""
    def probe(names: list[str], required: bool) -> dict[str, tuple[tuple[int, ...], int]]:
        """Shapes and element types of ``names`` from one run; ``required=False``: {} when there is no data to
        run on (symbolic input dims and no shapes given) instead of an error."""
        from .onnx.activations import Activations
        from .onnx.batching import fixed_layout, iter_layout
        from .validate.inputs import random_inputs
        from .validate.providers import select_providers
        model = reference if isinstance(reference, onnx.ModelProto) else _load(reference, copy=False)[0]
        try:
            feeds = (next(iter_layout(calibration, fixed_layout(model, calibration, 2)))[0] if calibration
                     else random_inputs(model, input_shapes, seed))
        except UsageError:
            if required:
                raise
            return {}
        with tempfile.TemporaryDirectory(prefix="normswap-probe-") as workdir:
            run = Activations(model, names, select_providers(provider).providers, workdir, "reference")
            return {k: (tuple(v.shape), onnx.helper.np_dtype_to_tensor_dtype(v.dtype))
                    for k, v in run.run(feeds, names).items()}
    return probe


def _is_torch_module(model) -> bool:
    """True for a torch.nn.Module, without importing torch when the caller has not."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


@auto_progress
def convert(model, to: str = "fold", *, groups: int | str | None = None, group_size: int | None = None,
            layer_over: str = "all", calibration=None, example_inputs=None, keep_unfoldable: bool = False,
            allow_nonfinite: bool = False, validate: bool = True, opset: int | None = None,
            calibration_options: CalibrationOptions | None = None, refine: RefinementOptions | bool | None = None,
            validation: ValidationOptions | None = None, agreement_floor: float | None = None,
            progress: Progress | bool | None = None, **keywords):
    """Convert every BatchNorm of an ONNX model (path or ``onnx.ModelProto``) or a ``torch.nn.Module`` for
    target ``to`` and (by default) validate the result against the original in ONNX Runtime.

    ``calibration`` (unlabeled samples; ONNX: an .npz path or a mapping of input name to array; torch: a tensor,
    a tuple of tensors or an iterable of batches) refits the new layers so the network keeps its function, then
    **refinement** (on by default when torch is installed; ``refine=False`` for calibration alone) trains the
    converted network's parameters towards the original's outputs within a time budget, keeping the best state on
    held-out data (ONNX models run in torch for it, their trained values written back into the initializers they
    came from). ``to="group"``: ``groups=G`` (default 32) is honoured in every layer whose C allows it (the
    largest divisor of C not above G; the report gives each layer's count and why it differs), ``group_size=S``
    asks for S channels per group, and ``groups="auto"`` lets calibration choose each layer's count by measured
    fit. A BN with NaN / infinite parameters, a NaN epsilon or a negative variance is refused
    (``InvalidModelError``) unless ``allow_nonfinite``.

    Each stage's settings are one typed group (``normswap.options``): ``calibration_options``
    (``CalibrationOptions``: batch size, activation memory, output-layer refit), ``refine``
    (``RefinementOptions``: seconds, steps, scope, holdout, batch size) and ``validation``
    (``ValidationOptions``: provider, inputs, input shapes, atol / rtol, seed, min_cosine / min_agreement gates,
    task_metric, map_threshold). Each field may also be passed as a keyword (``provider="cpu"``,
    ``inputs=...``, ``refine_seconds=60``, ``calibration_batch_size=32``); ``distill_steps`` /
    ``distill_scope`` / ``distill_holdout`` are deprecated names of ``refine_steps`` / ``refine_scope`` /
    ``refine_holdout``.

    ``agreement_floor=A`` (ONNX models, a replacement target, calibration data): the agreement-floor plan
    (``onnx.plan``) -- as many BNs as keep the task agreement at least ``A`` (on the calibration data; refined
    candidates on refinement's held-out slice) become the target norm, the rest frozen per-channel affine (exact); ``report.plan`` says
    which and what agreement was reached.

    Validation: exact targets within the float64 noise floor (each output's error against a float64 evaluation
    of the original at most a few times the original's own float32 error; atol / rtol given: elementwise),
    replacement targets for fidelity, agreement measured in the task's terms by each output's shape (top-1,
    whole-sequence argmax, per-pixel argmax, IoU of probability maps thresholded at map_threshold) or by
    ``task_metric(reference_outputs, candidate_outputs) -> 0..1``. Validation failure is recorded in the report,
    not raised. ``progress``: None draws a bar on stderr when it is a terminal, False draws none, a callable
    receives ``(done, total, label)``. Returns a ``ConversionResult`` (ONNX) or ``TorchConversionResult``."""
    _check_target(to, layer_over)
    refine_asked = (refine is not None and refine is not False) or any(
        k in keywords for k in REFINEMENT_KEYWORDS) or bool(keywords.get("distill_steps"))
    cal, ref, val = stage_options(calibration_options, refine, validation, keywords)
    groups, choose_groups = resolve_groups(to, groups, group_size)
    gates = [option(n, v) for n, v in (("min_cosine", val.min_cosine), ("min_agreement", val.min_agreement))
             if v is not None]
    if gates and get_target(to).exact:
        raise UsageError(f"{' and '.join(gates)} gate(s) non-exact targets; {option('to', to)} is exact and is "
                         f"checked within {option('atol')} / {option('rtol')}: remove the gate")
    if refine_asked and ref.enabled and (to not in REPLACEMENT_TARGETS or calibration is None):
        raise UsageError(f"refinement needs a replacement target (group / layer / instance) and "
                         f"{option('calibration')} data")
    if agreement_floor is not None:
        if not 0 < agreement_floor <= 1:
            raise UsageError(f"{option('agreement_floor', agreement_floor)} must lie in (0, 1]")
        if to not in REPLACEMENT_TARGETS or calibration is None:
            raise UsageError(f"{option('agreement_floor')} needs a replacement target (group / layer / instance) and "
                             f"{option('calibration')} data")
        if _is_torch_module(model):
            raise UnsupportedError(f"{option('agreement_floor')} plans ONNX models; export the module to ONNX "
                                   "(dynamo=True, optimize=False keeps its BNs) and plan that")
    replace_options = ReplaceOptions(groups=groups, group_size=group_size, layer_over=layer_over,
                                     allow_nonfinite=allow_nonfinite, groups_by_fit=choose_groups)
    if _is_torch_module(model):
        from .torch.api import convert_torch
        if opset is not None:
            raise UsageError("opset applies to ONNX models only")
        return convert_torch(model, to, options=replace_options, calibration=calibration,
                             example_inputs=example_inputs, keep_unfoldable=keep_unfoldable, validate=validate,
                             calibrating=cal, refining=ref, validating=val, progress=progress)
    if example_inputs is not None:
        raise UsageError("example_inputs apply to torch modules; ONNX models take calibration data and input_shapes")
    from .onnx.convert import convert_in_place
    from .onnx.io import graph_count
    target = get_target(to)
    replacing = to in REPLACEMENT_TARGETS
    clock = Stages()
    original, source, had_external = _load(model, copy=False)
    from .onnx.admission import admit
    in_memory = isinstance(model, onnx.ModelProto) or _graphsurgeon_graph(model)
    admission = admit(original, original if in_memory else Path(source))
    from .validate.inputs import check_input_shapes, checked_inputs
    check_input_shapes(original, val.input_shapes)  # every argument is checked before any work
    inputs = checked_inputs(val.inputs, original) if validate else val.inputs
    calib = _calibration_data(calibration, original) if calibration is not None and (
        replacing or (validate and inputs is None)) else None
    calib_validates = validate and inputs is None and calib is not None
    if calib_validates:  # the data the user gave, not random inputs
        calib, inputs = hold_aside(calib, VALIDATION_HOLDOUT if replacing else 0.0)
    val = replace(val, inputs=inputs)
    calib = calib if replacing else None
    before = graph_count(original)
    if in_memory or opset is not None:  # keep the caller's object / the original intact
        reference: onnx.ModelProto | Path = original
        converted = _upgrade_opset(original, opset) if opset is not None else original
        if converted is original:
            converted = onnx.ModelProto()
            converted.CopyFrom(original)
    else:  # loaded for this call only: edit it directly (no second copy of the weights), reference = the file
        converted, reference = original, Path(source)
    probe_data = calib if calib is not None else (inputs if isinstance(inputs, Mapping) else None)
    probe = _shape_probe(reference, probe_data, val.input_shapes, val.seed, val.provider)
    if agreement_floor is not None and calib is not None:
        clock.done("load")
        return _planned(model, reference, converted, to, replace_options, calib, agreement_floor, cal, ref, val,
                        validate, admission, source, had_external, before, probe, progress, clock)
    clock.done("load")
    conversion = convert_in_place(converted, to, keep_unfoldable, replace_options, probe)
    clock.done("convert")
    notes = ([admission] if admission else []) + conversion.notes
    if choose_groups and calibration is None:
        notes.append(auto_groups_note(groups))
    if calibration is not None and not replacing:
        used = " (it served as the validation inputs)" if calib_validates else ""
        notes.append(f"calibration data not fitted to: {option('to', to)} is exact and has nothing to fit{used}")
    kept = sum(r.action == "kept" for r in conversion.records)
    if kept:
        notes.append(f"{kept} BatchNormalization node(s) kept as they were; see each one's reason")
    report = ConversionReport(to, target.exact, source, conversion.records, before, graph_count(converted),
                              notes=notes)
    if replacing and conversion.new_norms:
        if calib is not None:
            from .onnx.calibrate import calibrate
            from .validate.providers import select_providers
            report.calibration = calibrate(reference, converted, conversion.new_norms, calib,
                                           select_providers(val.provider).providers, batch_size=cal.batch_size,
                                           refit_output_layer=cal.refit_output_layer, choose_groups=choose_groups,
                                           memory_budget=cal.memory, progress=progress)
            clock.done("calibration")
            notes.extend(report.calibration.notes)
            if ref.enabled:
                _refine(reference, converted, conversion.new_norms, calib, report, ref, val.task, progress)
                clock.done("refinement")
        else:
            report.function_preserved = False
            notes.append("function NOT preserved: without calibration data the new layers use the BN's gamma and "
                         f"beta; pass {option('calibration')} data (a few hundred unlabeled samples)")
    if not conversion.records:
        notes.append("nothing to convert: the model has no BatchNormalization (it was not validated)"
                     + exporter_folded_hint(original))
    elif validate:
        _validate_into(report, reference, converted, conversion, val, "exact" if target.exact else "fidelity",
                       progress)
        clock.done("validation")
        if not target.exact and inputs is None:
            notes.append("fidelity was measured on random inputs, which a trained network may never see; pass "
                         f"held-out samples ({option('inputs')} data) for a meaningful measure")
    if conversion.new_norms:
        report.judge_function()
    report.stage_seconds = clock.seconds
    return _result(model, converted, report, had_external)


def _validate_into(report: ConversionReport, reference, converted: onnx.ModelProto, conversion, val, check: str,
                   progress) -> None:
    """Validate ``converted`` against ``reference`` into ``report``, each new layer's drift cosine recorded."""
    main_norms = tuple(n.y for n in conversion.new_norms if n.graph == "main")
    report.validation = validate_models_checked(reference, converted, val, check=check, layer_outputs=main_norms,
                                                progress=progress)
    for n in conversion.new_norms:
        n.record.drift_cosine = report.validation.layer_cosine.get(n.y)


def _result(model, converted: onnx.ModelProto, report: ConversionReport, had_external: bool) -> ConversionResult:
    result = ConversionResult(converted, report, had_external)
    if _graphsurgeon_graph(model):  # given an onnx-graphsurgeon graph: one comes back
        result.graph = sys.modules["onnx_graphsurgeon"].import_onnx(converted)
    return result


def _planned(model, reference, original: onnx.ModelProto, to: str, options: ReplaceOptions, calib, floor: float,
             cal: CalibrationOptions, ref: RefinementOptions, val: ValidationOptions, validate: bool,
             admission: str | None, source: str, had_external: bool, before: int, probe, progress,
             clock: Stages) -> ConversionResult:
    """``convert`` with an agreement floor (``onnx.plan``): plan, then validate the chosen conversion."""
    from .onnx.io import graph_count
    from .onnx.plan import plan_conversion
    from .validate.providers import select_providers
    notes: list[str] = [admission] if admission else []
    refiner = None
    if ref.enabled and importlib.util.find_spec("torch") is None:
        notes.append(TORCH_MISSING)
    elif ref.enabled:
        def refiner(model, conversion, calibration_report):
            holder = ConversionReport(to, False, source, conversion.records, 0, 0, notes=[])
            holder.calibration = calibration_report
            _refine(reference, model, conversion.new_norms, calib, holder, ref, val.task, progress)
            notes.extend(n for n in holder.notes if n.startswith("refinement skipped") and n not in notes)
            return calibration_report.refinement
    chosen, plan = plan_conversion(reference, original, to, options, calib, floor, cal, val,
                                   select_providers(val.provider).providers, probe, refiner, progress,
                                   ref.held_out(len(next(iter(calib.values())))))
    clock.done("plan (conversions, calibration, refinement)")
    converted, conversion = chosen.model, chosen.conversion
    notes += conversion.notes
    report = ConversionReport(to, False, source, conversion.records, before, graph_count(converted), notes=notes)
    report.calibration, report.plan = chosen.calibration, plan
    if chosen.calibration is not None:
        notes.extend(chosen.calibration.notes)
        if chosen.refinement is not None:
            notes.append(chosen.refinement.summary())
    notes.append(plan.summary())
    if plan.refinement_skipped:
        notes.append(plan.refinement_skipped)
    if validate:
        _validate_into(report, reference, converted, conversion, val, "fidelity", progress)
        clock.done("validation")
    report.judge_function()
    report.stage_seconds = clock.seconds
    return _result(model, converted, report, had_external)


TORCH_MISSING = ("refinement skipped: it runs in torch, which is not installed (pip install normswap[torch]); "
                 "the calibrated model is kept")


def _refine(reference, converted: onnx.ModelProto, new_norms, calib, report: ConversionReport,
            options: RefinementOptions, task: TaskMeasure, progress) -> None:
    """Refinement of a calibrated ONNX conversion (``onnx.refine``). Without torch, or on a graph the torch
    executor cannot run, the calibrated model is kept, with a note saying why."""
    if importlib.util.find_spec("torch") is None:
        report.notes.append(TORCH_MISSING)
        return
    from .onnx.refine import refine_onnx
    norms = [t for n in new_norms for t in (n.scale, n.shift)]
    try:
        result = refine_onnx(reference, converted, norms, calib, options, task, progress)
    except UnsupportedError as e:
        report.notes.append(f"refinement skipped, the calibrated model kept: {e}")
        return
    report.calibration.refinement = result
    report.notes.append(result.summary())
    if result.kept:
        from .onnx.refine import trainable_initializers
        changed = set(trainable_initializers(converted, options.scope, norms))
        owners = {n.name for n in converted.graph.node if changed & set(n.input)}
        report.calibration.layers_changed = sorted(set(report.calibration.layers_changed) | owners)


def _calibration_data(calibration: Inputs, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from .validate.inputs import check_feeds, load_npz_inputs
    if isinstance(calibration, Mapping):
        return check_feeds(calibration, model, "the calibration mapping")
    return load_npz_inputs(calibration, model)


def validate_models_checked(reference: onnx.ModelProto | Path, candidate: onnx.ModelProto,
                            options: ValidationOptions, *, check: str = "exact", layer_outputs: tuple[str, ...] = (),
                            progress: Progress | None = None, reference_runs: dict | None = None
                            ) -> ValidationReport:
    from .validate.runner import validate_models
    o = options.check()
    return validate_models(reference, candidate, provider=o.provider, inputs=o.inputs, input_shapes=o.input_shapes,
                           atol=o.atol, rtol=o.rtol, seed=o.seed, check=check, min_cosine=o.min_cosine,
                           min_agreement=o.min_agreement, layer_outputs=layer_outputs, progress=progress,
                           task=o.task, reference_runs=reference_runs)


def validate(reference: ModelLike, candidate: ModelLike, *, provider: str = "auto", inputs: Inputs = None,
             input_shapes: Mapping[str, tuple[int, ...]] | None = None, atol: float | None = None,
             rtol: float | None = None, seed: int = 0, check: str = "exact", min_cosine: float | None = None,
             min_agreement: float | None = None, task_metric: TaskMetric | None = None,
             map_threshold: float = DEFAULT_THRESHOLD) -> ValidationReport:
    """Run two ONNX models on the same inputs in ONNX Runtime and compare every output: ``check="exact"``
    (against the float64 evaluation of the reference: the candidate's error at most a few times the reference's
    own float32 error; ``atol`` / ``rtol`` given: elementwise) or ``"fidelity"`` (cosine, top-1 agreement, gated
    by ``min_cosine`` / ``min_agreement``, agreement measured in the task's terms or by ``task_metric``; see
    ``convert``)."""
    if check not in ("exact", "fidelity"):
        raise UsageError("check must be 'exact' or 'fidelity'")
    options = ValidationOptions(provider, inputs, input_shapes, atol, rtol, seed, min_cosine, min_agreement,
                                task_metric, map_threshold).check()
    ref, _, _ = _load(reference, copy=False)
    cand, _, _ = _load(candidate, copy=False)
    return validate_models_checked(ref, cand, options, check=check)


def batch_sensitivity(model, data, *, batch_sizes=DEFAULT_BATCH_SIZES, batches: int = DEFAULT_BATCHES,
                      seed: int = 0, provider: str = "auto", progress: Progress | bool | None = None
                      ) -> SensitivityReport:
    """For every BatchNorm of ``model`` (ONNX path / ModelProto, or a torch module): how far its output, and the
    model's, move when the statistics of a batch of each size in ``batch_sizes`` replace its running statistics
    -- what training at that batch size does to it -- averaged over ``batches`` batches drawn from ``data``
    (ONNX: .npz path or mapping of input name to array; torch: a tensor or tuple of tensors). Layers are ranked
    by it and those that make small-batch training unreliable are named (``SensitivityReport.unreliable``)."""
    from .batch_sensitivity import check_batches, parse_batch_sizes
    sizes = parse_batch_sizes(batch_sizes)
    check_batches(batches)
    progress = None if progress is False or progress is None else progress
    if _is_torch_module(model):
        from .torch.sensitivity import batch_sensitivity_torch
        return batch_sensitivity_torch(model, data, sizes, batches, seed, progress)
    from .onnx.sensitivity import batch_sensitivity_onnx
    from .validate.providers import select_providers
    original, source, _ = _load(model, copy=False)
    feeds = _calibration_data(data, original)
    return batch_sensitivity_onnx(original, source, feeds, sizes, batches, seed, select_providers(provider).providers,
                                  progress)


def inspect(model, *, batch_sensitivity_data=None, batch_sizes=DEFAULT_BATCH_SIZES,
            batches: int = DEFAULT_BATCHES, seed: int = 0, provider: str = "auto") -> InspectReport:
    """ONNX: every normalization site and what ``--to fold`` would do with it (computed by the real conversion on
    a scratch copy, so inspect and convert always agree). torch module: every layer that couples the samples of
    a batch in training -- all BatchNorm forms, including affine=False and frozen ones. With
    ``batch_sensitivity_data``: also each BN's batch-size sensitivity (``batch_sensitivity``), in
    ``report.batch_sensitivity``."""
    if batch_sensitivity_data is not None:
        sensitivity = batch_sensitivity(model, batch_sensitivity_data, batch_sizes=batch_sizes, batches=batches,
                                        seed=seed, provider=provider)
        report = inspect(model)
        report.batch_sensitivity = sensitivity
        return report
    if _is_torch_module(model):
        from .torch.api import inspect_torch
        return InspectReport(type(model).__name__, 0, 0, inspect_torch(model))
    from .onnx.convert import convert_in_place, other_norm_sites
    from .onnx.io import opset_of
    scratch, source, _ = _load(model, copy=True)
    opset, ir_version = opset_of(scratch), scratch.ir_version
    from .onnx.admission import assess
    in_memory = isinstance(model, onnx.ModelProto) or _graphsurgeon_graph(model)
    problem, _ = assess(scratch, scratch if in_memory else Path(source))
    records = convert_in_place(scratch, "fold").records
    sites = [{"name": r.name, "op": r.op, "graph": r.graph, "channels": r.channels, "producer": r.producer,
              "producer_op": r.producer_op, "foldable": r.action == "folded", "action_under_fold": r.action,
              "reason": r.reason} for r in records]
    return InspectReport(source, opset, ir_version, sites + other_norm_sites(scratch), problem)


def restore(module, path: str | os.PathLike):
    """Rebuild a converted PyTorch module from the ``.safetensors`` file ``convert`` wrote: the recipe in the
    file's metadata is applied to ``module`` -- a fresh instance of the original architecture, edited in place,
    no calibration -- and the weights are loaded strictly. Returns ``module``."""
    if not _is_torch_module(module):
        raise UsageError("restore takes a torch.nn.Module: a fresh instance of the architecture that was converted")
    from .torch.recipe import restore as restore_module
    return restore_module(module, path)
