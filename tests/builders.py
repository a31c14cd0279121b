"""Tiny ONNX models built in tests, and helpers to run them in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR = 8  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14 by default
OPSET = 17


def model(nodes, inputs, outputs, initializers=(), opset=OPSET, ir=IR, **kw) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs), list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir, **kw)
    return m


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def out(name, rank, elem=TensorProto.FLOAT):
    """An output of known rank and unknown dimensions."""
    return helper.make_tensor_value_info(name, elem, [None] * rank)


def init(name, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def bn_params(c: int, rng: np.random.Generator, prefix: str = "bn", dtype=np.float32):
    """Non-trivial BN parameters (gamma, beta, mean, var) as initializers."""
    values = (rng.uniform(0.5, 1.5, c), rng.uniform(-1, 1, c), rng.uniform(-1, 1, c), rng.uniform(0.5, 2.0, c))
    names = [f"{prefix}.{k}" for k in ("gamma", "beta", "mean", "var")]
    return names, [init(n, v.astype(dtype)) for n, v in zip(names, values)]


def bn_node(x: str, y: str, names, name="bn", eps=1e-5, **attrs):
    return helper.make_node("BatchNormalization", [x] + list(names), [y], name=name, epsilon=eps, **attrs)


def run(m: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 4
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def conv_bn(rng, *, dims=2, cin=4, cout=6, group=1, bias=True, transpose=False, k=3, eps=1e-5,
            extra_consumer=False, dtype=np.float32):
    """x -> Conv[Transpose] -> BN -> y  (optionally the conv output is also a graph output)."""
    op = "ConvTranspose" if transpose else "Conv"
    if transpose:
        w = rng.standard_normal((cin, cout // group) + (k,) * dims).astype(dtype)
    else:
        w = rng.standard_normal((cout, cin // group) + (k,) * dims).astype(dtype)
    inits = [init("W", w)]
    conv_in = ["x", "W"]
    if bias:
        inits.append(init("B", rng.standard_normal(cout).astype(dtype)))
        conv_in.append("B")
    names, params = bn_params(cout, rng)
    nodes = [helper.make_node(op, conv_in, ["c"], name="conv", group=group,
                              pads=[1] * (2 * dims) if not transpose else [0] * (2 * dims)),
             bn_node("c", "y", names, eps=eps)]
    spatial = [5] * dims
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    outputs = [out("y", dims + 2, elem)] + ([out("c", dims + 2, elem)] if extra_consumer else [])
    return model(nodes, [vi("x", [2, cin] + spatial, elem)], outputs, inits + params)


def feed(m: onnx.ModelProto, rng) -> dict:
    feeds = {}
    inits = {t.name for t in m.graph.initializer}
    for i in m.graph.input:
        if i.name in inits:
            continue
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
        feeds[i.name] = rng.standard_normal(shape).astype(dtype)
    return feeds
