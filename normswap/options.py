"""The settings of each stage of a conversion, one typed group per stage: calibration, refinement, validation.

The CLI builds them from its flags, both frontends take them, and each stage receives only its own group.
``normswap.convert`` also accepts each field as a plain keyword (``provider="cpu"``, ``inputs=...``) for the
group it belongs to; a group and one of its keywords together is an error, so no setting is ever given twice.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace

from .activation_store import DEFAULT_MEMORY_BUDGET
from .errors import UsageError, option
from .validate.agreement import DEFAULT_THRESHOLD, TaskMeasure, TaskMetric

CALIBRATION_BATCH = 64
DEFAULT_REFINE_SECONDS = 180.0
DEFAULT_REFINE_STEPS = 2000  # binds on small nets (a few ms a step); the time budget binds on real models
REFINE_SCOPES = ("all", "norms")


@dataclass(frozen=True)
class CalibrationOptions:
    """Closed-form calibration: samples per run, activations kept in memory (bytes; beyond them on disk), and
    whether the output layer is refit after the norms."""

    batch_size: int = CALIBRATION_BATCH
    memory: int = DEFAULT_MEMORY_BUDGET
    refit_output_layer: bool = True

    def check(self) -> CalibrationOptions:
        if self.batch_size < 1:
            raise UsageError("the calibration batch size must be positive")
        if self.memory < 0:
            raise UsageError(f"{option('calibration_memory')} must not be negative (bytes of activations kept in "
                             "memory)")
        return self


@dataclass(frozen=True)
class RefinementOptions:
    """Refinement after calibration (``normswap.torch.refine``): the converted network's parameters train towards
    the original's outputs on the calibration data for at most ``seconds`` and at most ``steps`` (None: no step
    limit),
    stopping early when the held-out score stops improving. ``enabled=False``: calibration alone. ``scope``:
    ``all`` parameters or the new ``norms``' scale and shift; ``holdout``: share of the calibration data held
    aside to keep the best state; ``batch_size``: samples per step; ``learning_rate``: Adam's peak rate (None:
    the probe chooses it)."""

    enabled: bool = True
    seconds: float = DEFAULT_REFINE_SECONDS
    steps: int | None = DEFAULT_REFINE_STEPS
    scope: str = "all"
    holdout: float = 0.3  # 0.15 held out 36 of 256 samples: too few to see torchcrepe gain (docs/refinement.md)
    batch_size: int = 16
    learning_rate: float | None = None  # None: chosen by a short probe (normswap.torch.refine)

    def check(self) -> RefinementOptions:
        if self.scope not in REFINE_SCOPES:
            raise UsageError(f"{option('refine_scope', self.scope)} must be one of {', '.join(REFINE_SCOPES)}")
        if not self.seconds > 0:
            raise UsageError(f"{option('refine_seconds', self.seconds)} must be positive; to skip refinement pass "
                             f"{option('refine', False)}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"{option('refine_steps', self.steps)} must be at least 1")
        if not 0 <= self.holdout < 1:
            raise UsageError(f"{option('refine_holdout', self.holdout)} must be at least 0 and below 1")
        if self.batch_size < 1:
            raise UsageError(f"{option('refine_batch_size', self.batch_size)} must be positive")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UsageError(f"the refinement learning rate must be positive (got {self.learning_rate:g})")
        return self

    def held_out(self, samples: int) -> int:
        """How many of ``samples`` (tensor data) refinement holds aside: every ``holdout_every``-th."""
        every = holdout_every(self.holdout)
        return samples // every if every else 0


def holdout_every(holdout: float) -> int:
    """Refinement holds aside every this-many-th sample for a hold-out share ``holdout`` (0: none)."""
    return max(2, round(1 / holdout)) if holdout else 0


@dataclass(frozen=True)
class ValidationOptions:
    """Validation of the result against the original in ONNX Runtime: where it runs, on what inputs, the exact
    check's tolerances (None: the float64 noise floor), the fidelity gates, and how agreement is measured."""

    provider: str = "auto"
    inputs: object = None
    input_shapes: Mapping[str, tuple[int, ...]] | None = None
    atol: float | None = None
    rtol: float | None = None
    seed: int = 0
    min_cosine: float | None = None
    min_agreement: float | None = None
    task_metric: TaskMetric | None = None
    map_threshold: float = DEFAULT_THRESHOLD

    def check(self) -> ValidationOptions:
        if (self.atol is not None and self.atol < 0) or (self.rtol is not None and self.rtol < 0):
            raise UsageError(f"{option('atol')} and {option('rtol')} must be non-negative")
        for name, gate in (("min_cosine", self.min_cosine), ("min_agreement", self.min_agreement)):
            if gate is not None and not -1.0 <= gate <= 1.0:
                raise UsageError(f"{option(name)} must lie between -1 and 1")
        self.task
        return self

    @property
    def task(self) -> TaskMeasure:
        """The agreement settings, checked: a callable metric, a threshold strictly inside (0, 1)."""
        if self.task_metric is not None and not callable(self.task_metric):
            raise UsageError(f"{option('task_metric')} must be a callable (reference_outputs, candidate_outputs) ->"
                             f" agreement in 0..1, got {type(self.task_metric).__name__}")
        if not 0.0 < self.map_threshold < 1.0:
            raise UsageError(f"{option('map_threshold')} must lie strictly between 0 and 1 (got "
                             f"{self.map_threshold:g})")
        return TaskMeasure(self.map_threshold, self.task_metric)


# keyword -> (group, field) for the keyword shorthands convert() accepts
CALIBRATION_KEYWORDS = {"calibration_batch_size": "batch_size", "calibration_memory": "memory",
                        "refit_output_layer": "refit_output_layer"}
REFINEMENT_KEYWORDS = {"refine_seconds": "seconds", "refine_steps": "steps", "refine_scope": "scope",
                       "refine_holdout": "holdout", "refine_batch_size": "batch_size"}
DEPRECATED_KEYWORDS = {"distill_steps": "refine_steps", "distill_scope": "refine_scope",
                       "distill_holdout": "refine_holdout"}
VALIDATION_KEYWORDS = {f.name: f.name for f in fields(ValidationOptions)}


def _group(cls, given, keywords: Mapping[str, object], table: Mapping[str, str], name: str):
    chosen = {table[k]: v for k, v in keywords.items() if k in table}
    if given is None:
        return cls(**chosen)
    if chosen:
        raise UsageError(f"{name}= and the keyword(s) {', '.join(k for k in keywords if k in table)} both set "
                         f"{cls.__name__} fields; pass them in one place")
    if not isinstance(given, cls):
        raise UsageError(f"{name}= takes a normswap.{cls.__name__}, got {type(given).__name__}")
    return given


def stage_options(calibration_options, refine, validation, keywords: dict[str, object]
                  ) -> tuple[CalibrationOptions, RefinementOptions, ValidationOptions]:
    """The three groups from ``convert``'s arguments: each group as given, or built from its keyword shorthands
    (the deprecated ``distill_*`` keywords map to refinement, with a DeprecationWarning). ``refine`` may be a
    bool: False turns refinement off, True keeps the defaults. Unknown keywords are a TypeError, as Python's own."""
    known = {**CALIBRATION_KEYWORDS, **REFINEMENT_KEYWORDS, **DEPRECATED_KEYWORDS, **VALIDATION_KEYWORDS}
    unknown = sorted(set(keywords) - set(known))
    if unknown:
        raise TypeError(f"convert() got an unexpected keyword argument '{unknown[0]}'")
    keywords = dict(keywords)
    for old, new in DEPRECATED_KEYWORDS.items():
        if old in keywords:
            warnings.warn(f"{old} is deprecated; use {new} (or refine=RefinementOptions(...))", DeprecationWarning,
                          stacklevel=4)
            value = keywords.pop(old)
            if old == "distill_steps" and not value:
                refine = False if refine is None else refine
                continue
            keywords.setdefault(new, value)
    enabled = None
    if isinstance(refine, bool):
        enabled, refine = refine, None
    cal = _group(CalibrationOptions, calibration_options, keywords, CALIBRATION_KEYWORDS, "calibration_options")
    ref = _group(RefinementOptions, refine, keywords, REFINEMENT_KEYWORDS, "refine")
    if enabled is not None:
        ref = replace(ref, enabled=enabled)
    val = _group(ValidationOptions, validation, keywords, VALIDATION_KEYWORDS, "validation")
    return cal.check(), ref.check(), val.check()


__all__ = ["CALIBRATION_BATCH", "CalibrationOptions", "DEFAULT_REFINE_SECONDS", "DEFAULT_REFINE_STEPS",
           "RefinementOptions",
           "ValidationOptions", "stage_options"]
