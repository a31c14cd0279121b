"""Running the reference and the candidate in ONNX Runtime and comparing every output.

The reference runs with graph optimizations disabled (``ORT_DISABLE_ALL``): onnxruntime's basic level already
fuses Conv+BatchNorm, which would hide a wrong fold. The candidate runs the same way, so the check compares the
two graphs' math, not onnxruntime's rewrites of them. On CUDA both run with TF32 off
(``providers.session_providers``), and the float64 yardstick always runs on the CPU.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import InvalidModelError, UnsupportedError, option
from ..report import ValidationReport
from .agreement import TaskMeasure, task_agreement
from .compare import DEFAULT_ATOL, DEFAULT_RTOL, OutputStats
from .float64 import (FLOAT64_BUDGET_MULTIPLE, FLOAT64_BUDGET_SECONDS, FLOAT64_SAMPLES, Float64Reference, Unavailable,
                      onnx_reference, yardstick_disproof, yardstick_limit)
from .inputs import CheckedFeeds, check_feeds, load_npz_inputs, random_inputs
from .providers import CUDA, ORT_SILENT, check_ran, select_providers, session_providers

OPTIMIZATION = "ORT_DISABLE_ALL"
VALIDATION_BATCH = 256  # samples per run: bounds memory on large --inputs files


def make_session(model: onnx.ModelProto | str | os.PathLike, providers: tuple[str, ...], workdir: str, label: str,
                 optimize: bool = False, lean: bool | None = None, shared_arena: bool = False):
    """An onnxruntime session; graph optimizations disabled unless ``optimize`` (calibration, where speed matters
    and onnxruntime's fusions change nothing that is compared; latency). ``lean`` (default: ``optimize``): no
    spinning threads, for the many short runs of calibration with Python work between them; off for timing.
    The CPU memory arena stays on: without it every large intermediate is a fresh mmap and its page faults (the
    PP-OCRv4 detector's main segment at 736x736 ran 7.0 s instead of 3.7 s). Values kept after a session ends
    must then be copied out of its arena (``onnx.calibrate`` does), or they pin it. ``shared_arena``: the CPU
    arena is the process-wide one of ``onnx.shared_arena`` (calibration's many short-lived segment sessions)."""
    import onnxruntime as ort
    from ..onnx.io import has_bound_data, needs_external_data, save_model
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = ORT_SILENT
    if optimize if lean is None else lean:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads must not spin
    if shared_arena:
        from ..onnx import shared_arena as arena
        arena.use(options)
    if isinstance(model, (str, os.PathLike)):  # a file normswap loaded and checked: onnxruntime reads it again
        source = str(model)
    elif has_bound_data(model) or needs_external_data(model):
        path = os.path.join(workdir, f"{label}.onnx")
        save_model(model, path, external_data=True)
        source = path
    else:
        source = model.SerializeToString()
    try:
        return ort.InferenceSession(source, options, providers=session_providers(providers))
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedError(f"onnxruntime cannot load the {label} model: {message}") from None


def make_feeds(model: onnx.ModelProto, inputs: str | os.PathLike | Mapping[str, np.ndarray] | None,
               input_shapes: Mapping[str, tuple[int, ...]] | None, seed: int) -> tuple[dict, str]:
    """Feeds and a description of where they came from."""
    if inputs is None:
        return random_inputs(model, input_shapes, seed), f"random (seed {seed})"
    if isinstance(inputs, CheckedFeeds):
        return dict(inputs), inputs.source
    if isinstance(inputs, Mapping):
        return check_feeds(inputs, model, "the inputs mapping"), "given arrays"
    return load_npz_inputs(inputs, model), str(inputs)


@dataclass
class Candidate:
    """One model to compare with the reference, and how (``validate_many``)."""

    model: onnx.ModelProto
    check: str = "exact"
    layer_outputs: tuple[str, ...] = ()
    min_cosine: float | None = None
    min_agreement: float | None = None


def validate_models(reference: onnx.ModelProto | str | os.PathLike, candidate: onnx.ModelProto, *,
                    provider: str = "auto", inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
                    input_shapes: Mapping[str, tuple[int, ...]] | None = None, atol: float | None = None,
                    rtol: float | None = None, seed: int = 0, check: str = "exact",
                    min_cosine: float | None = None, min_agreement: float | None = None,
                    layer_outputs: tuple[str, ...] = (), batch_size: int = VALIDATION_BATCH,
                    progress=None, float64_reference: tuple[Float64Reference, str] | None = None,
                    task: TaskMeasure = TaskMeasure(), reference_runs: dict | None = None) -> ValidationReport:
    """Run both models on the same inputs (in batches) and compare every output of the reference by name.

    ``check="exact"`` judges each output against the float64 evaluation of the original (``float64_reference``,
    or computed from the reference model; see ``float64``) -- the noise-floor rule -- unless ``atol`` / ``rtol``
    are given, which apply elementwise (also the fallback, said in ``rule_note``, when no float64 evaluation can
    run). ``check="fidelity"`` measures and applies only the optional gates. ``task``: the probability-map threshold
    of the agreement measures, and the user's own task metric, which then decides ``min_agreement``.
    ``layer_outputs`` are intermediate values present in both models (a replaced BN keeps its output name):
    their cosine similarity is reported as per-layer drift. ``reference`` may be the path of the unmodified
    original (then the inputs are read off the candidate, which has the same ones). ``reference_runs``: see
    ``validate_many``.
    """
    return validate_many(reference, [Candidate(candidate, check, layer_outputs, min_cosine, min_agreement)],
                         provider=provider, inputs=inputs, input_shapes=input_shapes, atol=atol, rtol=rtol,
                         seed=seed, batch_size=batch_size, progress=progress,
                         float64_reference=float64_reference, task=task, reference_runs=reference_runs)[0]


def validate_many(reference: onnx.ModelProto | str | os.PathLike, candidates: list[Candidate], *,
                  provider: str = "auto", inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
                  input_shapes: Mapping[str, tuple[int, ...]] | None = None, atol: float | None = None,
                  rtol: float | None = None, seed: int = 0, batch_size: int = VALIDATION_BATCH, progress=None,
                  float64_reference: tuple[Float64Reference, str] | None = None,
                  task: TaskMeasure = TaskMeasure(), reference_runs: dict | None = None) -> list[ValidationReport]:
    """``validate_models`` for several candidates of one reference: the reference runs once per batch (and is
    evaluated in float64 once) for all of them; one report per candidate, in order. ``reference_runs``: a dict
    the caller keeps for one reference and one set of inputs across calls (the agreement-floor plan judges many
    candidates on the same samples): the first call stores the reference's outputs of each batch in it, later
    calls read them instead of running the reference again."""
    from ..onnx.activations import Activations, upload
    from ..onnx.batching import fixed_layout, iter_layout, layout_count
    choice = select_providers(provider)
    first = candidates[0].model
    feeds, source = make_feeds(reference if isinstance(reference, onnx.ModelProto) else first, inputs,
                               input_shapes, seed)
    noise_rule = any(c.check == "exact" for c in candidates) and atol is None and rtol is None
    atol = DEFAULT_ATOL if atol is None else atol
    rtol = DEFAULT_RTOL if rtol is None else rtol
    f64, f64_what, rule_note, limit = None, None, None, 0.0
    if noise_rule:
        try:
            reference_proto = _proto(reference)
            limit = yardstick_limit(reference_proto)
            f64, f64_what = float64_reference or onnx_reference(reference_proto)
        except Unavailable as e:
            rule_note = f"the original could not be evaluated in float64 ({e}): judged elementwise within atol/rtol"
    layer_outputs = list(dict.fromkeys(n for c in candidates for n in c.layer_outputs))
    described: dict[int, str] = {}
    with tempfile.TemporaryDirectory(prefix="normswap-") as workdir:
        ref = Activations(reference, layer_outputs, choice.providers, workdir, "reference")
        cands = [Activations(c.model, list(c.layer_outputs), choice.providers, workdir,
                             "candidate" if len(candidates) == 1 else f"candidate {k + 1}")
                 for k, c in enumerate(candidates)]
        ran = list(dict.fromkeys(ref.providers + [p for c in cands for p in c.providers]))
        check_ran(choice, ran)
        out_names = ref.outputs
        for cand in cands:
            missing = [n for n in out_names if n not in set(cand.outputs)]
            if missing:
                raise InvalidModelError(f"the candidate has no output(s) {missing} that the reference has; "
                                        "compare models with the same outputs")
        stats = [{n: OutputStats(n, atol, rtol, track_spread=n in out_names, threshold=task.threshold)
                  for n in dict.fromkeys(out_names + list(c.layer_outputs))} for c in candidates]
        for st in stats:
            for one in st.values():
                one.float32_level = limit
        layout = fixed_layout(first, feeds, batch_size)  # a fixed-batch model is fed its own batch, padded
        runs = layout_count(feeds, layout)
        started = time.perf_counter()
        kept: list[dict[str, list[np.ndarray]]] = [{n: [] for n in out_names} for _ in range(len(candidates) + 1)]
        wanted = list(dict.fromkeys(out_names + layer_outputs))
        for k, (batch, valid) in enumerate(iter_layout(feeds, layout), start=1):
            on_device = upload(batch, ref.device)  # one upload per batch serves every model
            r = reference_runs.get(k) if reference_runs is not None else None
            if r is None or any(n not in r for n in wanted):
                r = ref.run(on_device, wanted)
                if reference_runs is not None:
                    reference_runs[k] = {n: np.asarray(v) for n, v in r.items()}
            outs = [cand.run(on_device, list(st)) for cand, st in zip(cands, stats)]
            if progress:
                progress(k, runs, "validating")
            for st, c in zip(stats, outs):
                for name, one in st.items():
                    one.add(*(_valid_rows(v[name], valid, layout.rows) for v in (r, c)))
            if task.metric is not None:  # the user's metric sees every output of every sample
                for store, values in zip(kept, [r, *outs]):
                    for name in out_names:
                        store[name].append(np.asarray(_valid_rows(values[name], valid, layout.rows)))
            if f64 is not None and k == 1:
                budget = FLOAT64_BUDGET_MULTIPLE * (time.perf_counter() - started) * runs + FLOAT64_BUDGET_SECONDS
                try:
                    reference64, taken = _evaluate64(f64, batch, valid, layout, budget)
                    disproof = yardstick_disproof(reference64, r, out_names, taken, limit)
                    if disproof:
                        raise Unavailable(disproof)
                    for j, (st, c) in enumerate(zip(stats, outs)):
                        if candidates[j].check == "exact":
                            described[j] = _add_float64(reference64, f64_what, taken, r, c, out_names, st)
                except Unavailable as e:
                    f64, rule_note = None, (f"the original's float64 evaluation ({f64_what}) is not used: {e}; "
                                            "judged elementwise within atol/rtol")
    reports = []
    for j, (c, st) in enumerate(zip(candidates, stats)):
        per_output_gate = c.min_agreement if task.metric is None else None  # the metric decides instead
        comparisons = [st[n].result(c.check, c.min_cosine, per_output_gate) for n in out_names]
        if c.check == "fidelity" and per_output_gate is not None and all(o.agreement is None for o in comparisons):
            for o in comparisons:
                o.passed, o.problem = False, o.problem or (
                    f"{option('min_agreement')} was given but no agreement measure applies to this output "
                    f"(shape {o.shape}); gate on {option('min_cosine')}, or pass a task metric (Python API)")
        agreement = (task_agreement(task.metric, [_joined(kept[0][n]) for n in out_names],
                                    [_joined(kept[j + 1][n]) for n in out_names])
                     if task.metric is not None else None)
        drift = {n: st[n].cosine for n in c.layer_outputs}
        judged = f64 is not None and j in described and any(st[n].f64_samples for n in out_names)
        reports.append(ValidationReport(
            c.check, ran, provider, OPTIMIZATION, atol, rtol, source, comparisons, min_cosine=c.min_cosine,
            min_agreement=c.min_agreement, layer_cosine=drift, rule="noise floor" if judged else "atol/rtol",
            float64_reference=described.get(j) if judged else None,
            rule_note=rule_note if c.check == "exact" else None, task_metric=task.metric_name,
            task_agreement=agreement, tf32=False if CUDA in ran else None))
    return reports


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _proto(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    from ..onnx.io import load_model
    return load_model(model, lazy_external=True).model


def _take(valid: int | None, layout) -> int | None:
    """Samples judged in float64: the first few (all of a fixed-batch run, which cannot be cut)."""
    n = valid if valid is not None else (layout.rows or None)
    return n if layout.pad or n is None else min(n, FLOAT64_SAMPLES)


def _evaluate64(f64: Float64Reference, batch: Mapping[str, np.ndarray], valid: int | None, layout,
                budget: float) -> tuple[dict[str, np.ndarray], int | None]:
    """The float64 outputs of the first samples of ``batch``, one sample at a time while ``budget`` seconds last
    (at least one sample, or ``Unavailable``); a fixed-batch model, or outputs without a batch axis, run the
    samples together. Returns (outputs, samples evaluated; None: the whole batch)."""
    take = _take(valid, layout)
    if layout.pad or take is None:
        return f64(batch, seconds=budget), take
    deadline = time.perf_counter() + budget
    rows = (lambda a, b: {k: v[a:b] if np.ndim(v) else v for k, v in batch.items()})
    parts = [f64(rows(0, 1), seconds=budget)]
    if any(np.ndim(v) == 0 or len(v) != 1 for v in parts[0].values()):  # not batch-major: all samples at once
        return f64(rows(0, take), seconds=max(deadline - time.perf_counter(), 0.0)), take
    for i in range(1, take):
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        try:
            parts.append(f64(rows(i, i + 1), seconds=left))
        except Unavailable:
            break  # out of time: the samples already evaluated judge
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, len(parts)


def _add_float64(out: Mapping[str, np.ndarray], what: str, take: int | None, ref: Mapping[str, np.ndarray],
                 cand: Mapping[str, np.ndarray], names: list[str], stats: Mapping[str, OutputStats]) -> str:
    """Give each output's stats the original's and the candidate's distance to the float64 evaluation ``out`` of
    the first ``take`` samples; returns the description with the sample count."""
    for name in names:
        if name in out:
            rows = (lambda v: v[:take] if take is not None and np.ndim(v) else v)
            stats[name].add_float64(rows(np.asarray(ref[name])), rows(np.asarray(cand[name])), rows(out[name]))
    samples = max((stats[nm].f64_samples for nm in names), default=0)
    return f"{what}, {samples} sample(s)"


def _valid_rows(value: np.ndarray, valid: int | None, rows: int) -> np.ndarray:
    """The rows of a batched value that hold real samples (padding rows dropped)."""
    if valid is None or valid == rows or np.ndim(value) == 0 or len(value) != rows:
        return value
    return value[:valid]
