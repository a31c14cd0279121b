"""An ONNX graph run in torch: differentiable, in any float dtype, every tensor traced back to its initializer.

``OnnxModule(model)`` interprets the main graph node by node (eager torch, no tracing), so it runs what the graph
computes -- shape arithmetic included -- in float32 for refinement (gradients reach every initializer named in
``trainable``) or in float64 as the yardstick of exact validation. It claims only the operators in ``OPS``, each
tested against onnxruntime (tests/onnx/test_torch_executor.py); a model with any other operator, a subgraph or a
non-default domain is refused up front, naming what it cannot run (``UnsupportedError``). Initializers and
Constant values become buffers, or parameters when named in ``trainable``; ``initializer_arrays()`` gives the
trained values back, by initializer name, in their stored dtype, for writing into the model (graph, names, opset
untouched). torch is imported only by this module.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ..errors import UnsupportedError
from .conv_geometry import conv_pads, transpose_geometry
from .io import opset_of

Op = Callable[..., list]


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        out[a.name] = value
    return out


def _ints(t) -> list[int]:
    return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]


def _spatial(x, attrs, kernel):
    nd = x.dim() - 2
    return (list(attrs.get("strides", [1] * nd)), list(attrs.get("dilations", [1] * nd)),
            conv_pads(attrs.get("auto_pad", "NOTSET"), attrs.get("pads"), list(x.shape[2:]), kernel,
                      list(attrs.get("strides", [1] * nd)), list(attrs.get("dilations", [1] * nd))))


def _pad_spatial(x, begin, end, value=0.0):
    spec = []
    for b, e in zip(reversed(begin), reversed(end)):
        spec += [b, e]
    return F.pad(x, spec, value=value) if any(spec) else x


def _conv(inputs, attrs, opset):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    strides, dilations, (begin, end) = _spatial(x, attrs, list(w.shape[2:]))
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    return [conv(_pad_spatial(x, begin, end), w, b, strides, 0, dilations, int(attrs.get("group", 1)))]


def _conv_transpose(inputs, attrs, opset):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    nd, kernel = x.dim() - 2, list(w.shape[2:])
    strides, dilations = list(attrs.get("strides", [1] * nd)), list(attrs.get("dilations", [1] * nd))
    full, begin, target = transpose_geometry(list(x.shape[2:]), kernel, strides, dilations,
                                             attrs.get("output_padding"), attrs.get("output_shape"),
                                             attrs.get("pads"), attrs.get("auto_pad", "NOTSET"))
    extra = [f - (strides[i] * (x.shape[2 + i] - 1) + (kernel[i] - 1) * dilations[i] + 1) for i, f in enumerate(full)]
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    if all(e < max(s, d) for e, s, d in zip(extra, strides, dilations)):
        y = conv(x, w, None, strides, 0, extra, int(attrs.get("group", 1)), dilations)
    else:  # output_padding torch refuses: zeros at the end
        y = conv(x, w, None, strides, 0, 0, int(attrs.get("group", 1)), dilations)
        y = _pad_spatial(y, [0] * nd, extra)
    lead = [max(0, -bg) for bg in begin]
    tail = [max(0, bg + t - f) for bg, t, f in zip(begin, target, full)]
    y = _pad_spatial(y, lead, tail)
    index = (slice(None), slice(None)) + tuple(slice(lead[i] + begin[i], lead[i] + begin[i] + target[i])
                                                for i in range(nd))
    y = y[index]
    return [y + b.reshape((-1,) + (1,) * nd) if b is not None else y]


def _pool(kind):
    def run(inputs, attrs, opset):
        x = inputs[0]
        nd = x.dim() - 2
        kernel = list(attrs["kernel_shape"])
        strides, dilations, (begin, end) = _spatial(x, attrs, kernel)
        ceil = bool(attrs.get("ceil_mode", 0))
        if kind == "max":
            pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
            return [pool(_pad_spatial(x, begin, end, -math.inf), kernel, strides, 0, dilations, ceil)]
        if any(d != 1 for d in dilations):
            raise UnsupportedError("AveragePool with dilations is not supported by the torch executor")
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
        total = pool(_pad_spatial(x, begin, end), kernel, strides, 0, ceil, count_include_pad=True,
                     divisor_override=None) * float(np.prod(kernel))
        if attrs.get("count_include_pad", 0):
            ones = _pad_spatial(torch.ones_like(x[:1, :1]), begin, end, 1.0)
        else:
            ones = _pad_spatial(torch.ones_like(x[:1, :1]), begin, end, 0.0)
        count = pool(ones, kernel, strides, 0, ceil, count_include_pad=True) * float(np.prod(kernel))
        return [total / count]
    return run


def _batchnorm(inputs, attrs, opset):
    x, scale, bias, mean, var = inputs[:5]
    if attrs.get("training_mode", 0):
        raise UnsupportedError("BatchNormalization with training_mode=1 is not supported by the torch executor")
    shape = (1, -1) + (1,) * (x.dim() - 2)
    eps = float(attrs.get("epsilon", 1e-5))
    return [(x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * scale.reshape(shape)
            + bias.reshape(shape)]


def _instancenorm(inputs, attrs, opset):
    x, scale, bias = inputs
    axes = tuple(range(2, x.dim()))
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return [(x - mean) / torch.sqrt(var + float(attrs.get("epsilon", 1e-5))) * scale.reshape(shape)
            + bias.reshape(shape)]


def _layernorm(inputs, attrs, opset):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    axis = int(attrs.get("axis", -1)) % x.dim()
    axes = tuple(range(axis, x.dim()))
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    y = (x - mean) / torch.sqrt(var + float(attrs.get("epsilon", 1e-5))) * scale
    return [y + bias if bias is not None else y]


def _groupnorm(inputs, attrs, opset):
    x, scale, bias = inputs
    g = int(attrs["num_groups"])
    n, c = x.shape[:2]
    xg = x.reshape(n, g, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + float(attrs.get("epsilon", 1e-5)))).reshape(x.shape)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if opset < 21:  # opset 18's per-group scale and bias
        scale, bias = scale.repeat_interleave(c // g), bias.repeat_interleave(c // g)
    return [y * scale.reshape(shape) + bias.reshape(shape)]


def _gemm(inputs, attrs, opset):
    a, b = inputs[0], inputs[1]
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    y = float(attrs.get("alpha", 1.0)) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + float(attrs.get("beta", 1.0)) * inputs[2]
    return [y]


def _axes(inputs, attrs, k=1):
    """Axes from the attribute (older opsets) or the k-th input (newer)."""
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(inputs) > k and inputs[k] is not None and inputs[k].numel():
        return _ints(inputs[k])
    return None


def _reduce(fn):
    def run(inputs, attrs, opset):
        x = inputs[0]
        axes = _axes(inputs, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if axes is None:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, tuple(a % x.dim() for a in axes), keep)]
    return run


def _reshape(inputs, attrs, opset):
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return [x.reshape(shape)]


def _slice(inputs, attrs, opset):
    x = inputs[0]
    if opset < 10:
        starts, ends, axes = attrs["starts"], attrs["ends"], attrs.get("axes")
        steps = None
    else:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
        steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
    axes = list(axes) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        a %= x.dim()
        size = x.shape[a]
        if st > 0:
            s = min(max(s + size if s < 0 else s, 0), size)
            e = min(max(e + size if e < 0 else e, 0), size)
            index[a] = slice(s, e, st)
        else:  # negative steps: torch has none; take the forward range and flip it
            s = min(max(s + size if s < 0 else s, -1), size - 1)
            e = min(max(e + size if e < 0 else e, -1), size - 1)
            picked = list(range(s, e, st))
            x = x.index_select(a, torch.tensor(picked, dtype=torch.long)) if picked else x.narrow(a, 0, 0)
    return [x[tuple(index)]]


def _resize(inputs, attrs, opset):
    x = inputs[0]
    mode = attrs.get("mode", "nearest")
    transform = attrs.get("coordinate_transformation_mode", "half_pixel" if opset >= 11 else "asymmetric")
    if opset < 11:
        scales = inputs[1].tolist()
        sizes = [int(math.floor(d * s)) for d, s in zip(x.shape, scales)]
    else:
        given_sizes = inputs[3] if len(inputs) > 3 and inputs[3] is not None and inputs[3].numel() else None
        if given_sizes is not None:
            sizes = _ints(given_sizes)
            scales = [o / i for o, i in zip(sizes, x.shape)]
        else:
            scales = inputs[2].tolist()
            sizes = [int(math.floor(d * s)) for d, s in zip(x.shape, scales)]
    if mode not in ("nearest", "linear") or transform == "tf_crop_and_resize":
        raise UnsupportedError(f"Resize with mode '{mode}' / '{transform}' is not supported by the torch executor")
    y = x
    for axis, (n_in, n_out, scale) in enumerate(zip(x.shape, sizes, scales)):
        if n_in == n_out and scale == 1:
            continue
        out = torch.arange(n_out, dtype=torch.float64)
        if transform == "half_pixel":
            src = (out + 0.5) / scale - 0.5
        elif transform == "pytorch_half_pixel":
            src = (out + 0.5) / scale - 0.5 if n_out > 1 else torch.zeros_like(out)
        elif transform == "align_corners":
            src = out * (n_in - 1) / (n_out - 1) if n_out > 1 else torch.zeros_like(out)
        elif transform == "asymmetric":
            src = out / scale
        else:
            raise UnsupportedError(f"Resize coordinate_transformation_mode '{transform}' is not supported")
        if mode == "nearest":
            rounding = attrs.get("nearest_mode", "round_prefer_floor")
            if rounding == "floor":
                idx = torch.floor(src)
            elif rounding == "ceil":
                idx = torch.ceil(src)
            elif rounding == "round_prefer_ceil":
                idx = torch.floor(src + 0.5)
            else:  # round_prefer_floor
                idx = torch.ceil(src - 0.5)
            idx = idx.clamp(0, n_in - 1).long()
            y = y.index_select(axis, idx)
        else:
            src = src.clamp(min=0) if transform != "align_corners" else src
            lo = torch.floor(src).clamp(0, n_in - 1)
            hi = (lo + 1).clamp(max=n_in - 1)
            frac = (src - lo).clamp(0, 1).to(y.dtype)
            shape = [1] * y.dim()
            shape[axis] = n_out
            frac = frac.reshape(shape)
            y = y.index_select(axis, lo.long()) * (1 - frac) + y.index_select(axis, hi.long()) * frac
    return [y]


def _split(inputs, attrs, opset, count):
    x = inputs[0]
    axis = int(attrs.get("axis", 0)) % x.dim()
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(inputs) > 1 and inputs[1] is not None and inputs[1].numel():
        sizes = _ints(inputs[1])
    else:
        n = int(attrs.get("num_outputs", count))
        size = -(-x.shape[axis] // n)
        sizes = [min(size, x.shape[axis] - k * size) for k in range(n)]
    return list(torch.split(x, sizes, axis))


def _cast(inputs, attrs, opset):
    return [inputs[0].to(_torch_dtype(int(attrs["to"])))]


_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
           onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
           onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
           onnx.TensorProto.BOOL: torch.bool, onnx.TensorProto.BFLOAT16: torch.bfloat16}


def _torch_dtype(onnx_type: int) -> torch.dtype:
    if onnx_type not in _DTYPES:
        raise UnsupportedError(f"tensor type {onnx.TensorProto.DataType.Name(onnx_type)} is not supported by the "
                               "torch executor")
    return _DTYPES[onnx_type]


def _unary(fn) -> Op:
    return lambda inputs, attrs, opset: [fn(inputs[0])]


def _binary(fn) -> Op:
    return lambda inputs, attrs, opset: [fn(inputs[0], inputs[1])]


def _clip(inputs, attrs, opset):
    x = inputs[0]
    lo = attrs.get("min") if opset < 11 else (inputs[1] if len(inputs) > 1 else None)
    hi = attrs.get("max") if opset < 11 else (inputs[2] if len(inputs) > 2 else None)
    if lo is not None:
        x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype))
    if hi is not None:
        x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype))
    return [x]


def _softmax(fn):
    def run(inputs, attrs, opset):
        x = inputs[0]
        axis = int(attrs.get("axis", -1 if opset >= 13 else 1))
        if opset >= 13:
            return [fn(x, axis)]
        axis %= x.dim()  # older opsets: flatten to 2-D at axis
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return [fn(flat, 1).reshape(x.shape)]
    return run


def _squeeze(inputs, attrs, opset):
    x = inputs[0]
    axes = _axes(inputs, attrs)
    if axes is None:
        return [x.squeeze()]
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return [x]


def _unsqueeze(inputs, attrs, opset):
    x = inputs[0]
    axes = _axes(inputs, attrs)
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return [x]


def _pad(inputs, attrs, opset):
    x = inputs[0]
    pads = list(attrs["pads"]) if opset < 11 else _ints(inputs[1])
    value = attrs.get("value", 0.0) if opset < 11 else (float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None
                                                         else 0.0)
    mode = attrs.get("mode", "constant")
    n = x.dim()
    if len(inputs) > 3 and inputs[3] is not None:
        raise UnsupportedError("Pad with axes is not supported by the torch executor")
    spec = []
    for i in reversed(range(n)):
        spec += [pads[i], pads[i + n]]
    if mode == "constant":
        return [F.pad(x, spec, value=value)]
    while spec and spec[-2:] == [0, 0]:
        spec = spec[:-2]
    return [F.pad(x, spec, mode={"reflect": "reflect", "edge": "replicate"}[mode])]


def _flatten(inputs, attrs, opset):
    x = inputs[0]
    axis = int(attrs.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    return [x.reshape(int(np.prod(x.shape[:axis])), -1)]


def _gather(inputs, attrs, opset):
    x, idx = inputs
    axis = int(attrs.get("axis", 0)) % x.dim()
    idx = idx.long()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    return [x.index_select(axis, idx.reshape(-1)).reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])]


def _constant_of_shape(inputs, attrs, opset):
    value = attrs.get("value", np.zeros(1, np.float32))
    return [torch.full(_ints(inputs[0]), float(value.reshape(-1)[0]),
                       dtype=_torch_dtype(onnx.helper.np_dtype_to_tensor_dtype(value.dtype)))]


def _expand(inputs, attrs, opset):
    x, shape = inputs[0], _ints(inputs[1])
    return [x * torch.ones(shape, dtype=x.dtype) if x.dtype != torch.bool else x.expand(
        torch.broadcast_shapes(x.shape, tuple(shape)))]


OPS: dict[str, Op] = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda i, a, o: [i[0].mean(tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda i, a, o: [i[0].amax(tuple(range(2, i[0].dim())), keepdim=True)],
    "BatchNormalization": _batchnorm, "InstanceNormalization": _instancenorm, "LayerNormalization": _layernorm,
    "GroupNormalization": _groupnorm, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Exp": _unary(torch.exp), "Log": _unary(torch.log), "Sqrt": _unary(torch.sqrt), "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs), "Erf": _unary(torch.erf), "Reciprocal": _unary(torch.reciprocal),
    "Floor": _unary(torch.floor), "Ceil": _unary(torch.ceil), "Identity": _unary(lambda x: x),
    "Dropout": lambda i, a, o: [i[0]], "Not": _unary(torch.logical_not),
    "HardSigmoid": lambda i, a, o: [torch.clamp(float(a.get("alpha", 0.2)) * i[0] + float(a.get("beta", 0.5)), 0, 1)],
    "HardSwish": lambda i, a, o: [i[0] * torch.clamp(i[0] / 6 + 0.5, 0, 1)],
    "LeakyRelu": lambda i, a, o: [F.leaky_relu(i[0], float(a.get("alpha", 0.01)))],
    "PRelu": lambda i, a, o: [torch.where(i[0] >= 0, i[0], i[0] * i[1])],
    "Elu": lambda i, a, o: [F.elu(i[0], float(a.get("alpha", 1.0)))],
    "Softplus": _unary(F.softplus), "Clip": _clip,
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": lambda i, a, o: [torch.div(i[0], i[1], rounding_mode="trunc") if not i[0].is_floating_point()
                            else i[0] / i[1]],
    "Pow": lambda i, a, o: [torch.pow(i[0], i[1].to(i[0].dtype) if i[1].is_floating_point() else i[1])],
    "Max": lambda i, a, o: [_fold(torch.maximum, i)], "Min": lambda i, a, o: [_fold(torch.minimum, i)],
    "Sum": lambda i, a, o: [_fold(torch.add, i)],
    "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Where": lambda i, a, o: [torch.where(i[0], i[1], i[2])],
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "ReduceMean": _reduce(lambda x, ax, k: x.mean(ax, keepdim=k)),
    "ReduceSum": _reduce(lambda x, ax, k: x.sum(ax, keepdim=k)),
    "ReduceMax": _reduce(lambda x, ax, k: x.amax(ax, keepdim=k)),
    "ReduceMin": _reduce(lambda x, ax, k: x.amin(ax, keepdim=k)),
    "Reshape": _reshape, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Transpose": lambda i, a, o: [i[0].permute(*(a.get("perm") or reversed(range(i[0].dim()))))],
    "Concat": lambda i, a, o: [torch.cat([t for t in i if t is not None and (t.numel() or t.dim() > 1)],
                                         int(a["axis"]))],
    "Slice": _slice, "Gather": _gather, "Pad": _pad, "Resize": _resize, "Upsample": _resize, "Cast": _cast,
    "Shape": lambda i, a, o: [torch.tensor(list(i[0].shape)[int(a.get("start", 0)):a.get("end")],
                                           dtype=torch.int64)],
    "CastLike": lambda i, a, o: [i[0].to(i[1].dtype)],
    "ConstantOfShape": _constant_of_shape, "Expand": _expand,
    "Range": lambda i, a, o: [torch.arange(i[0].item(), i[1].item(), i[2].item(), dtype=i[0].dtype)],
    "Tile": lambda i, a, o: [i[0].repeat(*_ints(i[1]))],
}
MULTI_OUTPUT = {"Split"}
"""Operators whose output count is the node's own (Split); all others return one value."""
SUPPORTED = frozenset(OPS) | MULTI_OUTPUT | {"Constant"}


def _fold(fn, tensors):
    out = tensors[0]
    for t in tensors[1:]:
        out = fn(out, t)
    return out


def unsupported(model: onnx.ModelProto) -> list[str]:
    """The operators of ``model`` the executor cannot run (with their domain when not the default one)."""
    problems = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.add(f"{node.domain}.{node.op_type}")
        elif node.op_type not in SUPPORTED:
            problems.add(node.op_type)
        elif any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            problems.add(f"{node.op_type} (with a subgraph)")
    if model.functions:
        problems.add("local functions")
    return sorted(problems)


class OnnxModule(nn.Module):
    """The main graph of ``model`` as a torch module (see the module doc). ``forward(**feeds)`` or positional
    arguments in the order of the graph's inputs; returns the graph's outputs as a list."""

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] = (), dtype: torch.dtype = torch.float32):
        super().__init__()
        missing = unsupported(model)
        if missing:
            raise UnsupportedError(f"the torch executor cannot run {', '.join(missing)}")
        self.opset = opset_of(model)
        self.dtype = dtype
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in model.graph.node]
        initializers = {t.name: t for t in model.graph.initializer}
        self.input_names = [i.name for i in model.graph.input if i.name not in initializers]
        self.output_names = [o.name for o in model.graph.output]
        trainable = set(trainable)
        self.slots: dict[str, str] = {}  # ONNX value name -> attribute name holding it
        self.stored: dict[str, np.dtype] = {}  # initializer name -> its stored numpy dtype
        for k, (name, tensor) in enumerate(initializers.items()):
            array = numpy_helper.to_array(tensor)
            self.stored[name] = array.dtype
            self._hold(f"t{k}", name, array, name in trainable)
        for k, (op, _, outputs, attrs) in enumerate(self.nodes):
            if op == "Constant":
                value = next((v for key, v in attrs.items() if key.startswith("value")), None)
                self._hold(f"c{k}", outputs[0], np.asarray(value), False)
        unknown = trainable - set(initializers)
        if unknown:
            raise UnsupportedError(f"trainable tensors {sorted(unknown)[:5]} are not initializers of the model")

    def _hold(self, attr: str, name: str, array: np.ndarray, train: bool) -> None:
        value = torch.from_numpy(np.array(array))
        if value.is_floating_point():
            value = value.to(self.dtype)
        if train:
            setattr(self, attr, nn.Parameter(value))
        else:
            self.register_buffer(attr, value, persistent=False)
        self.slots[name] = attr

    def forward(self, *args, **feeds):
        values: dict[str, torch.Tensor] = {n: getattr(self, a) for n, a in self.slots.items()}
        feeds = {**dict(zip(self.input_names, args)), **feeds}
        for name in self.input_names:
            v = torch.as_tensor(feeds[name])
            values[name] = v.to(self.dtype) if v.is_floating_point() else v
        for op, inputs, outputs, attrs in self.nodes:
            if op == "Constant":
                continue
            args_ = [values[n] if n else None for n in inputs]
            if op == "Split":
                results = _split(args_, attrs, self.opset, len(outputs))
            else:
                results = OPS[op](args_, attrs, self.opset)
            for name, value in zip(outputs, results):
                if name:
                    values[name] = value
        return [values[n] for n in self.output_names]

    def initializer_arrays(self) -> dict[str, np.ndarray]:
        """Every trainable initializer's current value, by initializer name, in its stored dtype."""
        return {name: getattr(self, attr).detach().cpu().numpy().astype(self.stored[name])
                for name, attr in self.slots.items() if isinstance(getattr(self, attr), nn.Parameter)}


def run_numpy(module: OnnxModule, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The module's outputs for numpy feeds, as numpy arrays by output name (no gradients)."""
    with torch.no_grad():
        outs = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    return {n: o.detach().cpu().numpy() for n, o in zip(module.output_names, outs)}


__all__ = ["OPS", "OnnxModule", "SUPPORTED", "run_numpy", "unsupported"]
