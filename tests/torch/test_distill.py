"""Distillation: every parameter (or the norms) trained towards the original, guarded by held-out data."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import normswap  # noqa: E402
from tests.torch_nets import agreement  # noqa: E402
from normswap.torch.data import Batches  # noqa: E402
from normswap.torch.distill import split  # noqa: E402


def test_distilling_every_parameter_is_reported_and_does_not_lose_agreement(trained):
    net, calib, held = trained
    calibrated = normswap.convert(net, to="group", groups=4, calibration=calib, validate=False)
    distilled = normswap.convert(net, to="group", groups=4, calibration=calib, distill_steps=100, validate=False)
    d = distilled.report.calibration.distillation
    assert d.scope == "all" and d.steps == 100 and d.heldout_samples == 300 // 7
    assert d.kept and d.best_step > 0 and d.heldout_error_after < d.heldout_error_before
    assert agreement(net, distilled.model, held) >= agreement(net, calibrated.model, held) - 0.005
    changed = set(distilled.report.calibration.layers_changed)
    assert {name for name, m in distilled.model.named_modules() if isinstance(m, torch.nn.Conv2d)} <= changed
    assert distilled.report.to_dict()["calibration"]["distillation"]["scope"] == "all"


def test_a_distillation_that_does_not_help_falls_back_to_the_calibrated_parameters(trained, monkeypatch):
    import normswap.torch.distill as distill_module
    net, calib, _ = trained
    calibrated = normswap.convert(net, to="group", groups=4, calibration=calib, validate=False)
    monkeypatch.setattr(distill_module, "RMS_STEP", 100.0)  # every step destroys the net
    ruined = normswap.convert(net, to="group", groups=4, calibration=calib, distill_steps=30, validate=False)
    d = ruined.report.calibration.distillation
    assert not d.kept and d.best_step == 0 and d.heldout_error_after == d.heldout_error_before
    for (name, a), (_, b) in zip(calibrated.model.state_dict().items(), ruined.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert any("calibrated parameters were kept" in n for n in ruined.report.notes)


def test_the_norms_scope_changes_only_the_new_layers(trained):
    net, calib, _ = trained
    calibrated = normswap.convert(net, to="layer", calibration=calib, validate=False)
    norms = normswap.convert(net, to="layer", calibration=calib, distill_steps=50, distill_scope="norms",
                             validate=False)
    new = {f"{layer.name}.{k}" for layer in norms.report.layers for k in ("weight", "bias")}
    after = norms.model.state_dict()
    for name, value in calibrated.model.state_dict().items():
        if name not in new:
            assert torch.equal(value, after[name]), name
    assert norms.report.calibration.distillation.scope == "norms"


def test_the_held_out_slice_is_spread_over_the_data_and_bad_options_are_refused():
    x = torch.arange(20.0).reshape(20, 1)
    data = Batches(x, 1, 4)
    train, held, count = split(data, 0.25)
    held_values = sorted(float(v) for b in held for v in b[0].flatten())
    train_values = sorted(float(v) for b in train for v in b[0].flatten())
    assert count == 5 and held_values == [3.0, 7.0, 11.0, 15.0, 19.0]
    assert sorted(held_values + train_values) == [float(v) for v in range(20)]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(12, 1)), batch_size=4)
    batches = Batches(loader, 1, 4)  # an iterable: whole batches held out
    train, held, count = split(batches, 0.25)
    assert count == 4 and len(list(held)) == 1 and len(list(train)) == 2
    assert split(Batches(x[:1], 1, 4), 0.15)[1] is None  # nothing to hold out
    with pytest.raises(normswap.UsageError, match="distill_holdout=1.0"):
        split(data, 1.0)
    with pytest.raises(normswap.UsageError, match="distill_scope='some'"):
        normswap.convert(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)), to="layer",
                         calibration=torch.randn(8, 1, 6, 6), distill_steps=1, distill_scope="some", validate=False)
