"""The torch executor of ONNX graphs (normswap/onnx/torch_executor.py) equals onnxruntime on every operator it
claims, refuses by name what it cannot run, and maps trainable tensors back to their initializers."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from normswap.errors import UnsupportedError  # noqa: E402
from normswap.onnx.torch_executor import OnnxModule, run_numpy, unsupported  # noqa: E402
from tests.builders import model, out, paddle_style, run, vi  # noqa: E402

R = np.random.default_rng(0)
X4 = R.standard_normal((2, 3, 6, 6)).astype(np.float32)
W = R.standard_normal((4, 3, 3, 3)).astype(np.float32)
WT = R.standard_normal((3, 2, 3, 3)).astype(np.float32)
C3 = [R.uniform(0.5, 1.5, 3).astype(np.float32) for _ in range(4)]
I64 = (lambda *v: np.array(v, np.int64))

# (op, attributes, constant inputs after x (None: an omitted optional input), x, opset)
CASES = [
    ("Conv", dict(kernel_shape=[3, 3], pads=[1, 0, 2, 1], strides=[2, 1]), [W], X4, 17),
    ("Conv", dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", group=1), [W, C3[0][:3].repeat(2)[:4]], X4, 17),
    ("ConvTranspose", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 0]),
     [WT], X4, 17),
    ("ConvTranspose", dict(kernel_shape=[3, 3], strides=[2, 2], output_shape=[12, 11]), [WT], X4, 17),
    ("MaxPool", dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0]), [], X4, 17),
    ("MaxPool", dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1), [], X4[:, :, :5, :5], 17),
    ("AveragePool", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=0), [], X4, 17),
    ("AveragePool", dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1), [], X4, 17),
    ("GlobalAveragePool", {}, [], X4, 17),
    ("BatchNormalization", dict(epsilon=1e-3, momentum=0.9), C3, X4, 11),
    ("InstanceNormalization", {}, C3[:2], X4, 17),
    ("LayerNormalization", dict(axis=1), [np.ones((3, 6, 6), np.float32), np.zeros((3, 6, 6), np.float32)], X4, 17),
    ("GroupNormalization", dict(num_groups=3), C3[:2], X4, 21),
    ("Gemm", dict(transB=1, alpha=0.5, beta=2.0), [R.standard_normal((5, 4)).astype(np.float32),
                                                    R.standard_normal(5).astype(np.float32)],
     R.standard_normal((3, 4)).astype(np.float32), 17),
    ("MatMul", {}, [R.standard_normal((6, 2)).astype(np.float32)], X4, 17),
    ("HardSigmoid", dict(alpha=0.1667, beta=0.5), [], X4, 17),
    ("HardSwish", {}, [], X4, 17),
    ("Clip", {}, [np.float32(-0.5), np.float32(0.7)], X4, 13),
    ("Clip", dict(min=-0.2, max=0.3), [], X4, 9),
    ("LeakyRelu", dict(alpha=0.2), [], X4, 17),
    ("Softmax", dict(axis=1), [], X4, 13),
    ("Softmax", dict(axis=1), [], X4, 11),
    ("ReduceMean", dict(axes=[2, 3], keepdims=0), [], X4, 13),
    ("ReduceSum", dict(keepdims=1), [I64(1)], X4, 13),
    ("Reshape", {}, [I64(0, -1, 4)], X4, 13),
    ("Transpose", dict(perm=[0, 2, 3, 1]), [], X4, 13),
    ("Flatten", dict(axis=2), [], X4, 13),
    ("Squeeze", {}, [I64(0)], X4[:1], 13),
    ("Unsqueeze", {}, [I64(0, -1)], X4, 13),
    ("Slice", {}, [I64(1, 0), I64(-1, 100), I64(3, 1), I64(1, 2)], X4, 13),
    ("Slice", {}, [I64(-1), I64(-100), I64(3), I64(-2)], X4, 13),
    ("Gather", dict(axis=1), [I64(2, 0, -1)], X4, 13),
    ("Pad", dict(mode="constant"), [I64(0, 0, 1, 2, 0, 0, 2, 1), np.float32(0.5)], X4, 13),
    ("Pad", dict(mode="reflect"), [I64(0, 0, 1, 1, 0, 0, 1, 1)], X4, 13),
    ("Resize", dict(mode="nearest"), [None, np.array([1, 1, 2, 2], np.float32)], X4, 13),
    ("Resize", dict(mode="linear"), [None, np.array([1, 1, 2, 1.5], np.float32)], X4, 13),
    ("Resize", dict(mode="linear", coordinate_transformation_mode="align_corners"), [None, None, I64(2, 3, 9, 4)],
     X4, 13),
    ("Resize", dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
     [None, np.array([1, 1, 3, 2], np.float32)], X4, 13),
    ("Cast", dict(to=TensorProto.DOUBLE), [], X4, 13),
    ("Pow", {}, [np.float32(2.0)], X4, 13),
    ("Div", {}, [np.float32(3.0)], X4, 13),
    ("Where", {}, [X4 * 0 + 1, X4 * 2], X4 > 0, 13),
    ("Split", dict(axis=1), [I64(1, 2)], X4, 13),
    ("Concat", dict(axis=1), [X4], X4, 13),
    ("Expand", {}, [I64(2, 3, 6, 6)], X4[:1, :, :1], 13),
    ("Erf", {}, [], X4, 13),
    ("Sqrt", {}, [], np.abs(X4), 13),
    *[(op, {}, [], X4, 13) for op in ("Relu", "Sigmoid", "Tanh", "Exp", "Neg", "Abs", "Floor", "Ceil", "Identity",
                                      "Softplus", "GlobalMaxPool")],
    ("Log", {}, [], np.abs(X4) + 0.1, 13),
    ("Reciprocal", {}, [], np.abs(X4) + 0.5, 13),
    ("Elu", dict(alpha=0.7), [], X4, 13),
    ("Dropout", {}, [], X4, 13),
    ("PRelu", {}, [np.full((3, 1, 1), 0.25, np.float32)], X4, 13),
    *[(op, {}, [X4[::-1].copy()], X4, 13) for op in ("Add", "Sub", "Mul", "Max", "Min", "Sum", "Equal", "Greater",
                                                     "Less")],
    *[(op, {}, [X4 < 0.3], X4 > 0, 13) for op in ("And", "Or")],
    ("Not", {}, [], X4 > 0, 13),
    ("LogSoftmax", dict(axis=-1), [], X4, 13),
    ("ReduceMax", dict(axes=[1], keepdims=1), [], X4, 13),
    ("ReduceMin", dict(axes=[0, 2], keepdims=0), [], X4, 13),
    ("Shape", dict(start=1), [], X4, 15),
    ("ConstantOfShape", dict(value=numpy_helper.from_array(np.array([1.5], np.float32))), [], I64(2, 3), 13),
    ("Range", {}, [np.float32(7.0), np.float32(0.5)], np.float32(1.0), 13),
    ("Tile", {}, [I64(1, 2, 1, 3)], X4, 13),
    ("CastLike", {}, [np.zeros(1, np.float64)], X4, 15),
    ("Upsample", dict(mode="nearest"), [np.array([1, 1, 2, 2], np.float32)], X4, 9),
]


def _model(op, attrs, consts, x, opset):
    names, inits = ["x"], []
    for k, c in enumerate(consts):
        if c is None:
            names.append("")
            continue
        names.append(f"c{k}")
        inits.append(numpy_helper.from_array(np.asarray(c), f"c{k}"))
    outputs = ["y", "y2"] if op == "Split" else ["y"]
    node = helper.make_node(op, names, outputs, **attrs)
    x = np.asarray(x)
    elem = helper.np_dtype_to_tensor_dtype(x.dtype)
    return model([node], [vi("x", list(x.shape), elem)],
                 [onnx.ValueInfoProto(name=o) for o in outputs], inits, opset=opset)


def test_every_claimed_operator_has_a_case():
    from normswap.onnx.torch_executor import SUPPORTED
    assert SUPPORTED - {"Constant"} <= {c[0] for c in CASES}


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{k}" for k, c in enumerate(CASES)])
def test_each_claimed_operator_equals_onnxruntime(case):
    op, attrs, consts, x, opset = case
    x = np.asarray(x)
    m = _model(op, attrs, consts, x, opset)
    expected = run(m, {"x": x})
    got = list(run_numpy(OnnxModule(m), {"x": x}).values())
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape, (op, g.shape, e.shape)
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", ["map", "sequence", "classes"])
def test_whole_models_with_real_export_traits_equal_onnxruntime_in_float32_and_float64(head):
    m = paddle_style(np.random.default_rng(0), head, 11)
    x = {"x": np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float32)}
    expected = run(m, x)[0]
    for dtype in (torch.float32, torch.float64):
        got = list(run_numpy(OnnxModule(m, dtype=dtype), x).values())[0]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_what_it_cannot_run_is_refused_by_name():
    loop_body = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "b", [vi("x", [1])], [vi("y", [1])])
    cases = [
        model([helper.make_node("Einsum", ["x", "x"], ["y"], equation="ij,ij->i")], [vi("x", [2, 2])], [out("y", 1)]),
        model([helper.make_node("FusedConv", ["x"], ["y"], domain="com.microsoft")], [vi("x", [2, 2])],
              [out("y", 2)]),
        model([helper.make_node("If", ["c"], ["y"], then_branch=loop_body, else_branch=loop_body)],
              [vi("c", [], TensorProto.BOOL)], [out("y", 1)]),
    ]
    for m, name in zip(cases, ("Einsum", "com.microsoft.FusedConv", "If")):
        assert unsupported(m) == [name]
        with pytest.raises(UnsupportedError, match=name.split(" ")[0]):
            OnnxModule(m)


def test_trainable_initializers_get_gradients_and_come_back_by_name():
    m = paddle_style(np.random.default_rng(0), "classes", 13)
    names = [t.name for t in m.graph.initializer]
    module = OnnxModule(m, trainable=names)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32))
    module(x=x)[0].square().sum().backward()
    assert all(getattr(module, module.slots[n]).grad is not None for n in names)
    with torch.no_grad():
        getattr(module, module.slots["fc_0.w_0"]).mul_(2)
    arrays = module.initializer_arrays()
    stored = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    assert set(arrays) == set(names)
    for name, value in arrays.items():
        assert value.shape == stored[name].shape and value.dtype == stored[name].dtype
    np.testing.assert_allclose(arrays["fc_0.w_0"], 2 * stored["fc_0.w_0"])
    frozen = OnnxModule(m)
    assert not list(frozen.parameters()) and frozen.initializer_arrays() == {}
    with pytest.raises(UnsupportedError, match="not initializers"):
        OnnxModule(m, trainable=["batch_norm_0.w_0"])  # a Constant node's value, not an initializer
