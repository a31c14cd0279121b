"""Result objects: what a conversion did to each layer and what validation measured.

Everything here is plain data with ``to_dict()`` / ``to_json()``; the CLI prints tables from it and pipelines
read it directly. ``bool(comparison)`` is ``comparison.passed``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

ACTIONS = ("folded", "affine", "converted", "kept", "skipped")


class _Json:
    """``to_json()`` from the subclass's ``to_dict()``."""

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_html(self) -> str:
        """One self-contained HTML page: summary, tables and inline SVG plots (``html_report``)."""
        from .html_report import render
        return render(self)


@dataclass
class LayerRecord:
    """One normalization site and what happened to it."""

    name: str
    op: str
    action: str
    reason: str
    channels: int | None
    producer: str | None = None
    producer_op: str | None = None
    rule: str | None = None
    graph: str = "main"
    new_nodes: list[str] = field(default_factory=list)
    groups: int | None = None
    calibrated: bool = False
    drift_cosine: float | None = None
    fit_residual: float | None = None  # calibration: share of the BN output's variance the fit leaves unexplained

    def __post_init__(self) -> None:
        assert self.action in ACTIONS, self.action


@dataclass
class OutputComparison:
    """Reference vs candidate for one graph output.

    ``max_rel`` is ``max|ref - cand| / max|ref|`` (error relative to the output's scale); ``passed`` means
    ``|ref - cand| <= atol + rtol * |ref|`` everywhere (``numpy.allclose``) with NaNs in the same places.
    """

    name: str
    shape: list[int]
    dtype: str
    max_abs: float
    max_rel: float
    mean_abs: float
    cosine: float
    top1_agreement: float | None
    passed: bool | None  # None: a fidelity check with no gate, measured only
    problem: str | None = None  # why the comparison cannot pass, when it is not a difference of values
    caution: str | None = None  # why this output cannot tell the two models apart (a pass here proves little)
    # Exact checks against the float64 evaluation of the original (relative to its largest magnitude):
    original_error: float | None = None  # the original's own float32 run
    converted_error: float | None = None  # the converted model
    error_ratio: float | None = None  # converted_error / original_error
    # Agreement in the task's terms (validate.agreement): the measure this output's shape gets, and its value
    agreement: float | None = None
    agreement_measure: str | None = None  # "top-1", "whole-sequence argmax", "per-pixel argmax", "map IoU (> 0.5)"
    agreements: dict[str, float] = field(default_factory=dict)  # second figures ("per-position argmax")

    def __bool__(self) -> bool:
        return bool(self.passed)


@dataclass
class ValidationReport(_Json):
    """How the comparison was run and what it found."""

    check: str  # "exact": within atol / rtol; "fidelity": measured, gated by min_cosine / min_agreement if given
    providers: list[str]
    requested_provider: str
    reference_optimization: str
    atol: float
    rtol: float
    inputs: str
    outputs: list[OutputComparison]
    min_cosine: float | None = None
    min_agreement: float | None = None
    layer_cosine: dict[str, float] = field(default_factory=dict)
    # exact checks: "noise floor" (against the float64 evaluation of the original) or "atol/rtol" (elementwise)
    rule: str = "atol/rtol"
    float64_reference: str | None = None  # what evaluated the original in float64, and on how many samples
    rule_note: str | None = None  # why the noise-floor rule could not be used, when it was wanted
    exported_with: str | None = None  # PyTorch path: the torch.onnx exporter(s) that produced what was validated
    task_metric: str | None = None  # the name of the user's task metric, when one was given
    task_agreement: float | None = None  # its value (0..1); it decides min_agreement instead of the outputs
    tf32: bool | None = None  # CUDA sessions: whether TF32 matmuls / convolutions were allowed (None: no CUDA)

    @property
    def passed(self) -> bool | None:
        """False when an output (or the task metric's gate) failed; None when the check only measured (fidelity
        without a gate); else True."""
        results = [o.passed for o in self.outputs]
        if any(r is False for r in results):
            return False
        if self.task_agreement is not None and self.min_agreement is not None:
            return self.task_agreement >= self.min_agreement
        return None if any(r is None for r in results) else True

    @property
    def agreement(self) -> float | None:
        """The task agreement the verdict uses: the task metric's, else the first output's that has a measure."""
        if self.task_agreement is not None:
            return self.task_agreement
        return next((o.agreement for o in self.outputs if o.agreement is not None), None)

    @property
    def agreement_measure(self) -> str | None:
        """What ``agreement`` measures: "task metric 'NAME'" or "MEASURE on 'OUTPUT'"."""
        if self.task_agreement is not None:
            return f"task metric '{self.task_metric}'"
        return next((f"{o.agreement_measure} on '{o.name}'" for o in self.outputs if o.agreement is not None), None)

    @property
    def cautions(self) -> list[str]:
        """One line per output whose comparison cannot tell the models apart."""
        return [f"output '{o.name}': {o.caution}" for o in self.outputs if o.caution]

    def __bool__(self) -> bool:
        return bool(self.passed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        d["cautions"] = self.cautions
        d["agreement"] = self.agreement
        d["agreement_measure"] = self.agreement_measure
        return d


@dataclass
class RefinementReport:
    """What refinement did: scope, steps run, the step whose state was kept (0: none beat the calibrated
    parameters, which were kept), held-out samples, the loss and the task agreement on them before and after,
    why it stopped, and its time against the budget."""

    scope: str  # "all": every parameter of the converted network; "norms": the new layers' scale and shift
    steps: int
    best_step: int
    heldout_samples: int  # 0: no slice could be held out (the training data judged the steps)
    loss: str  # the loss per output kind: "KL", "BCE", "MSE" (see normswap.torch.refine)
    heldout_loss_before: float
    heldout_loss_after: float
    heldout_agreement_before: float | None
    heldout_agreement_after: float | None
    agreement_measure: str | None
    seconds: float
    kept: bool
    learning_rate: str
    stopped: str = "time budget"  # "time budget", "step limit", "no held-out improvement"
    budget_seconds: float = 0.0

    def summary(self) -> str:
        where = f"{self.heldout_samples} held-out samples" if self.heldout_samples else "the training data"
        agreement = ""
        if self.heldout_agreement_before is not None:
            agreement = (f", {self.agreement_measure} agreement {self.heldout_agreement_before:.3f} -> "
                         f"{self.heldout_agreement_after:.3f}")
        if not self.kept:
            held = ("" if self.heldout_agreement_before is None else
                    f", {self.agreement_measure} agreement {self.heldout_agreement_before:.3f}")
            return (f"refinement ({self.scope}, {self.steps} steps in {self.seconds:.0f} s, stopped by "
                    f"{self.stopped}) did not beat the calibrated parameters on {where} (loss "
                    f"{self.heldout_loss_before:.3g}{held}); they were kept")
        return (f"refined {self.scope} parameters for {self.steps} steps in {self.seconds:.0f} s (stopped by "
                f"{self.stopped}): on {where} loss {self.heldout_loss_before:.3g} -> {self.heldout_loss_after:.3g}"
                f"{agreement} (best at step {self.best_step})")


DistillationReport = RefinementReport  # the name before 2026-12-01


@dataclass
class CalibrationReport:
    """How calibration ran: data size, passes over it, time, and every layer whose weights it changed."""

    samples: int
    batch_size: int
    passes: int  # runs of each model over the data (1 when run segment by segment)
    seconds: float
    scope: str  # "all": new norm layers and the output layer; "norms": new norm layers only
    layers_changed: list[str] = field(default_factory=list)
    head: str | None = None
    notes: list[str] = field(default_factory=list)
    refinement: RefinementReport | None = None
    segments: int = 0  # the models were run segment by segment, each node once per sample
    batch_layout: str = ""  # how the data was fed (the model's own batch, or a freed batch dimension)
    memory_budget: int = 0  # bytes of activations kept in memory before spilling to disk
    peak_activation_bytes: int = 0  # activations kept in memory between segments, at most
    spilled_bytes: int = 0  # activations kept on disk, at most
    activations: str = ""  # where activations lived: "memory", "memory and disk", "cuda memory", ...
    peak_rss_bytes: int = 0  # the process's peak resident memory when calibration ended
    shared_with: int = 1  # conversions calibrated on the same run of the original (normswap compare)


@dataclass
class PlanReport:
    """The agreement-floor plan (``onnx.plan``): which BNs normalize and which became frozen affine, the task
    agreement reached (``judged``: two-fold out of sample on the calibration data; a refined candidate on
    refinement's held-out slice), and every conversion tried on the way."""

    floor: float
    normalizing: list[str]
    frozen: list[str]
    agreement: float  # of the chosen conversion: see ``judged``, or refinement's held-out slice when refined
    agreement_measure: str | None
    judged_samples: int
    full_agreement: float  # every BN replaced (calibrated, and refined when refinement ran)
    tried: list[dict] = field(default_factory=list)  # {"normalizing", "agreement", "lower_bound", "refined"[, "kept"]}
    ranking: str = ""
    seconds: float = 0.0
    judged: str = "two-fold out of sample"  # "on the calibration data", "on refinement's held-out slice"
    lower_bound: float = 0.0  # the agreement less BOUND_Z standard errors (Wilson); 1 when every BN is frozen
    bound_z: float = 1.0
    refinement_skipped: str | None = None  # why the full swap was not refined to meet the floor

    @property
    def fraction(self) -> float:
        total = len(self.normalizing) + len(self.frozen)
        return len(self.normalizing) / total if total else 0.0

    def summary(self) -> str:
        total = len(self.normalizing) + len(self.frozen)
        met = "meets" if self.lower_bound >= self.floor else "does NOT meet"
        return (f"agreement-floor plan: {len(self.normalizing)} of {total} BN(s) normalize ({self.fraction:.0%}), "
                f"the other {len(self.frozen)} are frozen affine; {self.agreement_measure or 'agreement'} "
                f"{self.agreement:.3f}, less {self.bound_z:g} standard error(s) {self.lower_bound:.3f}, {met} the "
                f"floor {self.floor:g} (judged {self.judged} on {self.judged_samples} samples) "
                f"(every BN replaced: {self.full_agreement:.3f}; {len(self.tried)} conversion(s) tried, "
                f"{self.seconds:.0f} s)")


@dataclass
class ConversionReport(_Json):
    """What ``convert`` did: one record per normalization site, plus validation when it ran."""

    target: str
    exact: bool
    source: str
    layers: list[LayerRecord]
    nodes_before: int
    nodes_after: int
    validation: ValidationReport | None = None
    output: str | None = None
    notes: list[str] = field(default_factory=list)
    calibration: CalibrationReport | None = None
    function_preserved: bool | None = True  # None: calibrated, but no gate decided it (see ``judge_function``)
    deployable: ValidationReport | None = None  # torch path: the converted module vs its own ONNX export
    frontend: str = "onnx"  # "onnx" (nodes_before/after count graph nodes) or "torch" (they count modules)
    validation_error: str | None = None  # why validation could not run (the conversion is kept; CLI exit 4)
    plan: PlanReport | None = None  # the agreement-floor plan, when one was asked for
    dataflow: str | None = None  # torch frontend: the tracer that gave the dataflow ("none": module order)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # seconds of each stage, in order

    @property
    def passed(self) -> bool | None:
        """``None`` when validation did not run or only measured (fidelity without a gate), else whether it (and
        the export check, if any) passed."""
        if self.validation is None:
            return None
        results = (self.validation.passed, None if self.deployable is None else self.deployable.passed)
        if False in results:
            return False
        return self.validation.passed

    def judge_function(self) -> None:
        """For a non-exact conversion that was calibrated: preserved when a gate passed, not when one failed,
        unknown (None) when validation only measured or did not run. Uncalibrated stays False."""
        if self.exact or self.function_preserved is False:
            return
        self.function_preserved = None if self.validation is None else self.validation.passed

    def count(self, action: str) -> int:
        return sum(1 for layer in self.layers if layer.action == action)

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "frontend": self.frontend,
            "exact": self.exact,
            "source": self.source,
            "output": self.output,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "summary": {a: self.count(a) for a in ACTIONS},
            "layers": [asdict(layer) for layer in self.layers],
            "function_preserved": self.function_preserved,
            "calibration": None if self.calibration is None else asdict(self.calibration),
            "validation": None if self.validation is None else self.validation.to_dict(),
            "deployable": None if self.deployable is None else self.deployable.to_dict(),
            "notes": list(self.notes),
            "validation_error": self.validation_error,
            "plan": None if self.plan is None else {**asdict(self.plan), "fraction": self.plan.fraction},
            "dataflow": self.dataflow,
            "stage_seconds": dict(self.stage_seconds),
            "passed": self.passed,
        }


@dataclass
class InspectReport(_Json):
    """Every normalization site in a model, and whether (and why not) it folds."""

    source: str
    opset: int
    ir_version: int
    sites: list[dict]
    problem: str | None = None  # what onnx.checker (and onnxruntime, if it refuses too) object to in the model
    batch_sensitivity: SensitivityReport | None = None  # inspect --batch-sensitivity


@dataclass
class CompareRow:
    """One target of ``normswap.compare``: what it keeps of the original and what it costs."""

    target: str
    exact: bool
    top1_agreement: float | None  # on the first output, against the original, on the held-out inputs
    cosine: float | None
    groups: str | None  # group counts of the converted layers, most frequent first: "32 x18, 16 x2"
    batch_independent: bool  # no BatchNormalization left (nothing couples the samples of a batch in training)
    parameters: int
    nodes: int  # graph nodes (ONNX) or modules (torch) after conversion
    latency_ms: float | None  # per batch, fastest of several rounds (None: not measured or could not run)
    original_latency_ms: float | None
    calibration_seconds: float | None  # what this target's calibration costs alone (None: not calibrated)
    calibrated: bool
    passed: bool | None  # exact targets: within the float64 noise floor; others: None (measured, no gate)
    kept: int  # BatchNorm sites left as they were
    converted: int  # BatchNorm sites rewritten
    problem: str | None = None
    layer_cosine: dict[str, float] = field(default_factory=dict)  # per-layer drift (replacement targets)
    report: ConversionReport | None = None  # the full conversion report (not in the JSON)
    agreement: float | None = None  # in the task's terms (ValidationReport.agreement): what the ranking uses
    agreement_measure: str | None = None  # what it measures ("top-1 on 'logits'", "task metric 'f1'")

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "report"}
        d["function_preserved"] = None if self.report is None else self.report.function_preserved
        return d


@dataclass
class CompareReport(_Json):
    """``normswap compare``: a row per target and the recommended one, with its reason."""

    source: str
    purpose: str  # "finetune" or "deploy": what the recommendation is for
    rows: list[CompareRow]
    recommended: str | None
    reason: str
    notes: list[str] = field(default_factory=list)
    latency_batch: int = 0  # samples per timed run
    latency_source: str = "onnxruntime"  # what ran the timed models

    def to_dict(self) -> dict:
        return {"source": self.source, "purpose": self.purpose, "recommended": self.recommended,
                "reason": self.reason, "latency_batch": self.latency_batch, "latency_source": self.latency_source,
                "rows": [r.to_dict() for r in self.rows], "notes": list(self.notes)}


@dataclass
class LayerSensitivity:
    """One BatchNorm: how far its output and the model's move when a batch of each size supplies its statistics."""

    name: str
    op: str
    channels: int | None
    depth: int  # position among the model's BatchNorm layers, in execution order
    layer_error: dict[int, float]  # batch size -> mean relative error of the layer output
    model_error: dict[int, float]  # batch size -> mean relative error of the model output (this layer alone)
    top1_agreement: dict[int, float | None]  # batch size -> top-1 agreement of the model output (class scores)
    unreliable_up_to: int | None  # largest batch size at which it makes training unreliable (None: none measured)


@dataclass
class SensitivityReport(_Json):
    """``inspect --batch-sensitivity``: every BatchNorm's sensitivity to the batch size, in model order."""

    source: str
    frontend: str
    batch_sizes: list[int]
    batches: int  # batches drawn per batch size
    samples: int  # samples the batches were drawn from
    unreliable_error: float  # model-output relative error from which a layer is called unreliable
    unreliable_agreement: float  # top-1 agreement below which a layer is called unreliable
    layers: list[LayerSensitivity]
    notes: list[str] = field(default_factory=list)

    def ranked(self) -> list[LayerSensitivity]:
        """Most sensitive first: by model-output error at the smallest measured batch size."""
        if not self.batch_sizes:
            return list(self.layers)
        b = self.batch_sizes[0]
        return sorted(self.layers, key=lambda r: -r.model_error.get(b, 0.0))

    def unreliable(self) -> list[LayerSensitivity]:
        return [r for r in self.ranked() if r.unreliable_up_to is not None]
