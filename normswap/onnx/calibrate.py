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
Every node of either model runs once per sample, segment ``s`` of both in one onnxruntime session
(``fused_segments``; apart when several conversions share the original's run); a fitted GroupNorm-family layer
runs there as ``A * x + B`` from the moments its fit was taken from (``fitted_apply``: exact algebra, cheaper
than its emitted nodes). The sums are computed inside the session (``fit_stats``), for every candidate group
count at once, from the original segment's BN outputs. Data is fed at the model's own batch layout
(``batching``): fixed-batch exports work with any number of samples. Afterwards the layer producing a model
output (a Gemm / MatMul head) is refitted in closed form to the original outputs (``refit_head``) from the values
kept for it.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx

from .._math import CandidateSums, fit_choice_note, solve_candidates
from ..calibration_checks import InputScale, input_scale, range_note, sample_note
from ..report import CalibrationReport
from .activations import host_array, ort_device
from .batching import choose_layout, iter_layout, sample_count
from .convert import NewNorm
from .external import tensor_array
from .fit_stats import add_fit_stats
from .fitted_apply import Apply, affine_inputs, plan_applies, substitute
from .fused_segments import can_fuse, fuse
from .graph import overwrite_initializer
from .io import load_model, opset_of
from .refit_head import Head, find_head, refit_head
from .segments import GraphTables, Plan, Segment, plan_segments, segment_model
from . import shared_arena
from ..activation_store import DEFAULT_MEMORY_BUDGET, ActivationStore, peak_rss

DEFAULT_BATCH_SIZE = 64
COPY_BYTES = 16 << 20  # with private arenas, kept values this large leave the session's arena (``_Runner.keep``)
TARGET = "normswap_target::"  # prefix of the original BN outputs fed into a converted segment
FUSED = "normswap_fused::"  # prefix of the converted model's names in a segment fused with the original's
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
                 providers: tuple[str, ...], workdir: str, relaxed: bool, reshapes: dict | None,
                 applies: Mapping[str, Apply] | None = None) -> None:
        self.model, self.plan, self.tag, self.store = model, plan, tag, store
        self.providers, self.workdir, self.relaxed = providers, workdir, relaxed
        self.replacements = reshapes or {}
        self.device = ort_device(providers)
        self.tables = GraphTables.of(model.graph)
        self.applies = applies or {}
        self._applied: dict[int, dict[str, Apply]] = {}
        for y, a in self.applies.items():
            self._applied.setdefault(a.segment, {})[y] = a

    def key(self, name: str) -> str:
        return f"{self.tag}:{name}"

    def applied_in(self, s: int) -> dict[str, Apply]:
        """The fitted layers segment ``s`` runs as ``A * x + B`` (``fitted_apply``)."""
        return self._applied.get(s, {})

    def build(self, segment: Segment, extra_reads: list[str] = ()) -> onnx.ModelProto:
        applied = self.applied_in(segment.index)
        nodes = substitute(segment.nodes, applied) if applied else segment.nodes
        fed = [name for a in applied.values() for name in (a.scale, a.shift)]
        known = set(segment.reads) | {o for n in nodes for o in n.output}
        reads = segment.reads + [r for r in dict.fromkeys([*extra_reads, *fed]) if r not in known]
        dtypes = {r: self.store.dtypes[self.key(r)] for r in reads if self.key(r) in self.store.dtypes}
        dtypes.update({name: np.dtype(np.float32) for name in fed})
        return segment_model(self.model, Segment(segment.index, nodes, reads, segment.writes), dtypes,
                             self.relaxed, self.replacements, self.tables)

    def session(self, model: onnx.ModelProto, s: int):
        from ..validate.runner import make_session
        # the shared arena is a CPU one, measured on the CPU; a GPU session keeps its own allocators
        return make_session(model, self.providers, self.workdir, f"{self.tag}-{s}", optimize=True,
                            shared_arena=self.device == "cpu")

    def value(self, name: str, batch: int, data: Mapping[str, np.ndarray], extra: Mapping[str, object]):
        """What a segment input is fed for ``batch``: from ``extra``, the values kept, or the data (None: not
        fed, e.g. an initializer listed among the inputs)."""
        if name in extra:
            return extra[name]
        if (self.key(name), batch) in self.store:
            return self.store.get(self.key(name), batch)
        return data.get(name)

    def run(self, session, model: onnx.ModelProto, batch: int, data: Mapping[str, np.ndarray],
            extra: Mapping[str, object], wanted: list[str]) -> dict[str, object]:
        return _run_bound(session, model, self.device, lambda name: self.value(name, batch, data, extra), wanted)

    def keep(self, segment: Segment, batch: int, values: Mapping[str, object], names: list[str] | None = None
             ) -> None:
        """Keep what later segments read. A value the next segment reads last stays the OrtValue the session
        wrote (no copy): on the CPU in the shared arena (``shared_arena``), whose chunk later segments reuse once
        it is dropped; on a GPU in device memory. On the CPU a value read beyond the next segment is copied into
        an array of its own: left in the arena for that long it fragments it (the arena grows around it). With a
        private arena per session (the shared one could not be registered) an OrtValue pins its dead session's
        whole arena, so large values (``COPY_BYTES``) are copied too. Measured on torchvision resnet50, 256
        samples at 224x224 (one process each, 2026-12-02): copying large and far-read values 104.5 s, peak
        memory 7.8 GB; copying far-read values only 93.2 s, 9.7 GB; copying nothing 83.0 s, 12.4 GB. Before the
        shared arena, keeping the detector's 50-140 MB values slowed the segments that followed by 3 s of 33 s,
        and copying every value cost the text classifier 0.4 s of 3.1 s. ``names``: the writes to keep (default:
        all of the segment's)."""
        private = not shared_arena.available()
        for name in segment.writes if names is None else names:
            value = values[name]
            if self.device == "cpu" and (self.plan.last_use.get(name, segment.index) > segment.index + 1
                                         or private and (_ort_nbytes(value) or 0) >= COPY_BYTES):
                value = host_array(value)
            self.store.put(self.key(name), batch, value)

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


def _add_sums(c: "_Candidate", sums: list[CandidateSums], stats: dict, values: Mapping[str, object],
              valid: int | None, b: int) -> None:
    """Add one batch's fit sums (outputs of the converted segment) to each layer's ``CandidateSums``."""
    for t in sums:
        shape, names = stats[t.norm.y]
        rows, _, positions = (int(d) for d in host_array(values[shape]))
        got = {k: host_array(values[v]) for k, v in names.items()}
        t.add(rows if valid is None else valid, positions, got)
        if t.norm.y in c.runner.applies:  # every row, padding too: the segment applying it runs them
            c.moments.setdefault(t.norm.y, {})[b] = (got["sx"], got["sxx"], positions)


def _report(progress: Progress | None, seen: int, done: int, total: int, start: float, s: int, count: int) -> None:
    if progress:
        rate = seen * done / total / max(time.perf_counter() - start, 1e-9)
        progress(done, total, f"calibrating: segment {s + 1}/{count}, {rate:,.0f} samples/s")


@dataclass
class _Fused:
    """Segment ``s`` of the original and of one candidate in one session (``fused_segments``): the BN outputs
    its fits read flow inside it; those no later segment of the original reads are not written out."""

    ref: _Runner
    cand: "_Candidate"
    rseg: Segment
    cseg: Segment
    sums: list[CandidateSums]
    model: onnx.ModelProto
    session: object
    stats: dict
    ref_writes: list[str]   # the original's writes still kept
    unlinked: list[str]     # targets the session does not compute (fed from the values kept)

    @classmethod
    def open(cls, ref: _Runner, c: "_Candidate", rseg: Segment, cseg: Segment, sums: list[CandidateSums]
             ) -> "_Fused":
        """Build and open segment ``rseg.index`` of the original fused with the candidate's (with its fit sums)."""
        s, store = rseg.index, ref.store
        dtypes = {t.norm.y: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.norm.elem_type)) for t in sums}
        dtypes.update({y: store.dtypes[ref.key(y)] for y in dtypes if ref.key(y) in store.dtypes})  # kept already
        cmodel, stats = _stats_model(c.runner, cseg, sums, c.opset, dtypes.__getitem__)
        links = {TARGET + t.norm.y: t.norm.y for t in sums}
        # data inputs both read are bound once (not initializers listed as inputs: the converted may change them)
        links.update({name: name for name in ref.tables.inputs
                      if name not in ref.tables.initializers and name not in c.runner.tables.initializers})
        drop = {t.norm.y for t in sums if ref.plan.last_use.get(t.norm.y, s) <= s}
        model = fuse(ref.build(rseg), cmodel, FUSED, links, drop)
        inputs = {i.name for i in model.graph.input}
        unlinked = [t.norm.y for t in sums if FUSED + TARGET + t.norm.y in inputs]
        return cls(ref, c, rseg, cseg, sums, model, ref.session(model, s), stats,
                   [w for w in rseg.writes if w not in drop], unlinked)

    def run(self, b: int, feeds: Mapping[str, np.ndarray], valid: int | None) -> None:
        ref, c, s = self.ref, self.cand, self.rseg.index
        targets = {TARGET + y: ref.store.get(ref.key(y), b) for y in self.unlinked}
        targets.update(c.apply_inputs(s, b))

        def lookup(name: str):
            if name.startswith(FUSED):
                return c.runner.value(name[len(FUSED):], b, feeds, targets)
            return ref.value(name, b, feeds, {})

        values = _run_bound(self.session, self.model, ref.device, lookup, [o.name for o in self.model.graph.output])
        ref.keep(self.rseg, b, values, self.ref_writes)
        mine = {k[len(FUSED):]: v for k, v in values.items() if k.startswith(FUSED)}
        c.runner.keep(self.cseg, b, mine)
        _add_sums(c, self.sums, self.stats, mine, valid, b)


class _Apart:
    """Segment ``s`` of the original and of each candidate in sessions of their own (when several conversions
    share one run of the original, or the models cannot be fused): the original's BN outputs are kept and fed
    to each candidate's session."""

    def __init__(self, ref: _Runner, rseg: Segment, cands: list[tuple["_Candidate", Segment, list[CandidateSums]]]
                 ) -> None:
        self.ref, self.rseg, self.cands = ref, rseg, cands
        self.rsess: tuple | None = None
        self.csess: dict[str, tuple] = {}

    def run(self, b: int, feeds: Mapping[str, np.ndarray], valid: int | None) -> float:
        """Run batch ``b`` through every session; the seconds the original's run took (each candidate's go to its
        own ``seconds``)."""
        ref, rseg, s = self.ref, self.rseg, self.rseg.index
        t0 = time.perf_counter()
        if rseg.nodes:
            if self.rsess is None:
                rmodel = ref.build(rseg)
                self.rsess = (rmodel, ref.session(rmodel, s))
            ref.keep(rseg, b, ref.run(self.rsess[1], self.rsess[0], b, feeds, {}, rseg.writes))
        ref_seconds = time.perf_counter() - t0
        for c, cseg, sums in self.cands:
            t0 = time.perf_counter()
            if cseg.nodes or sums:
                if c.tag not in self.csess:
                    cmodel, stats = _stats_model(c.runner, cseg, sums, c.opset,
                                                 lambda y: ref.store.dtypes[ref.key(y)])
                    self.csess[c.tag] = (cmodel, c.runner.session(cmodel, s), stats)
                cmodel, session, stats = self.csess[c.tag]
                targets = {TARGET + t.norm.y: ref.store.get(ref.key(t.norm.y), b) for t in sums}
                targets.update(c.apply_inputs(s, b))
                values = c.runner.run(session, cmodel, b, feeds, targets, [o.name for o in cmodel.graph.output])
                c.runner.keep(cseg, b, values)
                _add_sums(c, sums, stats, values, valid, b)
            c.seconds += time.perf_counter() - t0
        return ref_seconds


def _run_bound(session, model: onnx.ModelProto, device: str, lookup: Callable[[str], object],
               wanted: list[str]) -> dict[str, object]:
    """Run a segment session with IO binding: kept values stay OrtValues where the session computes (no copy to
    numpy and back between segments); data batches are bound as they are. ``lookup``: what an input is fed."""
    import onnxruntime as ort
    binding = session.io_binding()
    for vi in model.graph.input:
        value = lookup(vi.name)
        if value is None:
            continue
        if isinstance(value, np.ndarray):
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0)
        binding.bind_ortvalue_input(vi.name, value)
    for name in wanted:
        binding.bind_output(name, device)
    session.run_with_iobinding(binding)
    return dict(zip(wanted, binding.get_outputs()))


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


@dataclass
class CalibrationJob:
    """One converted model to calibrate: its new layers and how (``calibrate_many`` runs several at once)."""

    converted: onnx.ModelProto
    norms: list[NewNorm]
    refit_output_layer: bool = True
    choose_groups: bool = True


class _Candidate:
    """A job's state while it is calibrated: its report, layers, head, runner and the seconds its own runs took."""

    def __init__(self, job: CalibrationJob, tag: str, samples: int | None, batch_size: int) -> None:
        self.job, self.tag = job, tag
        self.fitted = [n for n in job.norms if n.graph == "main"]
        self.report = CalibrationReport(samples or 0, batch_size, 1, 0.0,
                                        "all" if job.refit_output_layer else "norms")
        skipped = len(job.norms) - len(self.fitted)
        if skipped:
            self.report.notes.append(f"{skipped} layer(s) inside control-flow bodies keep the copied gamma/beta "
                                     "(calibration reads main-graph values only)")
        self.inits = {t.name: t for t in job.converted.graph.initializer}
        self.head = find_head(job.converted) if job.refit_output_layer else None
        self.opset = opset_of(job.converted)
        self.seconds = 0.0
        self.runner: _Runner | None = None
        self.centres: dict[str, np.ndarray] = {}  # each layer's input centre (its BN's running mean)
        self.moments: dict[str, dict[int, tuple]] = {}  # applied layer -> batch -> (sx, sxx, positions)
        self.params: dict[str, tuple] = {}  # applied layer -> its fit (a, b, groups)
        self.scales: list[InputScale] = []  # each fitted BN's standardized input on the data, in model order

    def apply_inputs(self, s: int, b: int) -> dict[str, np.ndarray]:
        """``A`` and ``B`` of the layers segment ``s`` applies, for batch ``b`` (``fitted_apply``)."""
        out = {}
        for y, apply in self.runner.applied_in(s).items():
            sx, sxx, positions = self.moments[y][b]
            a, shift, groups = self.params[y]
            out[apply.scale], out[apply.shift] = affine_inputs(apply.norm, sx, sxx, positions, self.centres[y],
                                                               groups, a, shift)
        return out


def calibrate(reference: onnx.ModelProto | Path, converted: onnx.ModelProto, norms: list[NewNorm],
              data: Mapping[str, np.ndarray], providers: tuple[str, ...], *, batch_size: int = DEFAULT_BATCH_SIZE,
              refit_output_layer: bool = True, choose_groups: bool = True,
              memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: Progress | None = None) -> CalibrationReport:
    """Fit every main-graph NewNorm of ``converted`` (edited in place) to ``reference`` on ``data``."""
    return calibrate_many(reference, [CalibrationJob(converted, norms, refit_output_layer, choose_groups)], data,
                          providers, batch_size=batch_size, memory_budget=memory_budget, progress=progress)[0]


def calibrate_many(reference: onnx.ModelProto | Path, jobs: list[CalibrationJob], data: Mapping[str, np.ndarray],
                   providers: tuple[str, ...], *, batch_size: int = DEFAULT_BATCH_SIZE,
                   memory_budget: int = DEFAULT_MEMORY_BUDGET, progress: Progress | None = None
                   ) -> list[CalibrationReport]:
    """Calibrate several conversions of the same original (group, layer, instance...) with one run of the
    original: every segment of the original runs once per batch and feeds each candidate's fits. Candidates whose
    segments do not line up with the first one's (their new layers sit elsewhere) are calibrated by runs of
    their own. Each report's ``seconds`` is what that calibration costs alone: the original's share counted in
    full, plus its own runs and fits."""
    start = time.perf_counter()
    samples = sample_count(data)
    cands = [_Candidate(job, f"c{k}", samples, batch_size) for k, job in enumerate(jobs)]
    with tempfile.TemporaryDirectory(prefix="normswap-calib-") as workdir:
        ref_model = load_model(reference, lazy_external=True).model if isinstance(reference, Path) else reference
        layout = choose_layout(ref_model, data, batch_size, providers, workdir)
        plans = [_plans(ref_model, c.job.converted, c.fitted, c.head) for c in cands]
        shared = [k for k, plan in enumerate(plans) if _same_cut(plan, plans[0], cands[k], cands[0])]
        alone = [k for k in range(len(cands)) if k not in shared]
        groups = [shared] + [[k] for k in alone]
        setup = time.perf_counter() - start
        try:
            for members in groups:
                _run(ref_model, [cands[k] for k in members], [plans[k] for k in members], layout, data, providers,
                     workdir, memory_budget, progress, setup)
        finally:
            shared_arena.release()
    rss = peak_rss()
    for k, c in enumerate(cands):
        c.report.batch_size, c.report.batch_layout = layout.rows or (samples or 0), layout.note
        c.report.peak_rss_bytes = rss
        c.report.seconds = c.seconds
        c.report.shared_with = len(shared) if k in shared else 1
    return [c.report for c in cands]


def _same_cut(plan, first, cand: _Candidate, first_cand: _Candidate) -> bool:
    """Whether a candidate can share the original's run with the first: same segment count, every layer fitted
    after the same segment, the same output kept for the head."""
    return (len(plan[0].segments) == len(first[0].segments) and plan[2] == first[2]
            and (cand.head.output if cand.head else None) == (first_cand.head.output if first_cand.head else None))


def _run(ref_model: onnx.ModelProto, cands: list[_Candidate], plans: list, layout, data: Mapping[str, np.ndarray],
         providers: tuple[str, ...], workdir: str, memory_budget: int, progress: Progress | None,
         setup: float) -> None:
    """Segment by segment over all batches: the original once, then every candidate; fit after each segment."""
    start = time.perf_counter()
    samples = sample_count(data)
    ref_plan = plans[0][1]
    device = ort_device(providers)
    store = ActivationStore(memory_budget, workdir, host_array, lambda a: _ort_value(a, device), _ort_nbytes)
    ref = _Runner(ref_model, ref_plan, "r", store, providers, workdir, layout.relaxed, layout.reshapes)
    centres = _bn_means(ref_model, [n for c in cands for n in c.fitted])
    for c, (conv_plan, _, _) in zip(cands, plans):
        c.runner = _Runner(c.job.converted, conv_plan, c.tag, store, providers, workdir, layout.relaxed,
                           layout.reshapes, plan_applies(c.job.converted.graph, c.fitted, conv_plan))
        c.centres = centres
    batches = list(iter_layout(data, layout))
    fuse = len(cands) == 1 and can_fuse(ref_model, cands[0].job.converted)
    count = max([len(p[0].segments) for p in plans] + [len(ref_plan.segments)])
    weights = [1 + len(_segment(ref_plan, s).nodes) + sum(len(_segment(p[0], s).nodes) for p in plans)
               for s in range(count)]
    total, done, seen, ref_seconds = sum(weights) * len(batches), 0, samples or 1, setup
    for s in range(count):
        rseg = _segment(ref_plan, s)
        here = {c.tag: [CandidateSums(n, _candidates(n, c.job.choose_groups),
                                      tensor_array(c.inits[n.shift]).reshape(-1), centres[n.y], n.channels, n.eps)
                        for n in c.fitted if plan[2][n.y] == s] for c, plan in zip(cands, plans)}
        fuse_here = fuse and bool(rseg.nodes) and bool(_segment(plans[0][0], s).nodes or here[cands[0].tag])
        runs: _Fused | _Apart | None = None
        for b, (feeds, valid) in enumerate(batches):
            if fuse_here:  # the original's and the candidate's segment in one session and run
                t0 = time.perf_counter()
                runs = runs or _Fused.open(ref, cands[0], rseg, _segment(plans[0][0], s), here[cands[0].tag])
                runs.run(b, feeds, valid)
                cands[0].seconds += time.perf_counter() - t0
            else:
                runs = runs or _Apart(ref, rseg, [(c, _segment(p[0], s), here[c.tag]) for c, p in zip(cands, plans)])
                ref_seconds += runs.run(b, feeds, valid)
            done += weights[s]
            _report(progress, seen, done, total, start, s, count)
        runs = None  # the segment's sessions end before its fits
        ref.release(s, len(batches))
        for c, plan in zip(cands, plans):
            t0 = time.perf_counter()
            c.runner.release(s, len(batches))
            for y in c.runner.applied_in(s):
                c.moments.pop(y, None)
            for t in here[c.tag]:
                n = t.norm
                scale = input_scale(n.record.name, t.target_fit(), tensor_array(c.inits[n.scale]), t.y_center)
                if scale is not None:  # the scale initializer holds the BN's gamma until just below
                    c.scales.append(scale)
                fits = t.fits()
                chosen, a, shift, sse = solve_candidates(fits)
                n.record.fit_residual = fits[chosen].unexplained(fits[chosen].solve()[2])
                if chosen != n.groups:
                    _apply_groups(c.job.converted.graph, c.inits, n, chosen, sse)
                overwrite_initializer(c.inits[n.scale], a)
                overwrite_initializer(c.inits[n.shift], shift)
                if n.y in c.runner.applies:
                    c.params[n.y] = (a, shift, chosen)
                n.record.calibrated = True
                c.report.layers_changed.append(n.record.name)
            c.seconds += time.perf_counter() - t0
    for c in cands:
        t0 = time.perf_counter()
        c.report.notes.extend(note for note in (samples and sample_note(samples), range_note(c.scales)) if note)
        if c.head is not None:
            pairs = ((host_array(store.get(c.runner.key(c.head.input), b))[:valid],
                      host_array(store.get(ref.key(c.head.output), b))[:valid])
                     for b, (_, valid) in enumerate(batches))
            outcome = refit_head(c.job.converted, c.head, pairs)
            c.report.notes.append(outcome)
            if outcome.startswith("refitted"):
                c.report.head = c.head.name
                c.report.layers_changed.append(c.head.name)
        c.report.segments = count
        c.report.memory_budget = memory_budget
        c.report.peak_activation_bytes = store.peak_memory
        c.report.spilled_bytes = store.peak_disk
        c.report.activations = store.where()
        c.seconds += time.perf_counter() - t0 + ref_seconds
