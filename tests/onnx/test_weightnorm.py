"""weight: fold, then weight = g * v / ||v|| per output channel -- exact."""
import numpy as np
import onnx
import pytest
from onnx import helper

import normswap
from tests.builders import bn_node, bn_params, conv_bn, init, model, ops, out, vi


@pytest.mark.parametrize("transpose,group", [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_conv_weight_norm_is_exact(transpose, group):
    rng = np.random.default_rng(group)
    m = conv_bn(rng, cin=4, cout=6, group=group, transpose=transpose)
    r = normswap.convert(m, to="weight")
    assert r.report.exact and r.report.validation.check == "exact" and r.report.passed
    layer = r.report.layers[0]
    assert layer.action == "converted" and layer.rule == "weight_fold_conv"
    assert "ReduceL2" in ops(r.model) and "BatchNormalization" not in ops(r.model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in r.model.graph.initializer}
    g = next(v for k, v in inits.items() if k.endswith("weight_g"))
    v = next(v for k, v in inits.items() if "weight_bnfolded" in k)
    axes = tuple(k for k in range(v.ndim) if k != (1 if transpose else 0))
    np.testing.assert_allclose(g, np.sqrt((v.astype(np.float64) ** 2).sum(axes, keepdims=True)), rtol=1e-6)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
@pytest.mark.parametrize("opset", [13, 18])
def test_matrix_weight_norm_is_exact_at_each_opset(op, opset):
    rng = np.random.default_rng(7)
    names, params = bn_params(5, rng)
    attrs = {"transB": 1} if op == "Gemm" else {}
    w = rng.standard_normal((5, 4) if op == "Gemm" else (4, 5)).astype(np.float32)
    nodes = [helper.make_node(op, ["a", "W"], ["p"], **attrs), bn_node("p", "y", names)]
    m = model(nodes, [vi("a", [3, 4])], [out("y", 2)], [init("W", w)] + params, opset=opset)
    r = normswap.convert(m, to="weight")
    assert r.report.passed and r.report.layers[0].action == "converted"
    assert r.model.opset_import[0].version == opset
    onnx.checker.check_model(r.model)


def test_all_zero_output_channel_keeps_the_fold_without_weight_norm():
    rng = np.random.default_rng(8)
    m = conv_bn(rng, cin=4, cout=6)
    w = onnx.numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[2] = 0
    m.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w, "W"))
    r = normswap.convert(m, to="weight")
    assert r.report.passed and "all zeros" in r.report.layers[0].reason and "ReduceL2" not in ops(r.model)


def test_bn_without_foldable_producer_becomes_affine_under_weight():
    rng = np.random.default_rng(9)
    names, params = bn_params(4, rng)
    m = model([helper.make_node("Relu", ["x"], ["h"]), bn_node("h", "y", names)], [vi("x", [2, 4, 3])],
              [out("y", 3)], params)
    r = normswap.convert(m, to="weight")
    assert r.report.layers[0].action == "affine" and "Relu" in r.report.layers[0].reason and r.report.passed
