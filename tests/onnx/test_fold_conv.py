"""fold_conv: Conv / ConvTranspose (1-3D, grouped, depthwise, with and without bias, through a bias Add)."""
import numpy as np
import onnx
import pytest
from onnx import helper

import normswap
from tests.builders import bn_node, bn_params, conv_bn, feed, init, model, ops, out, run, vi


def _folds_exactly(m, rng, rtol=1e-5):
    result = normswap.convert(m, to="fold", validate=False)
    out = result.model
    onnx.checker.check_model(out)
    onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True)
    assert "BatchNormalization" not in ops(out)
    feeds = feed(m, rng)
    ref, got = run(m, feeds)[0], run(out, feeds)[0]
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-5 * np.abs(ref).max())
    return result


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4)])  # plain, grouped, depthwise
@pytest.mark.parametrize("bias", [True, False])
def test_conv_folds(dims, group, cin, cout, bias):
    rng = np.random.default_rng(dims * 10 + group)
    r = _folds_exactly(conv_bn(rng, dims=dims, cin=cin, cout=cout, group=group, bias=bias), rng)
    assert [layer.action for layer in r.report.layers] == ["folded"]
    assert r.report.layers[0].rule == "fold_conv"


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("group,cin,cout", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (2, 6, 4)])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_transpose_folds_along_output_axis_per_group(dims, group, cin, cout, bias):
    # regression: ultralytics#25364 / pytorch#180995 / onnxsim#228 scaled the wrong weight axis
    rng = np.random.default_rng(100 + dims * 10 + group)
    r = _folds_exactly(conv_bn(rng, dims=dims, cin=cin, cout=cout, group=group, bias=bias, transpose=True), rng)
    assert r.report.layers[0].action == "folded"


def _conv_add_bn(rng, bias_shape):
    names, params = bn_params(6, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "b"], ["a"]),
             bn_node("a", "y", names)]
    return model(nodes, [vi("x", [2, 4, 5, 5])], [out("y", 4)],
                 [init("W", rng.standard_normal((6, 4, 3, 3)).astype(np.float32)),
                  init("b", rng.standard_normal(bias_shape).astype(np.float32))] + params)


@pytest.mark.parametrize("bias_shape", [(6, 1, 1), (1, 6, 1, 1), (1,)])
def test_conv_with_bias_add_between_folds_and_removes_the_add(bias_shape):
    rng = np.random.default_rng(1)
    r = _folds_exactly(_conv_add_bn(rng, bias_shape), rng)
    assert ops(r.model) == ["Conv"]


def test_bias_add_that_is_not_per_channel_is_not_folded():
    r = normswap.convert(_conv_add_bn(np.random.default_rng(2), (6, 5, 5)), to="fold")
    assert r.report.layers[0].action == "affine"
    assert "not a per-channel bias" in r.report.layers[0].reason
    assert r.report.passed


def test_conv_output_with_another_consumer_falls_back_to_affine():
    rng = np.random.default_rng(3)
    m = conv_bn(rng, extra_consumer=True)
    r = normswap.convert(m, to="fold")
    layer = r.report.layers[0]
    assert layer.action == "affine" and "other consumer" in layer.reason
    assert r.report.passed and len(r.report.validation.outputs) == 2  # the conv output is unchanged too


def test_shared_weight_is_cloned_so_the_other_conv_is_unchanged():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    names, params = bn_params(4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c1"], pads=[1, 1, 1, 1]), bn_node("c1", "y1", names),
             helper.make_node("Conv", ["x", "W"], ["y2"], pads=[1, 1, 1, 1], name="other")]
    m = model(nodes, [vi("x", [2, 4, 5, 5])], [out("y1", 4), out("y2", 4)], [init("W", w)] + params)
    r = normswap.convert(m, to="fold")
    assert r.report.layers[0].action == "folded" and r.report.passed
    other = next(n for n in r.model.graph.node if n.name == "other")
    assert other.input[1] == "W"
    kept = next(t for t in r.model.graph.initializer if t.name == "W")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(kept), w)


def test_non_constant_weight_is_not_folded():
    rng = np.random.default_rng(5)
    names, params = bn_params(4, rng)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), bn_node("c", "y", names)]
    m = model(nodes, [vi("x", [2, 4, 5, 5]), vi("w", [4, 4, 1, 1])], [out("y", 4)], params)
    r = normswap.convert(m, to="fold")
    assert r.report.layers[0].action == "affine" and "weight is not constant" in r.report.layers[0].reason
    assert r.report.passed


def test_node_own_epsilon_is_used():  # regression: Paddle-Lite#9861
    rng = np.random.default_rng(6)
    r = _folds_exactly(conv_bn(rng, eps=0.5), rng)
    assert r.report.layers[0].action == "folded"


def test_fp16_weights_fold_in_float64_and_cast_once():
    rng = np.random.default_rng(7)
    m = conv_bn(rng, dtype=np.float16)
    r = normswap.convert(m, to="fold")
    assert r.report.layers[0].action == "folded" and r.report.passed
    w = next(t for t in r.model.graph.initializer if "weight" in t.name)
    assert w.data_type == onnx.TensorProto.FLOAT16


def test_inconsistent_conv_transpose_group_is_not_folded():
    rng = np.random.default_rng(8)
    m = conv_bn(rng, cin=4, cout=6, group=2, transpose=True)
    next(a for a in m.graph.node[0].attribute if a.name == "group").i = 3  # 4 input channels, 3 groups
    from normswap.onnx.convert import convert_in_place
    record = convert_in_place(m, "fold").records[0]  # the rule's guard, below the admission check
    assert record.action != "folded" and "group=3" in record.reason
    with pytest.raises(normswap.InvalidModelError, match="onnxruntime refuses it"):
        normswap.convert(m, to="fold", validate=False)
