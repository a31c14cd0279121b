"""Rewrites whose float64 results do not fit the stored dtype (float16 tops out at 65504) are not applied."""
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import normswap
from tests.builders import bn_node, conv_bn, init, model, ops, out, run, vi


def _set(m: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    t = next(t for t in m.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), name))


def _fp16_conv_bn(scale: float, transpose: bool = False, weight: float = 100.0):
    """fp16 Conv weights near ``weight`` and a BN scale gamma/sqrt(var+eps) of ``scale`` on channel 0."""
    rng = np.random.default_rng(0)
    m = conv_bn(rng, dtype=np.float16, transpose=transpose, group=1)
    w = next(t for t in m.graph.initializer if t.name == "W")
    _set(m, "W", np.full(tuple(w.dims), weight))
    var = np.ones(6)
    var[0] = 1.0 / scale ** 2
    _set(m, "bn.var", var)
    _set(m, "bn.gamma", np.ones(6))
    m.graph.node[1].attribute[0].f = 0.0  # epsilon
    return m


def test_fold_that_would_overflow_fp16_becomes_the_affine_with_the_reason():
    for transpose in (False, True):
        r = normswap.convert(_fp16_conv_bn(1000.0, transpose), to="fold", validate=False)
        layer = r.report.layers[0]
        assert layer.action == "affine", layer.reason
        assert "beyond the largest float16" in layer.reason and "weight" in layer.reason
        for t in r.model.graph.initializer:
            assert np.all(np.isfinite(numpy_helper.to_array(t).astype(np.float64)))


def test_fold_within_fp16_range_still_folds():
    r = normswap.convert(_fp16_conv_bn(100.0, weight=100.0), to="fold", validate=False)  # peak 1e4 < 65504
    assert r.report.layers[0].action == "folded"
    w = next(t for t in r.model.graph.initializer if "weight_bnfolded" in t.name)
    assert w.data_type == TensorProto.FLOAT16
    assert np.isclose(float(numpy_helper.to_array(w).max()), 1e4, rtol=1e-3)


def test_scale_beyond_fp16_keeps_the_bn_and_the_model_still_runs():
    m = _fp16_conv_bn(1e5)
    r = normswap.convert(m, to="fold", validate=False)
    layer = r.report.layers[0]
    assert layer.action == "kept" and "cannot become affine: its scale would reach" in layer.reason
    assert ops(r.model) == ["Conv", "BatchNormalization"]
    x = {"x": np.full((2, 4, 5, 5), 1e-4, np.float16)}
    assert np.array_equal(run(r.model, x)[0], run(m, x)[0], equal_nan=True)


def test_gemm_fold_that_would_overflow_fp16_is_not_folded():
    a = np.full((3, 4), 300.0, np.float16)
    var = np.full(4, 1e-4)  # scale 100 -> weights 3e4 fine; bias: mean -1000 * 100 -> 1e5 overflows
    nodes = [helper.make_node("Gemm", ["x", "B"], ["h"], name="gemm"), bn_node("h", "y", ["g", "b", "m", "v"],
                                                                             eps=0.0)]
    params = [init("B", a), init("g", np.ones(4, np.float16)), init("b", np.zeros(4, np.float16)),
              init("m", np.full(4, -1000.0, np.float16)), init("v", var.astype(np.float16))]
    m = model(nodes, [vi("x", [2, 3], TensorProto.FLOAT16)], [out("y", 2, TensorProto.FLOAT16)], params)
    r = normswap.convert(m, to="fold", validate=False)
    assert r.report.layers[0].action == "kept" and "Gemm's bias" in r.report.layers[0].reason
    # the same layer with a harmless mean folds
    _set(m, "m", np.zeros(4))
    assert normswap.convert(m, to="fold", validate=False).report.layers[0].action == "folded"


def test_weight_norm_magnitude_beyond_fp16_stays_folded_with_the_reason():
    m = _fp16_conv_bn(100.0, weight=200.0)  # folded weights 2e4 fit; 36 per channel: ||v|| = 1.2e5 does not
    r = normswap.convert(m, to="weight", validate=False)
    layer = r.report.layers[0]
    assert layer.action == "converted" and "weight norm not applied" in layer.reason
    assert "ReduceL2" not in ops(r.model)
    small = normswap.convert(_fp16_conv_bn(2.0, weight=1.0), to="weight", validate=False)
    assert "ReduceL2" in ops(small.model)
