"""Calibration keeps what the network learned: measured on held-out digits, against the uncalibrated swap."""
from pathlib import Path

import numpy as np
import onnx
import pytest

import normswap
from normswap.onnx.calibrate import norm_levels

FIXTURES = Path(__file__).parent.parent.parent / "fixtures"
MODEL = FIXTURES / "digits_resnet.onnx"


@pytest.fixture(scope="module")
def digits():
    x = np.load(FIXTURES / "digits_heldout.npz")["x"]
    return {"x": x[:200]}, {"x": x[200:]}  # calibration, held out


def _agreement(result):
    return result.report.validation.outputs[0].top1_agreement


@pytest.mark.parametrize("target,floor", [("layer", 0.97), ("group", 0.97)])
def test_calibration_recovers_the_function(digits, target, floor):
    calib, held = digits
    plain = normswap.convert(MODEL, to=target, inputs=held)
    fitted = normswap.convert(MODEL, to=target, inputs=held, calibration=calib)
    assert _agreement(plain) < 0.6  # copying gamma/beta forgets (Opacus-style)
    assert _agreement(fitted) >= floor
    assert fitted.report.function_preserved and fitted.report.calibration.samples == 200
    assert all(layer.calibrated for layer in fitted.report.layers)
    changed = fitted.report.calibration.layers_changed
    assert set(changed) >= {layer.name for layer in fitted.report.layers}
    assert fitted.report.calibration.head in changed  # the output layer was refitted, and listed


def test_norms_only_scope_leaves_the_output_layer(digits):
    calib, held = digits
    r = normswap.convert(MODEL, to="layer", inputs=held, calibration=calib, refit_output_layer=False)
    assert r.report.calibration.head is None and r.report.calibration.scope == "norms"
    head = {t.name: t for t in onnx.load(str(MODEL)).graph.initializer}
    after = {t.name: t for t in r.model.graph.initializer}
    for name in ("fc.weight", "fc.bias"):
        assert after[name] == head[name]


def test_fixed_groups_keep_the_rule_choice(digits):
    calib, held = digits
    by_fit = normswap.convert(MODEL, to="group", calibration=calib, inputs=held)
    fixed = normswap.convert(MODEL, to="group", calibration=calib, inputs=held, choose_groups=False)
    assert [layer.groups for layer in fixed.report.layers] == [16, 16, 16, 24, 24, 24]  # largest divisor <= 32
    assert any(a.groups != b.groups for a, b in zip(by_fit.report.layers, fixed.report.layers))
    assert "chose" in by_fit.report.layers[-1].reason


def test_batch_size_does_not_change_the_fit(digits):
    calib, held = digits
    a = normswap.convert(MODEL, to="layer", calibration=calib, calibration_batch_size=7, validate=False)
    b = normswap.convert(MODEL, to="layer", calibration=calib, calibration_batch_size=1000, validate=False)
    for ta, tb in zip(a.model.graph.initializer, b.model.graph.initializer):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb), rtol=1e-4,
                                   atol=1e-5)


def test_levels_follow_the_dataflow(digits):
    calib, _ = digits
    r = normswap.convert(MODEL, to="layer", calibration=calib, validate=False)
    assert r.report.calibration.passes == 1 + 6 + 1  # the original once, a chain of six norms, then the head


def test_uncached_targets_give_the_same_fit(digits, monkeypatch):
    import normswap.onnx.calibrate as cal
    calib, _ = digits
    cached = normswap.convert(MODEL, to="layer", calibration=calib, validate=False)
    monkeypatch.setattr(cal, "TARGET_CACHE_BYTES", 0)  # too large to keep: recomputed per pass
    streamed = normswap.convert(MODEL, to="layer", calibration=calib, validate=False)
    assert streamed.report.calibration.passes == 6 + 1
    for a, b in zip(cached.model.graph.initializer, streamed.model.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


def test_calibration_reports_progress(digits):
    calls = []
    normswap.convert(MODEL, to="layer", calibration=digits[0], validate=False,
                     progress=lambda done, total, label: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == sorted(c[0] for c in calls)


def test_mismatched_calibration_data_is_a_usage_error(tmp_path):
    np.savez(tmp_path / "c.npz", y=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(normswap.UsageError, match="no array for input"):
        normswap.convert(MODEL, to="layer", calibration=tmp_path / "c.npz")


def test_norm_levels_of_parallel_branches_share_a_level():
    from onnx import helper
    from normswap.onnx.convert import NewNorm
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["x"], ["b"]),
                           helper.make_node("Add", ["a", "b"], ["c"]), helper.make_node("Relu", ["c"], ["d"])],
                          "g", [], [])
    norms = [NewNorm(None, "x", y, 1, 1, 1e-5, "", "", "main") for y in ("a", "b", "d")]
    assert norm_levels(g, norms) == {"a": 1, "b": 1, "d": 2}


def test_prefix_model_computes_the_same_values_with_fewer_nodes(digits, tmp_path):
    from normswap.onnx.activations import Activations, prefix_model
    from normswap.validate.providers import CPU
    model = onnx.load(str(MODEL))
    first_bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    prefix = prefix_model(model, [first_bn.output[0]])
    assert len(prefix.graph.node) < len(model.graph.node) / 3
    assert [o.name for o in prefix.graph.output] == [first_bn.output[0]]
    needed = {i for n in prefix.graph.node for i in n.input}
    assert {t.name for t in prefix.graph.initializer} <= needed
    x = {"x": digits[0]["x"][:8]}
    full = Activations(model, [first_bn.output[0]], (CPU,), str(tmp_path), "full").run(x, [first_bn.output[0]])
    part = Activations(prefix, [], (CPU,), str(tmp_path), "prefix").run(x, [first_bn.output[0]])
    np.testing.assert_array_equal(full[first_bn.output[0]], part[first_bn.output[0]])
