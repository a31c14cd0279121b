"""``normswap.compare``: convert one model to several targets and put them side by side.

Work is shared between targets: the model and the data are read once, every replacement target is calibrated on
one run of the original (``onnx.calibrate.calibrate_many``) and every target is validated on one run of the
original per batch (``validate.runner.validate_many``). Latency is measured in onnxruntime with graph
optimizations on, all models in the same process, interleaved round by round, the fastest round of each kept.

The recommendation depends on what the model is for (``purpose``):
- ``"deploy"``: the exact target that passed validation with the lowest latency (fold when it covers every BN);
- ``"finetune"``: the target that normalizes each sample by itself (group, layer, instance: independent of the
  batch size) with the best top-1 agreement (cosine on ties, then latency). Weight norm is exact but does not
  normalize activations; fold and affine leave no normalization to train with.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping

import numpy as np
import onnx

from .errors import UsageError, option
from .report import CompareReport, CompareRow, ConversionReport
from .targets import REPLACEMENT_TARGETS, TARGET_NAMES, ReplaceOptions, get_target, resolve_groups
from .validate.agreement import DEFAULT_THRESHOLD

DEFAULT_TARGETS = TARGET_NAMES
PURPOSES = ("finetune", "deploy")
NORMALIZING = ("group", "layer", "instance")  # replacements that normalize each sample: batch-size independent
LATENCY_BATCH = 32  # samples per timed run (a fixed-batch model runs its own batch)
LATENCY_ROUNDS = 7  # timed rounds per model, after one warm-up; the fastest is reported


def parse_targets(targets) -> tuple[str, ...]:
    """``"fold,group"`` or a sequence of names -> checked, de-duplicated names in the order given."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    unknown = [t for t in names if t not in TARGET_NAMES]
    if unknown or not names:
        raise UsageError(f"{option('targets', ','.join(names))} must name targets among {', '.join(TARGET_NAMES)}")
    return tuple(dict.fromkeys(names))


def check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise UsageError(f"{option('purpose', purpose)} must be one of {', '.join(PURPOSES)}")


def group_summary(report: ConversionReport, prefix: str = "") -> str:
    """'32 x18, 16 x2' for the converted layers' group counts, most frequent first ('' for none)."""
    from collections import Counter
    counts = Counter(layer.groups for layer in report.layers if layer.action == "converted" and layer.groups)
    return ", ".join(f"{prefix}{g} x{n}" for g, n in sorted(counts.items(), key=lambda kv: (-kv[1], -kv[0])))


def batch_independent(report: ConversionReport) -> bool:
    """No BatchNormalization left: nothing in the model couples the samples of a batch in training."""
    return report.count("kept") == 0


def _nothing_converted(rows: list[CompareRow]) -> str:
    """Why no row is usable: the BatchNorms every target left in place, with the first one's reason."""
    kept = next((layer for r in rows if r.report is not None for layer in r.report.layers
                 if layer.action == "kept"), None)
    if kept is None:
        return "no target passed validation"
    return (f"every target left BatchNorm layers in place (e.g. '{kept.name}': {kept.reason}); "
            "'normswap inspect MODEL' lists them all")


def recommend(rows: list[CompareRow], purpose: str) -> tuple[str | None, str]:
    """(target, one-line reason) from the measured rows. A row that failed validation or left a BatchNorm in
    place is never recommended."""
    usable = [r for r in rows if r.passed is not False and r.problem is None and r.batch_independent]
    if purpose == "deploy":
        exact = [r for r in usable if r.exact]
        if exact:
            best = min(exact, key=lambda r: (r.latency_ms if r.latency_ms is not None else float("inf")))
            speed = (f"the fastest exact conversion ({best.latency_ms:.3g} ms per batch)"
                     if best.latency_ms is not None else "an exact conversion (latency not measured)")
            return best.target, f"exact and {speed}; the network computes what it did"
        pool, why = usable, "no exact target converted every BN; the best agreement"
    else:
        pool = [r for r in usable if r.target.split("+")[0] in NORMALIZING]  # "group+plan" too
        why = "normalizes each sample by itself (independent of the batch size) and keeps the most of the original"
    if not pool:
        if not usable:
            return None, _nothing_converted(rows)
        return None, "no batch-independent normalization among the targets compared"
    best = max(pool, key=lambda r: (r.agreement if r.agreement is not None else -1.0,
                                    r.cosine if r.cosine is not None else -1.0,
                                    -(r.latency_ms or 0.0)))
    agreement = (f"agreement {best.agreement:.1%} ({best.agreement_measure})" if best.agreement is not None
                 else f"cosine {best.cosine:.4f}")
    calibrated = "" if best.calibrated or best.exact else " (uncalibrated: pass calibration data)"
    return best.target, f"{why}: {agreement}{calibrated}"


def compare(model, targets=DEFAULT_TARGETS, *, groups: int | str | None = None, calibration=None,
            inputs=None, input_shapes: Mapping[str, tuple[int, ...]] | None = None, provider: str = "auto",
            seed: int = 0, purpose: str = "finetune", example_inputs=None, latency: bool = True,
            task_metric=None, map_threshold: float = DEFAULT_THRESHOLD, agreement_floor: float | None = None,
            progress=None) -> CompareReport:
    """Convert ``model`` (ONNX path / ModelProto, or a torch module) to every target in ``targets`` and measure
    each: exact or not, agreement in the task's terms (by output shape, or ``task_metric``; see ``convert``) and
    cosine against the original on ``inputs`` (held-out samples;
    random data when none), group counts, batch independence, parameters, nodes, latency per batch and
    calibration seconds (``calibration`` given: replacement targets are calibrated). Returns a
    ``CompareReport`` with one row per target and a recommendation for ``purpose`` (``"finetune"`` or
    ``"deploy"``; see the module doc). ``agreement_floor=A`` (ONNX, with calibration data) adds a row for the
    agreement-floor plan of each replacement target compared (``TARGET+plan``: as many BNs as keep agreement A
    normalize, the rest frozen affine; see ``onnx.plan``)."""
    names = parse_targets(targets)
    check_purpose(purpose)
    from .api import _is_torch_module, task_measure
    task = task_measure(task_metric, map_threshold)
    if agreement_floor is not None and (_is_torch_module(model) or calibration is None or
                                        not set(names) & set(REPLACEMENT_TARGETS)):
        raise UsageError(f"{option('agreement_floor')} in compare plans ONNX models with a replacement target "
                         f"among the targets and {option('calibration')} data")
    if _is_torch_module(model):
        from .torch.compare import compare_torch
        rows, source, notes, batch = compare_torch(model, names, groups=groups, calibration=calibration,
                                                   inputs=inputs, example_inputs=example_inputs, latency=latency,
                                                   task=task)
        timed_by = "torch (eager)" if latency else ""
    else:
        if example_inputs is not None:
            raise UsageError(f"{option('example_inputs')} applies to torch modules; ONNX models take "
                             f"{option('input_shapes')}")
        rows, source, notes, batch = _compare_onnx(model, names, groups, calibration, inputs, input_shapes,
                                                   provider, seed, latency, task, progress)
        if agreement_floor is not None:
            rows += _plan_rows(model, names, groups, calibration, inputs, input_shapes, provider, seed, latency,
                               task, agreement_floor, progress)
        timed_by = "onnxruntime (all graph optimizations)" if latency else ""
    target, reason = recommend(rows, purpose)
    return CompareReport(source, purpose, rows, target, reason, notes, batch, timed_by)


def _compare_onnx(model, names, groups, calibration, inputs, input_shapes, provider, seed, latency, task,
                  progress) -> tuple[list[CompareRow], str, list[str], int]:
    from .api import _calibration_data, _graphsurgeon_graph, _load, _shape_probe
    from .onnx.admission import admit
    from .onnx.calibrate import CalibrationJob, calibrate_many
    from .onnx.convert import convert_in_place
    from .onnx.io import graph_count
    from .validate.inputs import check_input_shapes, checked_inputs
    from .validate.providers import select_providers
    from .validate.runner import Candidate, validate_many
    original, source, _ = _load(model, copy=False)
    notes = []
    in_memory = isinstance(model, onnx.ModelProto) or _graphsurgeon_graph(model)
    problem = admit(original, original if in_memory else source)
    if problem:
        notes.append(problem)
    check_input_shapes(original, input_shapes)
    held = checked_inputs(inputs, original)
    calib = _calibration_data(calibration, original) if calibration is not None else None
    probe = _shape_probe(original, calib if calib is not None else (held if isinstance(held, Mapping) else None),
                         input_shapes, seed, provider)
    converted, reports, jobs = {}, {}, {}
    for name in names:
        g, by_fit = resolve_groups(name, groups if name == "group" else None, None)
        options = ReplaceOptions(groups=g, groups_by_fit=by_fit)
        copy = onnx.ModelProto()
        copy.CopyFrom(original)
        conversion = convert_in_place(copy, name, False, options, probe)
        target = get_target(name)
        report = ConversionReport(name, target.exact, source, conversion.records, graph_count(original),
                                  graph_count(copy), notes=list(conversion.notes))
        converted[name], reports[name] = copy, report
        if name in REPLACEMENT_TARGETS and conversion.new_norms:
            jobs[name] = (conversion.new_norms, by_fit)
    if not any(reports[n].layers for n in names):
        from .api import exporter_folded_hint
        raise UsageError(f"nothing to compare: {source} has no BatchNormalization{exporter_folded_hint(original)}")
    providers = select_providers(provider).providers
    if calib is not None and jobs:
        done = calibrate_many(original, [CalibrationJob(converted[n], norms, True, by_fit)
                                         for n, (norms, by_fit) in jobs.items()], calib, providers,
                              progress=progress)
        for n, c in zip(jobs, done):
            reports[n].calibration = c
    elif jobs:
        notes.append("replacement targets were not calibrated: their agreement is what gamma/beta copied over "
                     f"keeps; pass {option('calibration')} data to measure what calibration recovers")
    candidates = [Candidate(converted[n], "exact" if reports[n].exact else "fidelity",
                            tuple(m.y for m in jobs[n][0] if m.graph == "main") if n in jobs else ())
                  for n in names]
    validations = validate_many(original, candidates, provider=provider, inputs=held, input_shapes=input_shapes,
                                seed=seed, progress=progress, task=task)
    for n, v in zip(names, validations):
        reports[n].validation = v
        for norm in jobs.get(n, ((), False))[0]:
            norm.record.drift_cosine = v.layer_cosine.get(norm.y)
        if calib is not None or n not in jobs:
            reports[n].judge_function()
    if held is None:
        notes.append("measured on random inputs, which a trained network may never see; pass held-out samples "
                     f"({option('inputs')} data) for a meaningful agreement")
    times = (onnx_latencies(original, [converted[n] for n in names], held, input_shapes, seed, providers)
             if latency else None)
    rows = [_row(n, reports[n], converted[n], times[1][k] if times else None, times[0] if times else None)
            for k, n in enumerate(names)]
    return rows, source, notes, times[2] if times else 0


def _plan_rows(model, names, groups, calibration, inputs, input_shapes, provider, seed, latency, task, floor,
               progress) -> list[CompareRow]:
    """One row per replacement target: its agreement-floor plan, calibrated (not refined, like the other rows)."""
    from .api import _load, convert
    from .validate.providers import select_providers
    from .validate.inputs import checked_inputs
    rows = []
    original = _load(model, copy=False)[0]
    held = checked_inputs(inputs, original)
    for name in names:
        if name not in REPLACEMENT_TARGETS:
            continue
        result = convert(model, name, groups=groups if name == "group" else None, calibration=calibration,
                         inputs=held, input_shapes=input_shapes, provider=provider, seed=seed,
                         task_metric=task.metric, map_threshold=task.threshold, agreement_floor=floor, refine=False,
                         progress=progress)
        times = (onnx_latencies(original, [result.model], held, input_shapes, seed,
                                select_providers(provider).providers) if latency else None)
        row = _row(f"{name}+plan", result.report, result.model, times[1][0] if times else None,
                   times[0] if times else None)
        rows.append(row)
    return rows


def _row(name: str, report: ConversionReport, model: onnx.ModelProto, latency_ms: float | None,
         original_ms: float | None) -> CompareRow:
    v = report.validation
    out = v.outputs[0] if v is not None and v.outputs else None
    c = report.calibration
    return CompareRow(
        target=name, exact=report.exact, top1_agreement=out.top1_agreement if out is not None else None,
        cosine=out.cosine if out is not None else None, groups=group_summary(report) or None,
        batch_independent=batch_independent(report), parameters=onnx_parameters(model), nodes=report.nodes_after,
        latency_ms=latency_ms, original_latency_ms=original_ms, calibration_seconds=c.seconds if c else None,
        calibrated=c is not None, passed=v.passed if v is not None else None,
        kept=report.count("kept"), converted=report.count("converted") + report.count("folded") +
        report.count("affine"), problem=out.problem if out is not None else None,
        layer_cosine=dict(v.layer_cosine) if v is not None else {}, report=report,
        agreement=v.agreement if v is not None else None,
        agreement_measure=v.agreement_measure if v is not None else None)


def onnx_parameters(model: onnx.ModelProto) -> int:
    """Stored floating-point weights: elements of the float initializers and Constant node values, subgraphs
    included (weights a model computes at run time, as Caffe2's ConstantFill, are not stored and not counted)."""
    from .onnx.io import iter_graphs
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    tensors = [t for _, g in iter_graphs(model.graph) for t in g.initializer]
    tensors += [a.t for _, g in iter_graphs(model.graph) for n in g.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    return sum(int(np.prod(t.dims, dtype=np.int64)) for t in tensors if t.data_type in floats)


def onnx_latencies(original: onnx.ModelProto, models: list[onnx.ModelProto], inputs, input_shapes, seed: int,
                   providers: tuple[str, ...]) -> tuple[float | None, list[float | None], int]:
    """Milliseconds per batch (``LATENCY_BATCH`` samples, or the model's own batch; returned third) of the
    original and each model: onnxruntime with all
    graph optimizations, one warm-up, then ``LATENCY_ROUNDS`` rounds in which every model runs once (so machine
    noise hits them alike); the fastest round of each."""
    from .onnx.batching import fixed_layout, iter_layout
    from .validate.runner import make_feeds, make_session
    feeds, _ = make_feeds(original, inputs, input_shapes, seed)
    batch = next(iter(iter_layout(feeds, fixed_layout(original, feeds, LATENCY_BATCH))))[0]
    rows = max((len(v) for v in batch.values() if np.ndim(v)), default=1)
    with tempfile.TemporaryDirectory(prefix="normswap-latency-") as workdir:
        sessions = []
        for k, m in enumerate([original, *models]):
            try:
                s = make_session(m, providers, workdir, f"latency-{k}", optimize=True, lean=False)
            except Exception:  # timed only where it runs; validation said why it does not
                s = None
            sessions.append(s)
        feed = [None if s is None else {i.name: batch[i.name] for i in s.get_inputs() if i.name in batch}
                for s in sessions]
        best = [float("inf")] * len(sessions)
        for round_ in range(LATENCY_ROUNDS + 1):
            for k, s in enumerate(sessions):
                if s is None:
                    continue
                t0 = time.perf_counter()
                s.run(None, feed[k])
                if round_:  # round 0 warms up
                    best[k] = min(best[k], (time.perf_counter() - t0) * 1000)
    out = [None if s is None else b for s, b in zip(sessions, best)]
    return out[0], out[1:], rows
