"""Refinement of ONNX conversions (normswap/onnx/refine.py): the converted graph's initializers train in torch
towards the original, guarded by held-out data; trained values land in the initializers they came from."""
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")

import normswap  # noqa: E402
from normswap.errors import UsageError  # noqa: E402
from normswap.options import RefinementOptions  # noqa: E402
from normswap.onnx.refine import trainable_initializers  # noqa: E402
from tests.builders import paddle_style  # noqa: E402

FIXTURES = Path(__file__).parent.parent.parent / "fixtures"
X = np.load(FIXTURES / "digits_heldout.npz")["x"]
MODEL = str(FIXTURES / "digits_resnet.onnx")


def _convert(steps, **kw):
    """InstanceNorm on the digits ResNet: calibration leaves much of the function lost (cosine 0.61)."""
    refine = RefinementOptions(steps=steps, **kw) if steps else False
    return normswap.convert(MODEL, to="instance", calibration={"x": X[:280]}, inputs={"x": X[280:]},
                            refine=refine, progress=False)


@pytest.fixture(scope="module")
def pair():
    return _convert(0), _convert(300)


def test_refinement_lowers_the_heldout_error_and_keeps_the_graph(pair):
    calibrated, refined = pair
    d = refined.report.calibration.refinement
    assert d is not None and d.kept and d.heldout_loss_after < d.heldout_loss_before and d.heldout_samples > 0
    assert d.loss == "MSE" and d.agreement_measure == "top-1"  # the digits net's output: logits
    assert d.heldout_agreement_after >= d.heldout_agreement_before
    assert refined.report.validation.outputs[0].cosine >= calibrated.report.validation.outputs[0].cosine
    before, after = calibrated.model, refined.model
    assert [(n.op_type, n.name, list(n.input)) for n in before.graph.node] == \
        [(n.op_type, n.name, list(n.input)) for n in after.graph.node]
    assert (after.ir_version, list(after.opset_import)) == (before.ir_version, list(before.opset_import))
    b = {t.name: numpy_helper.to_array(t) for t in before.graph.initializer}
    a = {t.name: numpy_helper.to_array(t) for t in after.graph.initializer}
    assert set(a) == set(b) and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    moved = [k for k in a if not np.array_equal(a[k], b[k])]
    assert moved and set(moved) <= set(trainable_initializers(before, "all", []))


def test_when_no_step_helps_the_calibrated_state_is_kept():
    calibrated, wrecked = _convert(0), _convert(30, learning_rate=1e3)  # every step wrecks the network
    d = wrecked.report.calibration.refinement
    assert not d.kept and d.best_step == 0
    for t0, t1 in zip(calibrated.model.graph.initializer, wrecked.model.graph.initializer):
        assert t0.name == t1.name and numpy_helper.to_array(t0).tobytes() == numpy_helper.to_array(t1).tobytes()


def test_only_weights_biases_and_scales_train():
    m = paddle_style(np.random.default_rng(0), "map", 11)
    from onnx import helper
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "resize_scales")
    m.graph.initializer.append(scales)
    out = m.graph.output[0].name
    m.graph.node.append(helper.make_node("Resize", [out, "", "resize_scales"], ["up"], mode="nearest"))
    m.graph.output[0].name = "up"
    names = trainable_initializers(m, "all", [])
    assert "conv2d_0.w_0" in names and "conv2d_0.b_0" in names and "resize_scales" not in names
    assert trainable_initializers(m, "norms", ["conv2d_0.b_0", "missing"]) == ["conv2d_0.b_0"]


def test_refinement_needs_a_replacement_target_and_calibration_data():
    with pytest.raises(UsageError, match="replacement target"):
        normswap.convert(MODEL, to="fold", refine_steps=5)
    with pytest.raises(UsageError, match="calibration"):
        normswap.convert(MODEL, to="group", refine=True)
