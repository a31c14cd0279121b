"""Calibration: refit the per-channel scale and shift of every new normalization so that its output matches the
original BN's output on unlabeled data -- the network keeps what it learned.

For a new layer with normalized input ``z`` (GroupNorm / LayerNorm / InstanceNorm of its input, no affine) and
the original BN's output ``y``, the fit is the closed-form per-channel least squares ``y ~ a * z + b`` over every
sample and position (``_math.AffineFit``: five sums per channel, so memory does not grow with the data).

Each layer is fitted on the input the *converted* network gives it, with every new layer upstream already fitted,
so error does not accumulate. To do that at the cost of about one forward pass of each model, both models are
cut into the same segments (``segments.plan_segments``): segment ``s`` runs over all the data, the values later
segments read are kept between segments (``store.ActivationStore``: memory up to a budget, disk beyond), and the
layers whose input segment ``s`` computed are fitted before segment ``s + 1`` is built from the updated model.
Every node of either model runs once per sample. The sums are computed inside the converted segment's
onnxruntime session (``fit_stats``), for every candidate group count at once, from the original segment's BN
outputs fed in. Data is fed at the model's own batch layout (``batching``): fixed-batch exports work with any
number of samples. Afterwards the layer producing a model output (a Gemm / MatMul head) is refitted in closed
form to the original outputs (``refit_head``) from the values kept for it.
"""
from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx

from .._math import CandidateSums, fit_choice_note, solve_candidates
from ..report import CalibrationReport
from .activations import host_array, ort_device
from .batching import choose_layout, iter_layout, sample_count
from .convert import NewNorm
from .external import tensor_array
from .fit_stats import add_fit_stats
from .graph import overwrite_initializer
from .io import load_model, opset_of
from .refit_head import Head, find_head, refit_head
from .segments import Plan, Segment, plan_segments, segment_model
from ..activation_store import DEFAULT_MEMORY_BUDGET, ActivationStore, peak_rss

DEFAULT_BATCH_SIZE = 64
TARGET = "normswap_target::"  # prefix of the original BN outputs fed into a converted segment
Progress = Callable[[int, int, str], None]


def _candidates(norm: NewNorm, choose_groups: bool) -> tuple[int | None, ...]:
    """Group counts to fit for a layer: all allowed ones when choosing by fit, else its own."""
    if choose_groups and len(norm.group_candidates) > 1 and norm.group_consts is not None:
        return norm.group_candidates
    return (norm.groups,)


def _apply_groups(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto], norm: NewNorm, groups: int,
                  sse: dict) -> None:
    """Re-point the emitted GroupNorm at ``groups`` groups (reshape shape and unit InstanceNorm parameters); where
    the model lists initializers among its inputs (IR < 4), their declared shapes follow."""
    shape, ones, zeros = norm.group_consts
    overwrite_initializer(inits[shape], np.array([0, groups, -1], np.int64), keep_shape=False)
    overwrite_initializer(inits[ones], np.ones(groups, np.float32), keep_shape=False)
    overwrite_initializer(inits[zeros], np.zeros(groups, np.float32), keep_shape=False)
    declared = {vi.name: vi for vi in graph.input}
    for name in (ones, zeros):
        if name in declared and declared[name].type.HasField("tensor_type"):
            dims = declared[name].type.tensor_type.shape.dim
            if len(dims) == 1:
                dims[0].Clear()
                dims[0].dim_value = groups
    norm.groups = norm.record.groups = groups
    norm.record.reason += fit_choice_note(groups, sse)


def _plans(reference: onnx.ModelProto, converted: onnx.ModelProto, norms: list[NewNorm], head: Head | None
           ) -> tuple[Plan, Plan, dict[str, int]]:
    """Segments of both models, and the segment after which each layer (by output name) is fitted."""
    # every node a layer's rewrite emitted runs after the fit (its group count may change there)
    by_node = {name: n for n in norms for name in n.record.new_nodes}
    late = {i: by_node[node.name].x for i, node in enumerate(converted.graph.node) if node.name in by_node}
    conv = plan_segments(converted.graph, roots=[n.x for n in norms], late=late,
                         hold=[head.input] if head else [])
    fit_after = {n.y: conv.segment_of.get(n.x, 0) for n in norms}
    ref = plan_segments(reference.graph, roots=[], raised={n.y: n.x for n in norms}, export=fit_after,
                        hold=[head.output] if head else [], count=len(conv.segments))
    for n in norms:  # the same dataflow cut the same way: a BN's input lies in the same segment in both models
        assert ref.segment_of.get(n.x, 0) == fit_after[n.y], f"segments disagree at {n.record.name}"
    return conv, ref, fit_after


def _segment(plan: Plan, s: int) -> Segment:
    return plan.segments[s] if s < len(plan.segments) else Segment(s)


class _Runner:
    """Runs one model segment by segment over all batches, keeping what later segments read in the store."""

    def __init__(self, model: onnx.ModelProto, plan: Plan, tag: str, store: ActivationStore,
                 providers: tuple[str, ...], workdir: str, relaxed: bool, reshapes: dict | None) -> None:
        self.model, self.plan, self.tag, self.store = model, plan, tag, store
        self.providers, self.workdir, self.relaxed = providers, workdir, relaxed
        self.replacements = reshapes or {}
        self.device = ort_device(providers)

    def key(self, name: str) -> str:
        return f"{self.tag}:{name}"

    def build(self, segment: Segment, extra_reads: list[str] = ()) -> onnx.ModelProto:
        reads = segment.reads + [r for r in extra_reads if r not in segment.reads and
                                 r not in {o for n in segment.nodes for o in n.output}]
        dtypes = {r: self.store.dtypes[self.key(r)] for r in reads if self.key(r) in self.store.dtypes}
        return segment_model(self.model, Segment(segment.index, segment.nodes, reads, segment.writes), dtypes,
                             self.relaxed, self.replacements)

    def session(self, model: onnx.ModelProto, s: int):
        from ..validate.runner import make_session
        return make_session(model, self.providers, self.workdir, f"{self.tag}-{s}", optimize=True)

    def run(self, session, model: onnx.ModelProto, batch: int, data: Mapping[str, np.ndarray],
            extra: Mapping[str, object], wanted: list[str]) -> dict[str, object]:
        """Run a segment session with IO binding: kept values stay OrtValues where the session computes (no copy
        to numpy and back between segments); data batches are bound as they are."""
        import onnxruntime as ort
        binding = session.io_binding()
        for vi in model.graph.input:
            name = vi.name
            if name in extra:
                value = extra[name]
            elif (self.key(name), batch) in self.store:
                value = self.store.get(self.key(name), batch)
            elif name in data:
                value = data[name]
            else:
                continue
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, 0)
            binding.bind_ortvalue_input(name, value)
        for name in wanted:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        return dict(zip(wanted, binding.get_outputs()))

    def keep(self, segment: Segment, batch: int, values: Mapping[str, object]) -> None:
        for name in segment.writes:
            self.store.put(self.key(name), batch, values[name])

    def release(self, s: int, batches: int) -> None:
        """Drop the values no segment after ``s`` needs."""
        for name in self.plan.dead_after.get(s, ()):
            for b in range(batches):
                self.store.drop(self.key(name), b)


def _bn_means(reference: onnx.ModelProto, norms: list[NewNorm]) -> dict[str, np.ndarray]:
    """Each replaced BN's running mean (by output name), where it is an initializer: the centre of its input."""
    inits = {t.name: t for t in reference.graph.initializer}
    out = {}
    for node in reference.graph.node:
        if node.op_type == "BatchNormalization" and len(node.input) > 3 and node.input[3] in inits:
            out[node.output[0]] = tensor_array(inits[node.input[3]]).astype(np.float64).reshape(-1)
    return {n.y: out.get(n.y, np.zeros(n.channels)) for n in norms}


def _stats_model(runner: _Runner, segment: Segment, sums: list[CandidateSums], opset: int,
                 target_dtype: Callable[[str], np.dtype]) -> tuple[onnx.ModelProto, dict]:
    """The converted segment with the fit sums of each layer appended (its BN output fed as a target)."""
    model = runner.build(segment, [t.norm.x for t in sums])
    outputs = {}
    for k, t in enumerate(sums):
        n, target = t.norm, TARGET + t.norm.y
        model.graph.input.append(onnx.helper.make_tensor_value_info(
            target, onnx.helper.np_dtype_to_tensor_dtype(target_dtype(n.y)), None))
        outputs[n.y] = add_fit_stats(model.graph, opset, x=n.x, target=target, channels=n.channels, eps=n.eps,
                                     x_center=t.x_center, y_center=t.y_center, channel_norm=None in t.candidates,
                                     prefix=f"normswap_fit/{k}", elem_type=n.elem_type)
    return model, outputs


def _ort_value(array: np.ndarray, device: str):
    import onnxruntime as ort
    return ort.OrtValue.ortvalue_from_numpy(array, device, 0)


def _ort_nbytes(value) -> int | None:
    """Bytes of an OrtValue tensor (None for anything else: kept in memory, uncounted)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(value.element_type())
        return int(np.prod(value.shape(), dtype=np.int64)) * np.dtype(dtype).itemsize
    except Exception:  # a sequence or map value
        return None


def calibrate(reference: onnx.ModelProto | Path, converted: onnx.ModelProto, norms: list[NewNorm],
              data: Mapping[str, np.ndarray], providers: tuple[str, ...], *, batch_size: int = DEFAULT_BATCH_SIZE,
              refit_output_layer: bool = True, choose_groups: bool = True,
              memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: Progress | None = None) -> CalibrationReport:
    """Fit every main-graph NewNorm of ``converted`` (edited in place) to ``reference`` on ``data``."""
    start = time.perf_counter()
    samples = sample_count(data)
    fitted = [n for n in norms if n.graph == "main"]
    report = CalibrationReport(samples or 0, batch_size, 1, 0.0, "all" if refit_output_layer else "norms")
    skipped = len(norms) - len(fitted)
    if skipped:
        report.notes.append(f"{skipped} layer(s) inside control-flow bodies keep the copied gamma/beta "
                            "(calibration reads main-graph values only)")
    inits = {t.name: t for t in converted.graph.initializer}
    head = find_head(converted) if refit_output_layer else None
    opset = opset_of(converted)
    with tempfile.TemporaryDirectory(prefix="normswap-calib-") as workdir:
        ref_model = load_model(reference, lazy_external=True).model if isinstance(reference, Path) else reference
        layout = choose_layout(ref_model, data, batch_size, providers, workdir)
        report.batch_size, report.batch_layout = layout.rows or (samples or 0), layout.note
        conv_plan, ref_plan, fit_after = _plans(ref_model, converted, fitted, head)
        centres = _bn_means(ref_model, fitted)
        device = ort_device(providers)
        store = ActivationStore(memory_budget, workdir, host_array, lambda a: _ort_value(a, device), _ort_nbytes)
        ref = _Runner(ref_model, ref_plan, "r", store, providers, workdir, layout.relaxed, layout.reshapes)
        cand = _Runner(converted, conv_plan, "c", store, providers, workdir, layout.relaxed, layout.reshapes)
        batches = list(iter_layout(data, layout))
        count = max(len(conv_plan.segments), len(ref_plan.segments))
        weights = [1 + len(_segment(ref_plan, s).nodes) + len(_segment(conv_plan, s).nodes) for s in range(count)]
        total, done, seen = sum(weights) * len(batches), 0, samples or 1
        for s in range(count):
            rseg, cseg = _segment(ref_plan, s), _segment(conv_plan, s)
            here = [CandidateSums(n, _candidates(n, choose_groups), tensor_array(inits[n.shift]).reshape(-1),
                                  centres[n.y], n.channels, n.eps) for n in fitted if fit_after[n.y] == s]
            rsess = csess = None
            for b, (feeds, valid) in enumerate(batches):
                if rseg.nodes:
                    if rsess is None:
                        rmodel = ref.build(rseg)
                        rsess = (rmodel, ref.session(rmodel, s))
                    ref.keep(rseg, b, ref.run(rsess[1], rsess[0], b, feeds, {}, rseg.writes))
                if cseg.nodes or here:
                    if csess is None:
                        cmodel, stats = _stats_model(cand, cseg, here, opset, lambda y: store.dtypes[ref.key(y)])
                        csess = (cmodel, cand.session(cmodel, s), stats)
                    cmodel, session, stats = csess
                    targets = {TARGET + t.norm.y: store.get(ref.key(t.norm.y), b) for t in here}
                    values = cand.run(session, cmodel, b, feeds, targets, [o.name for o in cmodel.graph.output])
                    cand.keep(cseg, b, values)
                    for t in here:
                        shape, names = stats[t.norm.y]
                        rows, _, positions = (int(d) for d in host_array(values[shape]))
                        t.add(rows if valid is None else valid, positions,
                              {k: host_array(values[v]) for k, v in names.items()})
                done += weights[s]
                if progress:
                    rate = seen * done / total / max(time.perf_counter() - start, 1e-9)
                    progress(done, total, f"calibrating: segment {s + 1}/{count}, {rate:,.0f} samples/s")
            rsess = csess = None
            ref.release(s, len(batches))
            cand.release(s, len(batches))
            for t in here:
                n = t.norm
                chosen, a, shift, sse = solve_candidates(t.fits())
                if chosen != n.groups:
                    _apply_groups(converted.graph, inits, n, chosen, sse)
                overwrite_initializer(inits[n.scale], a)
                overwrite_initializer(inits[n.shift], shift)
                n.record.calibrated = True
                report.layers_changed.append(n.record.name)
        if head is not None:
            pairs = ((host_array(store.get(cand.key(head.input), b))[:valid],
                      host_array(store.get(ref.key(head.output), b))[:valid])
                     for b, (_, valid) in enumerate(batches))
            outcome = refit_head(converted, head, pairs)
            report.notes.append(outcome)
            if outcome.startswith("refitted"):
                report.head = head.name
                report.layers_changed.append(head.name)
        report.segments = count
        report.memory_budget = memory_budget
        report.peak_activation_bytes = store.peak_memory
        report.spilled_bytes = store.peak_disk
        report.activations = store.where()
    report.peak_rss_bytes = peak_rss()
    report.seconds = time.perf_counter() - start
    return report
