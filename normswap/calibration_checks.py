"""What calibration can tell about its data from the sums it takes anyway (no extra run), for both frontends.

A BN normalizes its input with the running statistics of training, ``y = gamma (x - mean) / sqrt(var + eps) +
beta``. On data like the training data, the standardized input ``(x - mean) / sqrt(var + eps)`` has, per channel,
a deviation near 1 and a mean near 0. From calibration's sums of the original BN's output, its deviation is
``std(y) / |gamma|`` and its mean ``(mean(y) - beta) / gamma``. Measured on the PP-OCR classifier, recognizer and
detector and the digits net with their own preprocessing (docs/targets.md, "What the calibration data is
checked for"): medians over channels 0.35-1.31 (deviation) and at most 0.94 (mean) at every BN; fed raw 0-255
pixels instead, the first BN's deviation is 31-187 and its mean 58-193. Beyond ``DEVIATION_BAND`` or
``MEAN_LIMIT`` the data is said not to look like what the model was trained on (the fits follow the data, so
a model calibrated on it is fitted to the wrong inputs); sums that are not finite are refused."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._math import AffineFit
from .errors import InvalidModelError

DEVIATION_BAND = 8.0  # a standardized deviation above this, or below its inverse, is out of the band
MEAN_LIMIT = 8.0  # a standardized mean farther than this from 0 is out
FEW_SAMPLES = 64  # digits net: top-1 agreement 0.975 calibrated on 8-32 samples, 0.992 from 64 on


@dataclass(frozen=True)
class InputScale:
    """One BN's input on the calibration data, standardized by its running statistics: the medians over its
    channels (those whose gamma is not negligible) of the deviation and of the mean's distance from 0."""

    layer: str
    deviation: float
    mean: float

    @property
    def out_of_band(self) -> bool:
        return not (1 / DEVIATION_BAND <= self.deviation <= DEVIATION_BAND and self.mean <= MEAN_LIMIT)


def input_scale(layer: str, fit: AffineFit, gamma, beta) -> InputScale | None:
    """``layer``'s standardized input from the target sums of ``fit`` (the original BN's output ``y``, taken
    after subtracting ``fit.center``) and the BN's ``gamma`` and ``beta``; None when no data was seen. Refuses
    (exit 3) sums that are not finite: the data drives the model beyond float32's range."""
    n = fit.n
    if not np.any(n):
        return None
    if not (np.all(np.isfinite(fit.sy)) and np.all(np.isfinite(fit.syy))):
        raise InvalidModelError(f"the calibration data drives BatchNorm '{layer}' beyond float32's range (the sums "
                                "of its output are not finite): it is far outside what the model was trained on "
                                "-- check its preprocessing (scale, mean)")
    n = np.maximum(n, 1)
    gamma = np.abs(np.asarray(gamma, np.float64).reshape(-1))
    mean_y = fit.sy / n + fit.center
    std_y = np.sqrt(np.maximum(fit.syy / n - (fit.sy / n) ** 2, 0.0))
    live = gamma > 1e-6 * max(float(gamma.max(initial=0.0)), 1e-30)
    if not np.any(live):
        return None
    beta = np.broadcast_to(np.asarray(beta, np.float64).reshape(-1), gamma.shape)
    return InputScale(layer, float(np.median(std_y[live] / gamma[live])),
                      float(np.median(np.abs(mean_y[live] - beta[live]) / gamma[live])))


def range_note(scales: list[InputScale]) -> str | None:
    """A note when some BN's standardized input is out of the band (``scales`` in model order)."""
    bad = [s for s in scales if s.out_of_band]
    if not bad:
        return None
    first = bad[0]
    return (f"the calibration data does not look like what the model was trained on: at {len(bad)} of "
            f"{len(scales)} BatchNorm(s) its inputs sit outside the BN's running statistics (first '{first.layer}': "
            f"deviation {_times(first.deviation)} the running one, mean {first.mean:.3g} running deviations "
            "from the running mean; medians over channels) -- check the preprocessing (scale, mean, channel "
            "order); the new layers were fitted to this data")


def _times(ratio: float) -> str:
    return f"{ratio:.3g}x" if math.isfinite(ratio) else "infinitely"


def sample_note(samples: int) -> str | None:
    """A note when calibration saw fewer samples than the fits were measured to need."""
    if samples >= FEW_SAMPLES:
        return None
    if samples == 1:
        return ("calibrated on a single sample: a per-sample normalization fitted on one sample cannot learn how "
                "samples differ, so the fits rarely hold on other inputs -- give a few hundred samples")
    return (f"calibrated on {samples} samples, fewer than the {FEW_SAMPLES} the fits were measured to settle at "
            "(docs/targets.md) -- give a few hundred samples")
