"""fold_gemm: Gemm (transA, transB, alpha, beta, C or not) and 2-D MatMul (with or without a bias Add)."""
import numpy as np
import onnx
import pytest
from onnx import helper

import normswap
from tests.builders import bn_node, bn_params, feed, init, model, ops, out, run, vi


def _check(m, rng):
    r = normswap.convert(m, to="fold", validate=False)
    onnx.checker.check_model(r.model)
    feeds = feed(m, rng)
    ref, got = run(m, feeds)[0], run(r.model, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    return r


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (5,), (1, 5), (3, 5)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.5, 0.0)])
def test_gemm_folds(trans_a, trans_b, c_shape, alpha, beta):
    rng = np.random.default_rng(trans_a * 2 + trans_b)
    b = rng.standard_normal((5, 4) if trans_b else (4, 5)).astype(np.float32)
    inits = [init("B", b)]
    gemm_in = ["a", "B"]
    if c_shape:
        inits.append(init("C", rng.standard_normal(c_shape).astype(np.float32)))
        gemm_in.append("C")
    names, params = bn_params(5, rng)
    nodes = [helper.make_node("Gemm", gemm_in, ["g"], transA=trans_a, transB=trans_b, alpha=alpha, beta=beta),
             bn_node("g", "y", names)]
    m = model(nodes, [vi("a", [4, 3] if trans_a else [3, 4])], [out("y", 2)], inits + params)
    r = _check(m, rng)
    assert ops(r.model) == ["Gemm"] and r.report.layers[0].rule == "fold_gemm"


@pytest.mark.parametrize("with_add", [False, True])
def test_matmul_2d_folds_without_growing(with_add):
    rng = np.random.default_rng(10)
    names, params = bn_params(5, rng)
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"])]
    inits = [init("W", rng.standard_normal((4, 5)).astype(np.float32))] + params
    if with_add:
        nodes.append(helper.make_node("Add", ["m", "b"], ["m2"]))
        inits.append(init("b", rng.standard_normal(5).astype(np.float32)))
    nodes.append(bn_node(nodes[-1].output[0], "y", names))
    m = model(nodes, [vi("a", [3, 4])], [out("y", 2)], inits)
    r = _check(m, rng)
    assert ops(r.model) == ["MatMul", "Add"]
    assert r.report.layers[0].action == "folded"


def test_matmul_3d_is_left_to_affine():
    # (B, T, K) @ (K, N): BN normalizes axis 1 (T), not the weight's output axis
    rng = np.random.default_rng(11)
    names, params = bn_params(3, rng)
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"]), bn_node("m", "y", names)]
    m = model(nodes, [vi("a", [2, 3, 4])], [out("y", 3)],
              [init("W", rng.standard_normal((4, 5)).astype(np.float32))] + params)
    r = normswap.convert(m, to="fold")
    layer = r.report.layers[0]
    assert layer.action == "affine" and "3-D" in layer.reason
    assert r.report.passed


def test_gemm_with_non_constant_weight_is_not_folded():
    rng = np.random.default_rng(12)
    names, params = bn_params(5, rng)
    nodes = [helper.make_node("Gemm", ["a", "b"], ["g"]), bn_node("g", "y", names)]
    m = model(nodes, [vi("a", [3, 4]), vi("b", [4, 5])], [out("y", 2)], params)
    r = normswap.convert(m, to="fold")
    assert r.report.layers[0].action == "affine" and "weight is not constant" in r.report.layers[0].reason
    assert r.report.passed
