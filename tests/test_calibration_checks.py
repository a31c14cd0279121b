"""What calibration checks of its own data: the output layer is refitted only when the refit holds on samples it
was not fitted on (cross-validated), data far from the BNs' running statistics is said to be, data that
overflows float32 inside the model is refused, and too few samples are named -- on both frontends."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normswap
from normswap._math import AffineFit, LinearRefit, ridge_solve
from normswap.calibration_checks import FEW_SAMPLES, input_scale, range_note, sample_note
from normswap.errors import EXIT_INVALID_INPUT, InvalidModelError

FIXTURES = Path(__file__).parent.parent / "fixtures"
MODEL = FIXTURES / "digits_resnet.onnx"


def _linear(n, k, m, seed, noise):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, k))
    w = rng.normal(size=(k + 1, m))
    return h, np.hstack([h, np.ones((n, 1))]) @ w + noise * rng.normal(size=(n, m)), w


def test_a_refit_that_generalizes_is_kept():
    h, o, w = _linear(400, 5, 3, seed=0, noise=0.01)
    fit = LinearRefit()
    for k in range(0, 400, 64):
        fit.add(h[k:k + 64], o[k:k + 64])
    outcome = fit.refit(w + 0.5, ridge=1e-6)  # the current weights are off
    assert outcome.new is not None and outcome.held_out < outcome.before
    np.testing.assert_allclose(outcome.new, w, atol=0.01)
    assert "refitted head h" in fit.note(outcome, "head h")


def test_a_refit_that_interpolates_few_samples_is_refused():
    """8 samples, 20 features: least squares fits the noise exactly (its in-sample error falls, which the
    previous in-sample test accepted) and misses every other sample."""
    h, o, w = _linear(8, 20, 3, seed=1, noise=0.3)
    fit = LinearRefit()
    fit.add(h, o)
    outcome = fit.refit(w, ridge=1e-3)
    assert outcome.after < outcome.before  # in sample the refit looks better ...
    assert outcome.held_out > outcome.before and outcome.new is None  # ... out of sample it is not
    assert "kept: a refit would not lower the error on samples it was not fitted on" in fit.note(outcome, "head h")


def test_one_sample_is_never_refitted():
    h, o, w = _linear(1, 4, 2, seed=2, noise=0.1)
    fit = LinearRefit()
    fit.add(h, o)
    outcome = fit.refit(w, ridge=1e-3)
    assert outcome.new is None and outcome.held_out is None
    assert "one sample cannot show" in fit.note(outcome, "output layer fc")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=6), st.integers(0, 2**31 - 1))
def test_folds_do_not_depend_on_how_the_rows_were_batched(sizes, seed):
    """Row r of the stream goes to fold r % 4 however the stream is cut; the total sums are the rows' own."""
    n = sum(sizes)
    h, o, _ = _linear(n, 3, 2, seed=seed, noise=0.1)
    one, cut = LinearRefit(), LinearRefit()
    one.add(h, o)
    start = 0
    for size in sizes:
        cut.add(h[start:start + size], o[start:start + size])
        start += size
    for a, b in zip(one.folds, cut.folds):
        assert a.count == b.count
        if a.count:
            np.testing.assert_allclose(a.gram, b.gram, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(a.cross, b.cross, rtol=1e-12, atol=1e-12)
    h1 = np.hstack([h, np.ones((n, 1))])
    np.testing.assert_allclose(cut.gram, h1.T @ h1, rtol=1e-12, atol=1e-12)
    if n >= 2:  # the held-out error is the mean over folds of a fit without the fold, scored on it
        w0 = np.zeros((4, 2))
        outcome = cut.refit(w0, ridge=1e-3)
        expected, total = 0.0, 0
        for f in range(4):
            rows = np.arange(n) % 4 == f
            if not rows.any():
                continue
            wf = ridge_solve(h1[~rows].T @ h1[~rows], h1[~rows].T @ o[~rows], 1e-3)
            expected += float(((h1[rows] @ wf - o[rows]) ** 2).sum())
            total += o[rows].size
        assert outcome.held_out == pytest.approx(expected / total, rel=1e-8, abs=1e-12)


def _bn_sums(z: np.ndarray, gamma: np.ndarray, beta: np.ndarray, center: np.ndarray | None = None) -> AffineFit:
    """The target sums calibration takes of a BN output ``y = gamma z + beta`` ((N, C, P) standardized input)."""
    y = gamma[None, :, None] * z + beta[None, :, None]
    fit = AffineFit(len(gamma), center)
    fit.add(np.zeros_like(y), y)
    return fit


def test_data_like_the_training_data_is_in_the_band():
    rng = np.random.default_rng(3)
    gamma, beta = rng.uniform(0.5, 2, 16) * rng.choice([-1, 1], 16), rng.normal(size=16)
    scale = input_scale("bn0", _bn_sums(rng.normal(size=(64, 16, 25)), gamma, beta, center=beta), gamma, beta)
    assert scale.deviation == pytest.approx(1, abs=0.05) and scale.mean < 0.1 and not scale.out_of_band
    assert range_note([scale]) is None


@pytest.mark.parametrize("factor,offset", [(20.0, 0.0), (1 / 20, 0.0), (0.0, 0.0), (1.0, 30.0)])
def test_data_far_from_the_running_statistics_is_said_to_be(factor, offset):
    rng = np.random.default_rng(4)
    gamma, beta = rng.uniform(0.5, 2, 16), rng.normal(size=16)
    good = input_scale("bn0", _bn_sums(rng.normal(size=(32, 16, 9)), gamma, beta), gamma, beta)
    bad = input_scale("bn1", _bn_sums(factor * rng.normal(size=(32, 16, 9)) + offset, gamma, beta), gamma, beta)
    assert bad.out_of_band and not good.out_of_band
    note = range_note([good, bad])
    assert "at 1 of 2 BatchNorm(s)" in note and "first 'bn1'" in note and "check the preprocessing" in note


def test_channels_without_gamma_do_not_vote():
    rng = np.random.default_rng(5)
    gamma = np.r_[np.ones(4), np.zeros(12)]  # 12 dead channels: their outputs are beta whatever the input
    z = rng.normal(size=(32, 16, 9))
    scale = input_scale("bn", _bn_sums(z, gamma, np.zeros(16)), gamma, np.zeros(16))
    assert not scale.out_of_band and scale.deviation == pytest.approx(1, abs=0.1)
    assert input_scale("bn", _bn_sums(z, np.zeros(16), np.zeros(16)), np.zeros(16), np.zeros(16)) is None


def test_sums_that_are_not_finite_are_refused():
    fit = AffineFit(2)
    fit.add_sums(10, np.zeros(2), np.zeros(2), np.array([1.0, np.inf]), np.array([1.0, np.inf]), np.zeros(2))
    with pytest.raises(InvalidModelError, match="beyond float32's range"):
        input_scale("bn7", fit, np.ones(2), np.zeros(2))


def test_few_samples_are_named():
    assert sample_note(FEW_SAMPLES) is None
    assert "single sample" in sample_note(1)
    assert f"calibrated on 8 samples, fewer than the {FEW_SAMPLES}" in sample_note(8)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def digits():
    x = np.load(FIXTURES / "digits_heldout.npz")["x"]
    return x[:200], x[200:]


def _agreement(result):
    return result.report.validation.outputs[0].top1_agreement


def test_eight_samples_keep_the_onnx_head_and_the_agreement(digits):
    """Before the cross-validated guard, the head refitted on 8 samples dropped top-1 agreement to 0.675."""
    calib, held = digits
    with_head = normswap.convert(MODEL, "group", groups="auto", calibration={"x": calib[:8]}, inputs={"x": held},
                                 refine=False, progress=False)
    notes = with_head.report.calibration.notes
    assert with_head.report.calibration.head is None and any("kept: a refit would not" in n for n in notes)
    assert _agreement(with_head) >= 0.95
    assert any("calibrated on 8 samples" in n for n in notes)
    full = normswap.convert(MODEL, "group", groups="auto", calibration={"x": calib}, inputs={"x": held},
                            refine=False, progress=False)
    assert full.report.calibration.head is not None  # 200 samples: the refit holds out of sample, and is kept
    assert not any("calibrated on" in n or "does not look like" in n for n in full.report.calibration.notes)


def test_onnx_data_on_the_wrong_scale_is_said_to_be(digits):
    calib, held = digits
    r = normswap.convert(MODEL, "layer", calibration={"x": calib * 16}, validate=False, refine=False, progress=False)
    (note,) = [n for n in r.report.calibration.notes if "does not look like" in n]
    assert "at 6 of 6 BatchNorm(s)" in note and "deviation 16" in note


def test_onnx_data_that_overflows_is_refused_in_one_line(digits, tmp_path):
    calib, _ = digits
    data = tmp_path / "huge.npz"
    np.savez(data, x=calib * 1e30)
    out = tmp_path / "out.onnx"
    r = subprocess.run([sys.executable, "-m", "normswap", "convert", str(MODEL), "--to", "group", "--calibrate",
                        str(data), "--no-refine", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == EXIT_INVALID_INPUT, r.stderr
    assert r.stderr.count("\n") == 1 and "beyond float32's range" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def _torch_net():
    torch = pytest.importorskip("torch")
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    x = torch.randn(256, 1, 8, 8)
    net.train()
    with torch.no_grad():
        for _ in range(20):  # running statistics of this data
            net(x)
    return net.eval(), x


def test_torch_path_checks_its_data_the_same_way():
    net, x = _torch_net()
    notes = lambda data: normswap.convert(net, "group", groups="auto", calibration=(data,), refine=False,  # noqa
                                          progress=False, validate=False).report.calibration.notes
    good, scaled, few = notes(x), notes(x * 50), notes(x[:5])
    assert not any("does not look like" in n or "calibrated on" in n for n in good)
    assert any("does not look like" in n and "at 2 of 2" in n for n in scaled)
    assert any("calibrated on 5 samples" in n for n in few)
    # 512 features, 256 samples: the refit interpolates and is refused out of sample
    assert any(n.startswith("output layer 7 kept") for n in good)
    with pytest.raises(InvalidModelError, match="beyond float32's range"):
        notes(x * 1e30)

