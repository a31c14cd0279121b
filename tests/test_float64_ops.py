"""The float64 yardstick's own operators (validate/float64_ops.py) compute what onnxruntime computes: Conv and
ConvTranspose (1-3D, groups, strides, dilations, pads, auto_pad, output_padding / output_shape), MaxPool /
AveragePool, and BatchNormalization in inference mode whatever its attributes; and they stop at the deadline."""
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from normswap.validate.float64_ops import Deadline, DeadlineExceeded, float64_ops
from tests.builders import model, run, vi

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _one_node(op, x, weights, opset=17, **attrs):
    names = ["x"] + [f"w{k}" for k in range(len(weights))]
    node = helper.make_node(op, names, ["y"], **attrs)
    inits = [numpy_helper.from_array(w, f"w{k}") for k, w in enumerate(weights)]
    return model([node], [vi("x", list(x.shape))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                 inits, opset=opset)


def _ours(m, x):
    return ReferenceEvaluator(m, new_ops=float64_ops(Deadline())).run(None, {"x": x})[0]


def _ort_or_none(m, x):
    try:
        return run(m, {"x": x})[0]
    except Exception:  # noqa: BLE001 -- a configuration onnxruntime itself refuses: nothing to compare
        return None


@st.composite
def conv_case(draw, transpose):
    nd = draw(st.integers(1, 3))
    g = draw(st.sampled_from([1, 2, 3]))
    cin, cout = g * draw(st.integers(1, 3)), g * draw(st.integers(1, 3))
    k = [draw(st.integers(1, 3)) for _ in range(nd)]
    s = [draw(st.integers(1, 2)) for _ in range(nd)]
    d = [draw(st.integers(1, 2)) for _ in range(nd)]
    size = [draw(st.integers(4, 8)) for _ in range(nd)]
    auto = draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    attrs = dict(kernel_shape=k, strides=s, dilations=d, group=g)
    if auto == "NOTSET":
        attrs["pads"] = [draw(st.integers(0, kk - 1)) for kk in k] * 2
    else:
        attrs["auto_pad"] = auto
    if transpose and draw(st.booleans()):
        attrs["output_padding"] = [draw(st.integers(0, max(0, min(ss, dd) - 1))) for ss, dd in zip(s, d)]
    if transpose and auto == "NOTSET" and draw(st.booleans()):
        attrs.pop("pads")
        attrs["output_shape"] = [sz * ss for sz, ss in zip(size, s)]
    seed = draw(st.integers(0, 2**16))
    return nd, cin, cout, g, k, size, attrs, seed, draw(st.booleans())


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose"])
@SETTINGS
@given(data=st.data())
def test_conv_equals_onnxruntime(op, data):
    nd, cin, cout, g, k, size, attrs, seed, bias = data.draw(conv_case(op == "ConvTranspose"))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal([2, cin] + size).astype(np.float32)
    w_shape = [cin, cout // g] + k if op == "ConvTranspose" else [cout, cin // g] + k
    weights = [rng.standard_normal(w_shape).astype(np.float32)]
    if bias:
        weights.append(rng.standard_normal(cout).astype(np.float32))
    m = _one_node(op, x, weights, **attrs)
    expected = _ort_or_none(m, x)
    assume(expected is not None)
    got = _ours(m, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@SETTINGS
@given(data=st.data())
def test_pooling_equals_onnxruntime(data):
    nd = data.draw(st.integers(1, 3))
    op = data.draw(st.sampled_from(["AveragePool", "MaxPool"]))
    k = [data.draw(st.integers(1, 3)) for _ in range(nd)]
    attrs = dict(kernel_shape=k, strides=[data.draw(st.integers(1, 2)) for _ in range(nd)])
    auto = data.draw(st.sampled_from(["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
    if auto == "NOTSET":
        attrs["pads"] = [data.draw(st.integers(0, kk - 1)) for kk in k] * 2
    else:
        attrs["auto_pad"] = auto
    if op == "AveragePool":
        attrs["count_include_pad"] = data.draw(st.integers(0, 1))
    x = np.random.default_rng(data.draw(st.integers(0, 999))).standard_normal(
        [2, 3] + [data.draw(st.integers(4, 8)) for _ in range(nd)]).astype(np.float32)
    m = _one_node(op, x, [], **attrs)
    expected = _ort_or_none(m, x)
    assume(expected is not None)
    np.testing.assert_allclose(_ours(m, x), expected, atol=1e-5)


@pytest.mark.parametrize("opset,attrs", [(9, {"momentum": 0.9}), (11, {"momentum": 0.5}), (14, {"momentum": 0.9}),
                                         (15, {})])
def test_batchnorm_is_evaluated_in_inference_mode(opset, attrs):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4, 3, 3)).astype(np.float32) * 3 + 2  # batch statistics far from the running ones
    params = [rng.uniform(0.5, 1.5, 4), rng.uniform(-1, 1, 4), rng.uniform(-1, 1, 4), rng.uniform(0.5, 2, 4)]
    m = _one_node("BatchNormalization", x, [p.astype(np.float32) for p in params], opset=opset, **attrs)
    expected = run(m, {"x": x})[0]
    np.testing.assert_allclose(_ours(m, x), expected, atol=1e-5)
    one = _ours(m, x[:1])  # a sample's output does not depend on the batch it sits in
    np.testing.assert_allclose(one, _ours(m, x)[:1], atol=1e-12)


def test_training_mode_batchnorm_uses_the_batch_statistics():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4, 3, 3)).astype(np.float32) * 3 + 2
    params = [np.ones(4, np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32), np.ones(4, np.float32)]
    m = _one_node("BatchNormalization", x, params, opset=15, training_mode=1)
    y = _ours(m, x)
    assert abs(y.mean()) < 1e-6 and abs(y.std() - 1) < 1e-3  # normalized by the batch's own statistics


def test_the_deadline_stops_the_evaluation_between_heavy_nodes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    m = _one_node("Conv", x, [rng.standard_normal((2, 2, 3, 3)).astype(np.float32)], kernel_shape=[3, 3])
    deadline = Deadline()
    evaluator = ReferenceEvaluator(m, new_ops=float64_ops(deadline))
    deadline.start(-1.0)  # already past
    with pytest.raises(DeadlineExceeded):
        evaluator.run(None, {"x": x})
    deadline.start(None)
    assert evaluator.run(None, {"x": x})[0].shape == (1, 2, 4, 4)
