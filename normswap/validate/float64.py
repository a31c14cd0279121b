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
FLOAT64_MAX_BYTES = 1 << 30  # float32 weights above this are not copied to float64 (twice their size in memory)
_FLOAT, _DOUBLE = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
_OTHER_FLOATS = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_DTYPE_ATTRIBUTES = {"Cast": "to", "RandomNormal": "dtype", "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                     "RandomUniformLike": "dtype", "EyeLike": "dtype", "Multinomial": "dtype", "Bernoulli": "dtype"}

Float64Reference = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class Unavailable(Exception):
    """Why no float64 reference can be computed (the message is said in the report)."""


def _tensor64(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_type in _OTHER_FLOATS:
        raise Unavailable(f"it holds {onnx.TensorProto.DataType.Name(t.data_type).lower()} tensors")
    if t.data_type != _FLOAT:
        return t
    return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)


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
    from ..onnx.io import has_bound_data, needs_external_data
    if model.functions:
        raise Unavailable("it has local functions")
    if has_bound_data(model) or needs_external_data(model):
        raise Unavailable("its weights are stored outside the model (external data)")
    size = sum(len(t.raw_data) + 4 * len(t.float_data) for t in model.graph.initializer if t.data_type == _FLOAT)
    if size > FLOAT64_MAX_BYTES:
        raise Unavailable(f"its float32 weights ({size >> 20} MiB) are too large to copy to float64")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    _graph64(copy.graph)
    return copy


def onnx_reference(model: onnx.ModelProto) -> tuple[Float64Reference, str]:
    """A function giving the float64 outputs of ``model`` for float32 feeds, and what computes them."""
    import onnxruntime as ort
    from ..validate.providers import CPU, ORT_SILENT
    m64 = float64_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = ORT_SILENT
    try:
        session = ort.InferenceSession(m64.SerializeToString(), options, providers=[CPU])
        outputs = [o.name for o in session.get_outputs()]

        def run_ort(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            return dict(zip(outputs, session.run(outputs, _feeds64(feeds))))
        return run_ort, "onnxruntime (float64 copy)"
    except Exception:  # noqa: BLE001 -- onnxruntime lacks float64 kernels for some operator: use numpy
        pass
    from onnx.reference import ReferenceEvaluator
    try:
        evaluator = ReferenceEvaluator(m64)
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"onnx's reference evaluator cannot run it ({_first_line(e)})") from None
    names = [o.name for o in m64.graph.output]

    def run_numpy(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return dict(zip(names, evaluator.run(names, _feeds64(feeds))))
        except Exception as e:  # noqa: BLE001
            raise Unavailable(f"onnx's reference evaluator failed on it ({_first_line(e)})") from None
    return run_numpy, "onnx reference evaluator (float64, numpy)"


def _feeds64(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (np.asarray(v, np.float64) if np.asarray(v).dtype == np.float32 else np.asarray(v))
            for k, v in feeds.items()}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


__all__ = ["FLOAT64_SAMPLES", "Float64Reference", "Unavailable", "float64_model", "onnx_reference"]
