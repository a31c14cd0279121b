"""Refinement on the PyTorch path: every parameter (or the norms) trained towards the original within a budget,
guarded by held-out data; the shared loop's pieces (loss per output kind, schedule, split)."""
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import normswap  # noqa: E402
from normswap.options import RefinementOptions  # noqa: E402
from normswap.torch.data import Batches  # noqa: E402
from normswap.torch.refine import OutputLoss, _learning_rate, split  # noqa: E402
from tests.torch_nets import agreement  # noqa: E402


def test_refining_every_parameter_is_reported_and_does_not_lose_agreement(trained):
    net, calib, held = trained
    calibrated = normswap.convert(net, to="group", groups=4, calibration=calib, refine=False, validate=False)
    refined = normswap.convert(net, to="group", groups=4, calibration=calib, validate=False,
                               refine=RefinementOptions(steps=300, seconds=120))
    r = refined.report.calibration.refinement
    assert calibrated.report.calibration.refinement is None
    assert r.scope == "all" and 0 < r.steps <= 300 and r.heldout_samples == RefinementOptions().held_out(300) == 100
    assert r.loss == "MSE" and r.agreement_measure == "top-1"
    assert r.kept and r.best_step > 0 and r.heldout_loss_after < r.heldout_loss_before
    assert r.heldout_agreement_after >= r.heldout_agreement_before
    assert agreement(net, refined.model, held) >= agreement(net, calibrated.model, held) - 0.005
    changed = set(refined.report.calibration.layers_changed)
    assert {name for name, m in refined.model.named_modules() if isinstance(m, torch.nn.Conv2d)} <= changed
    assert refined.report.to_dict()["calibration"]["refinement"]["scope"] == "all"


def test_refinement_runs_by_default_with_calibration_data(trained):
    net, calib, _ = trained
    result = normswap.convert(net, to="layer", calibration=calib[:120], validate=False, refine_seconds=3,
                              refine_steps=10**6)
    r = result.report.calibration.refinement
    assert r is not None and r.budget_seconds == 3 and r.steps < 10**6 and r.seconds < 3 + 20  # the budget holds
    assert r.stopped in ("time budget", "no held-out improvement")
    assert any(n.startswith(("refined", "refinement")) for n in result.report.notes)


def test_a_refinement_that_does_not_help_falls_back_to_the_calibrated_parameters(trained):
    net, calib, _ = trained
    calibrated = normswap.convert(net, to="group", groups=4, calibration=calib, refine=False, validate=False)
    ruined = normswap.convert(net, to="group", groups=4, calibration=calib, validate=False,
                              refine=RefinementOptions(steps=30, learning_rate=100.0))  # every step destroys it
    r = ruined.report.calibration.refinement
    assert not r.kept and r.best_step == 0 and r.heldout_loss_after == r.heldout_loss_before
    for (name, a), (_, b) in zip(calibrated.model.state_dict().items(), ruined.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert any("calibrated parameters" in n and "were kept" in n for n in ruined.report.notes)


def test_the_norms_scope_changes_only_the_new_layers(trained):
    net, calib, _ = trained
    calibrated = normswap.convert(net, to="layer", calibration=calib, refine=False, validate=False)
    norms = normswap.convert(net, to="layer", calibration=calib, refine_steps=50, refine_scope="norms",
                             validate=False)
    new = {f"{layer.name}.{k}" for layer in norms.report.layers for k in ("weight", "bias")}
    after = norms.model.state_dict()
    for name, value in calibrated.model.state_dict().items():
        if name not in new:
            assert torch.equal(value, after[name]), name
    assert norms.report.calibration.refinement.scope == "norms"


def test_the_deprecated_distill_keywords_still_work_and_warn(trained):
    net, calib, _ = trained
    with pytest.warns(DeprecationWarning, match="distill_steps is deprecated; use refine_steps"):
        result = normswap.convert(net, to="layer", calibration=calib[:100], distill_steps=5, validate=False)
    assert result.report.calibration.refinement.steps <= 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        off = normswap.convert(net, to="layer", calibration=calib[:100], distill_steps=0, validate=False)
    assert off.report.calibration.refinement is None  # distill_steps=0 meant no refinement, and still does


def test_the_held_out_slice_is_spread_over_the_data_and_bad_options_are_refused():
    x = torch.arange(20.0).reshape(20, 1)
    data = Batches(x, 1, 4)
    train, held, count = split(data, 0.25, batch_size=5)
    held_values = sorted(float(v) for b in held for v in b[0].flatten())
    epoch = [float(v) for b in train for v in b[0].flatten()]
    assert count == 5 and held_values == [3.0, 7.0, 11.0, 15.0, 19.0]
    assert sorted(epoch) == sorted(float(v) for v in range(20) if v % 4 != 3)  # 15 samples, 3 whole batches
    assert epoch != [float(v) for b in train for v in b[0].flatten()]  # a fresh order each epoch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(12, 1)), batch_size=4)
    batches = Batches(loader, 1, 4)  # an iterable: whole batches held out
    train, held, count = split(batches, 0.25)
    assert count == 4 and len(list(held)) == 1 and len(list(train)) == 2
    assert split(Batches(x[:1], 1, 4), 0.15)[1] is None  # nothing to hold out
    with pytest.raises(normswap.UsageError, match="refine_holdout=1.0"):
        normswap.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)), to="layer",
                         calibration=torch.randn(8, 1, 6, 6), refine_holdout=1.0, validate=False)
    with pytest.raises(normswap.UsageError, match="refine_scope='some'"):
        normswap.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)), to="layer",
                         calibration=torch.randn(8, 1, 6, 6), refine_scope="some", validate=False)
    with pytest.raises(normswap.UsageError, match="refine_seconds=0"):
        normswap.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)), to="layer",
                         calibration=torch.randn(8, 1, 6, 6), refine_seconds=0, validate=False)


def test_refinement_needs_a_replacement_target_and_calibration_data():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(normswap.UsageError, match="replacement target"):
        normswap.convert(net, to="fold", refine_seconds=5, example_inputs=torch.randn(2, 1, 6, 6), validate=False)
    with pytest.raises(normswap.UsageError, match="calibration"):
        normswap.convert(net, to="group", refine=True, example_inputs=torch.randn(2, 1, 6, 6), validate=False)
    # the default (refinement on) asks nothing of a conversion without calibration data
    assert normswap.convert(net, to="layer", example_inputs=torch.randn(2, 1, 6, 6),
                            validate=False).report.calibration is None


def test_the_loss_follows_the_output_kind():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 7, 5, generator=g), -1)
    kl = OutputLoss(probs)
    assert kl.kind == "KL" and kl.axis == 2 and float(kl(probs, probs)) == pytest.approx(0, abs=1e-6)
    other = torch.softmax(torch.randn(4, 7, 5, generator=g), -1)
    assert float(kl(other, probs)) > 0.01
    maps = torch.sigmoid(torch.randn(2, 1, 8, 8, generator=g))
    bce = OutputLoss(maps)
    assert bce.kind == "BCE" and float(bce(maps, maps)) == pytest.approx(0, abs=1e-5)
    assert float(bce(maps.flip(-1), maps)) > 0.01
    logits = 1000 * torch.randn(8, 10, generator=g)  # any scale weighs alike: MSE over the variance
    mse = OutputLoss(logits)
    assert mse.kind == "MSE" and float(mse(logits * 1.1, logits)) == pytest.approx(0.01, rel=0.1)
    assert OutputLoss(torch.rand(3, 4, generator=g) * 0.1).kind == "BCE"  # in [0, 1] but no distribution


def test_the_learning_rate_warms_up_then_decays_to_zero():
    rates = [_learning_rate(1.0, k / 100) for k in range(101)]
    assert rates[0] < 0.05 and max(rates) == pytest.approx(rates[10], rel=0.02)
    assert all(a <= b + 1e-12 for a, b in zip(rates[:10], rates[1:11]))  # rising over the warm-up
    assert all(a >= b - 1e-12 for a, b in zip(rates[10:], rates[11:]))  # falling after it
    assert rates[-1] == pytest.approx(0, abs=1e-12) and math.isclose(_learning_rate(2.0, 0.5), 2 * rates[50])


def test_the_calibrated_state_comes_back_exactly_after_the_probe_moved_it(trained, monkeypatch):
    import normswap.torch.refine as loop
    net, calib, _ = trained
    calibrated = normswap.convert(net, to="group", groups=4, calibration=calib, refine=False, validate=False)
    monkeypatch.setattr(loop, "SIGNIFICANCE", float("inf"))  # no state ever beats the calibrated one
    guarded = normswap.convert(net, to="group", groups=4, calibration=calib, validate=False, refine_steps=40)
    r = guarded.report.calibration.refinement
    assert r.learning_rate.endswith("(probed)") and r.steps > 0 and not r.kept
    for (name, a), (_, b) in zip(calibrated.model.state_dict().items(), guarded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_the_original_runs_once_per_training_sample_not_once_per_step():
    from normswap.torch.refine import _Targets
    calls = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            calls.append(len(x))
            return x * 2

    data = Batches(torch.arange(24.0).reshape(24, 1), 1, 4)
    train, _, _ = split(data, 0.25, batch_size=6)
    targets = _Targets(Counting(), train)
    for _ in range(3):  # three epochs
        for batch in train:
            assert torch.equal(targets(batch)[0], batch[0] * 2)  # the cached outputs are the right samples'
    assert sum(calls) == 18  # 18 training samples, each run once
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(8, 1)), batch_size=4)
    iterable = Batches(loader, 1, 4)
    plain = _Targets(Counting(), iterable)  # an iterable of batches: nothing to key a cache by
    calls.clear()
    for _ in range(2):
        for batch in iterable:
            plain(batch)
    assert sum(calls) == 16


def test_fast_models_are_also_measured_early_at_doubling_steps():
    """A tenth of the budget can be hundreds of steps on a small model: steps 10, 20, 40 ... 320 are measured too."""
    from normswap.torch.refine import _early_check
    assert [s for s in range(1, 2000) if _early_check(s)] == [10, 20, 40, 80, 160, 320]
