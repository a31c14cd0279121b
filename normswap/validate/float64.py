"""The original model evaluated in float64: the yardstick exact rewrites are judged against.

A float32 network's own output differs from its float64 evaluation by rounding that grows with depth and with
the magnitude of the activations (deep nets whose outputs reach 1e2-1e7 differ by 1e-3 in absolute terms), so an
elementwise ``atol + rtol * |ref|`` rule calls an exact fold of such a net wrong. With the float64 evaluation
``ref64`` of the original, an exact rewrite is judged by how its error compares with the original's own float32
error (``compare.OutputStats.add_float64``).

ONNX: a copy of the model with every float32 tensor, value type, ``Cast`` target and ``dtype`` attribute made
float64 runs in onnxruntime when it has float64 kernels for every operator; otherwise (its CPU Conv is float32
only) in onnx's reference evaluator (numpy, float64) on at most ``FLOAT64_SAMPLES`` samples. A model holding
other float types (float16, bfloat16), over ``FLOAT64_MAX_BYTES`` of float weights, or that neither can run,
gives a reason instead and the caller falls back to the elementwise rule, saying why.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

FLOAT64_SAMPLES = 4  # samples the float64 reference runs on (the first ones); the float32 runs cover them all
FLOAT64_BUDGET_MULTIPLE = 1.5  # the float64 evaluation may take this many times the float32 validation runs ...
FLOAT64_BUDGET_SECONDS = 3.0  # ... plus this; past it, fewer samples (at least one) or the elementwise rule
UNIT_ROUNDOFF = 2.0 ** -24  # float32's unit roundoff u
YARDSTICK_SAFETY = 64.0
"""A float64 evaluation is used only when the original's float32 run lies within ``yardstick_limit`` of it (relative
to the output's largest magnitude); the limit is this factor times ``u * sum over multiply-accumulate layers of
sqrt(fan-in)``: each layer's float32 rounding contributes about ``u * sqrt(K)`` of its output's scale (a K-term
dot product rounded at every step, errors of random sign), the contributions add along the network, and the
factor covers the largest element against the typical one (about 5x), activations that squash or amplify
(sigmoid, division, near-cancelling sums) and onnxruntime's approximate float32 exp / tanh / sigmoid kernels."""
YARDSTICK_MIN = 1e-5  # the limit is never below this (shallow graphs with approximate float32 kernels)
_MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger"}
FLOAT64_MAX_BYTES = 1 << 30  # float32 weights above this are not copied to float64 (twice their size in memory)
_FLOAT, _DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
_OTHER_FLOATS = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_DTYPE_ATTRIBUTES = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                     "RandomUniformLike": "dtype", "EyeLike": "dtype", "Multinomial": "dtype", "Bernoulli": "dtype"}

Float64Reference = Callable[..., dict[str, np.ndarray]]
"""``reference(feeds, seconds=None)``: the float64 outputs by name for float32 feeds; raises ``Unavailable`` (also
when ``seconds`` pass before it is done)."""


class Unavailable(Exception):
    """Why no float64 reference can be computed (the message is said in the report)."""


def _tensor64(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_type in _OTHER_FLOATS:
        raise Unavailable(f"it holds {onnx.TensorProto.DataType.Name(t.data_type).lower()} tensors")
    from ..onnx.external import is_external, tensor_array
    if t.data_type != _FLOAT:  # other types as they are (a tensor still in its external file: read into the copy)
        return numpy_helper.from_array(tensor_array(t), t.name) if is_external(t) else t
    return numpy_helper.from_array(tensor_array(t).astype(np.float64), t.name)


def _value64(vi: onnx.ValueInfoProto) -> None:
    if vi.type.HasField("tensor_type"):
        if vi.type.tensor_type.elem_type in _OTHER_FLOATS:
            raise Unavailable("it computes in float16 / bfloat16")
        if vi.type.tensor_type.elem_type == _FLOAT:
            vi.type.tensor_type.elem_type = _DOUBLE


def _graph64(g: onnx.GraphProto) -> None:
    for k, t in enumerate(g.initializer):
        g.initializer[k].CopyFrom(_tensor64(t))
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        _value64(vi)
    for node in g.node:
        for a in node.attribute:
            if a.name == _DTYPE_ATTRIBUTES.get(node.op_type) and a.i == _FLOAT:
                a.i = _DOUBLE
            elif a.type == onnx.AttributeProto.TENSOR:
                a.t.CopyFrom(_tensor64(a.t))
            elif a.type == onnx.AttributeProto.GRAPH:
                _graph64(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    _graph64(sub)
            elif node.op_type == "Constant" and a.name in ("value_float", "value_floats"):
                value = np.array(a.f if a.name == "value_float" else list(a.floats), np.float64)
                a.CopyFrom(onnx.helper.make_attribute("value", numpy_helper.from_array(value)))


def float64_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float64 (raises ``Unavailable``)."""
    from ..onnx.external import payload_length
    from ..onnx.io import needs_external_data
    if model.functions:
        raise Unavailable("it has local functions")
    if needs_external_data(model):
        raise Unavailable("it is over 2 GB (its float64 copy could not be one protobuf)")
    size = sum((payload_length(t) or 0) + 4 * len(t.float_data) for t in model.graph.initializer
               if t.data_type == _FLOAT)  # weights still in their external file are read into the copy
    if size > FLOAT64_MAX_BYTES:
        raise Unavailable(f"its float32 weights ({size >> 20} MiB) are too large to copy to float64")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _graph64(copy.graph)
    return copy


def onnx_reference(model: onnx.ModelProto) -> tuple[Float64Reference, str]:
    """A function giving the float64 outputs of ``model`` for float32 feeds (``seconds``: its time budget, raising
    ``Unavailable`` when exceeded), and what computes them."""
    import onnxruntime as ort
    from ..validate.providers import CPU, ORT_SILENT
    m64 = float64_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = ORT_SILENT
    try:
        session = ort.InferenceSession(m64.SerializeToString(), options, providers=[CPU])
        outputs = [o.name for o in session.get_outputs()]

        def run_ort(feeds: Mapping[str, np.ndarray], seconds: float | None = None) -> dict[str, np.ndarray]:
            return dict(zip(outputs, session.run(outputs, _feeds64(feeds))))
        return run_ort, "onnxruntime (float64 copy)"
    except Exception:  # noqa: BLE001 -- onnxruntime lacks float64 kernels for some operator: use numpy
        pass
    from onnx.reference import ReferenceEvaluator
    from .float64_ops import Deadline, DeadlineExceeded, float64_ops
    deadline = Deadline()
    try:
        evaluator = ReferenceEvaluator(m64, new_ops=float64_ops(deadline))
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"onnx's reference evaluator cannot run it ({_first_line(e)})") from None
    names = [o.name for o in m64.graph.output]

    def run_numpy(feeds: Mapping[str, np.ndarray], seconds: float | None = None) -> dict[str, np.ndarray]:
        deadline.start(seconds)
        try:
            return dict(zip(names, evaluator.run(names, _feeds64(feeds))))
        except DeadlineExceeded:
            raise Unavailable(f"evaluating it took longer than the float64 time budget ({seconds:.1f} s)") from None
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"onnx's reference evaluator failed on it ({_first_line(e)})") from None
        finally:
            deadline.start(None)
    return run_numpy, "onnx reference evaluator (float64, numpy; BatchNormalization in inference mode)"


def yardstick_limit(model: onnx.ModelProto) -> float:
    """How far (relative to an output's largest magnitude) the original's float32 run may lie from a correct float64
    evaluation of it (``YARDSTICK_SAFETY``); fan-ins come from constant weights (4 where unknown)."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    shapes.update({o: list(a.t.dims) for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value" for o in n.output})
    total = 0.0
    for node in _all_nodes(model.graph):
        if node.op_type not in _MAC_OPS:
            continue
        w = shapes.get(node.input[1]) if len(node.input) > 1 else None
        if not w:
            fan_in = 4
        elif node.op_type in ("Conv", "ConvTranspose", "ConvInteger"):
            fan_in = int(np.prod(w[1:])) if node.op_type != "ConvTranspose" else int(np.prod([w[0]] + w[2:]))
        elif node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            fan_in = w[-1]
        else:
            fan_in = w[0] if len(w) <= 2 else w[-2]
        total += float(np.sqrt(max(fan_in, 1)))
    return max(YARDSTICK_MIN, YARDSTICK_SAFETY * UNIT_ROUNDOFF * max(total, 1.0))


def _all_nodes(g: onnx.GraphProto):
    for node in g.node:
        yield node
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _all_nodes(sub)


def yardstick_disproof(reference64: Mapping[str, np.ndarray], float32: Mapping[str, np.ndarray], names: list[str],
                       take: int | None, limit: float) -> str | None:
    """Why the float64 evaluation ``reference64`` of the original's first ``take`` samples cannot be right: the
    original's own float32 outputs (``float32``, onnxruntime) lie further than ``limit`` from it relative to an
    output's largest magnitude, or NaN / infinity stand in different places. None when it proves itself."""
    for name in names:
        if name not in reference64 or name not in float32:
            continue
        r64 = np.asarray(reference64[name], np.float64)
        r32 = np.asarray(float32[name], np.float64)
        if take is not None and r32.ndim:
            r32 = r32[:take]
        if r64.shape != r32.shape:
            return f"its output '{name}' has shape {list(r64.shape)}, onnxruntime's {list(r32.shape)}"
        finite64, finite32 = np.isfinite(r64), np.isfinite(r32)
        if not np.array_equal(finite64, finite32):
            return f"its output '{name}' has NaN or infinity where onnxruntime's float32 run has none, or the reverse"
        if not finite64.any():
            continue
        scale = float(np.abs(r64[finite64]).max())
        distance = float(np.abs(r64[finite64] - r32[finite64]).max())
        if distance > limit * scale:
            return (f"onnxruntime's float32 run of the original lies {distance / scale:.3g} of output '{name}'s "
                    f"largest magnitude from it, beyond float32's own level for this model ({limit:.2g})")
    return None


def _feeds64(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (np.asarray(v, np.float64) if np.asarray(v).dtype == np.float32 else np.asarray(v))
            for k, v in feeds.items()}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


__all__ = ["FLOAT64_BUDGET_MULTIPLE", "FLOAT64_BUDGET_SECONDS", "FLOAT64_SAMPLES", "Float64Reference", "Unavailable",
           "float64_model", "onnx_reference", "yardstick_disproof", "yardstick_limit"]
