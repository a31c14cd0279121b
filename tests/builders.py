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


def broken_fold(folded: onnx.ModelProto, conv_name: str, kind: str) -> onnx.ModelProto:
    """A copy of ``folded`` with one output channel of the conv named ``conv_name`` negated ("negated"), scaled by
    1.01 ("scaled"), or two output channels exchanged ("swapped") -- the wrong folds a check must catch."""
    m = onnx.ModelProto()
    m.CopyFrom(folded)
    node = next(n for n in m.graph.node if n.name == conv_name)
    inits = {t.name: t for t in m.graph.initializer}
    for idx, name in enumerate(node.input[1:3]):
        if name not in inits:
            continue
        a = numpy_helper.to_array(inits[name]).copy()
        axis = 1 if node.op_type == "ConvTranspose" and idx == 0 else 0
        a = np.moveaxis(a, axis, 0)
        if kind == "negated":
            a[0] = -a[0]
        elif kind == "scaled":
            a[0] *= 1.01
        elif kind == "swapped":
            a[[0, 1]] = a[[1, 0]]
        else:
            raise ValueError(kind)
        inits[name].CopyFrom(numpy_helper.from_array(np.moveaxis(a, 0, axis), name))
    return m


def _constant(name: str, array) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name))


def paddle_style(rng: np.random.Generator, head: str = "map", opset: int = 11, ir: int = 7,
                 inits_as_inputs: bool = False, n: int = 1) -> onnx.ModelProto:
    """A model with the traits of paddle2onnx exports: BatchNormalization with a ``momentum`` attribute (training
    mode to onnx's reference evaluator below opset 14), Paddle names (``conv2d_0.w_0``, ``batch_norm_0.tmp_2``),
    BN parameters in Constant nodes, a bias Add between a Conv and its BN, a dynamic batch written as -1, and a head:
    ``map`` -- ConvTranspose (stride 2) -> BN -> 1x1 Conv -> Sigmoid, a probability map (N, 1, 32, 32);
    ``sequence`` -- per-column scores (N, T=16, K=12) after a Softmax; ``classes`` -- (N, 5) class scores.
    ``inits_as_inputs``: weights also listed among the graph inputs (IR < 4 exports)."""
    nodes, inits = [], []
    bn_count = [0]

    def conv(x, cin, cout, k, stride=1, bias_add=False, op="Conv"):
        i = len([t for t in inits if t.name.endswith(".w_0")])
        w_shape = (cin, cout, k, k) if op == "ConvTranspose" else (cout, cin, k, k)
        w = (rng.standard_normal(w_shape) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        inits.append(init(f"conv2d_{i}.w_0", w))
        y = f"conv2d_{i}.tmp_0"
        pads = [0] * 4 if op == "ConvTranspose" else [k // 2] * 4
        nodes.append(helper.make_node(op, [x, f"conv2d_{i}.w_0"], [y], name=f"{op}@{i}", kernel_shape=[k, k],
                                      strides=[stride, stride], pads=pads))
        if bias_add:
            inits.append(init(f"conv2d_{i}.b_0", rng.uniform(-0.1, 0.1, (1, cout, 1, 1)).astype(np.float32)))
            nodes.append(helper.make_node("Add", [y, f"conv2d_{i}.b_0"], [f"conv2d_{i}.tmp_1"], name=f"Add@{i}"))
            y = f"conv2d_{i}.tmp_1"
        return y

    def bn(x, c):
        j = bn_count[0]
        bn_count[0] += 1
        names = [f"batch_norm_{j}.{p}" for p in ("w_0", "b_0", "w_1", "w_2")]
        values = (rng.uniform(0.5, 1.5, c), rng.uniform(-0.5, 0.5, c), rng.uniform(-0.2, 0.2, c),
                  rng.uniform(0.5, 2.0, c))
        for name, v in zip(names, values):
            nodes.append(_constant(name, v.astype(np.float32)))
        y = f"batch_norm_{j}.tmp_2"
        nodes.append(helper.make_node("BatchNormalization", [x] + names, [y], name=f"BatchNormalization@{j}",
                                      epsilon=1e-5, momentum=0.9))
        r = f"relu_{j}.tmp_0"
        nodes.append(helper.make_node("Relu", [y], [r]))
        return r

    h = bn(conv("x", 3, 8, 3, bias_add=True), 8)
    h = bn(conv(h, 8, 8, 3), 8)
    if head == "map":
        h = bn(conv(h, 8, 4, 2, stride=2, op="ConvTranspose"), 4)
        nodes.append(helper.make_node("Sigmoid", [conv(h, 4, 1, 1)], ["sigmoid_0.tmp_0"]))
        output, out_shape = "sigmoid_0.tmp_0", [-1, 1, 32, 32]
    elif head == "sequence":
        h = conv(h, 8, 12, 3)  # (N, 12, 16, 16): 12 classes at 16 columns, averaged over the rows
        nodes.append(helper.make_node("ReduceMean", [h], ["pool_0.tmp_0"], axes=[2], keepdims=0))
        nodes.append(helper.make_node("Transpose", ["pool_0.tmp_0"], ["transpose_0.tmp_0"], perm=[0, 2, 1]))
        nodes.append(helper.make_node("Softmax", ["transpose_0.tmp_0"], ["softmax_0.tmp_0"], axis=2))
        output, out_shape = "softmax_0.tmp_0", [-1, 16, 12]
    else:
        nodes.append(helper.make_node("GlobalAveragePool", [h], ["pool_0.tmp_0"]))
        nodes.append(helper.make_node("Flatten", ["pool_0.tmp_0"], ["flatten_0.tmp_0"], axis=1))
        inits.append(init("fc_0.w_0", rng.standard_normal((8, 5)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["flatten_0.tmp_0", "fc_0.w_0"], ["fc_0.tmp_0"]))
        output, out_shape = "fc_0.tmp_0", [-1, 5]
    inputs = [vi("x", [-1, 3, 16, 16])]
    if inits_as_inputs:
        inputs += [vi(t.name, list(t.dims)) for t in inits]
    m = model(nodes, inputs, [vi(output, out_shape)], inits, opset=opset, ir=ir, producer_name="PaddlePaddle")
    return m


def count_original_runs(setattr_) -> list:
    """Instrument ONNX calibration so that every run of a session holding the original's segments (alone, or
    fused with a single conversion's) appends to the returned list. ``setattr_``: how to patch (pytest's
    ``monkeypatch.setattr``, or ``setattr`` for a whole process)."""
    from normswap.onnx import calibrate
    calls, original = [], []  # the sessions themselves: kept alive, so no id is reused
    session, run = calibrate._Runner.session, calibrate._run_bound

    def opening(self, *args, **kwargs):
        opened = session(self, *args, **kwargs)
        if self.tag == "r":
            original.append(opened)
        return opened

    def counting(opened, *args, **kwargs):
        if any(opened is o for o in original):
            calls.append(1)
        return run(opened, *args, **kwargs)
    setattr_(calibrate._Runner, "session", opening)
    setattr_(calibrate, "_run_bound", counting)
    return calls
