"""Batch-size sensitivity of an ONNX model's BatchNorms (see ``normswap.batch_sensitivity`` for the measure).

One onnxruntime session serves every layer: each BN output ``y`` becomes ``y_run + delta`` with ``delta`` a new
graph input, fed as a scalar zero for every layer but the one measured, which gets ``y_batch - y_run`` (its batch
statistics computed in float64 from its input in the same batch). The batch dimension of the inputs and outputs
is made symbolic (and a fixed batch spelled in a constant Reshape target is freed, as calibration does) so
batches of any size run; sizes a model still cannot run are skipped with a note. The model is edited in place
only while the session is built, then restored: no weight is copied.
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from ..batch_sensitivity import Accumulator, batch_count, batch_norm_batch_stats, draw_batches, relative_error, top1
from ..report import SensitivityReport

DELTA = "normswap_batch_delta::"
RUN = "normswap_running::"


@dataclass(frozen=True)
class _Layer:
    name: str
    x: str  # the BN's input
    y: str  # its output
    gamma: np.ndarray  # float64
    beta: np.ndarray
    eps: float
    scale_type: int  # element type of its scale (the type of x and y before opset 15)


def _bn_layers(model: onnx.ModelProto) -> tuple[list[_Layer], list[str]]:
    """Main-graph inference BNs whose scale and bias are constants (initializers, Constant nodes or constant
    subgraphs, evaluated as the rewrites read them); notes for the others."""
    from .graph import GraphIndex, NameRegistry
    from .io import opset_of
    from .types import TypeTable
    index = GraphIndex(model.graph, ir_version=model.ir_version, opset=opset_of(model), types=TypeTable(),
                       names=NameRegistry(model))
    layers, notes = [], []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        name = node.name or node.output[0]
        if attrs.get("training_mode", 0) == 1 or len(node.input) < 5:
            notes.append(f"'{name}' is not an inference BatchNormalization; not measured")
            continue
        gamma, beta = index.constant(node.input[1]), index.constant(node.input[2])
        if gamma is None or beta is None:
            notes.append(f"'{name}': its scale or bias is not a constant (a graph input a caller may override); "
                         "not measured")
        else:
            layers.append(_Layer(name, node.input[0], node.output[0], gamma.astype(np.float64).reshape(-1),
                                 beta.astype(np.float64).reshape(-1), float(attrs.get("epsilon", 1e-5)),
                                 onnx.helper.np_dtype_to_tensor_dtype(gamma.dtype)))
    return layers, notes


def _free_batch(model: onnx.ModelProto, reshapes: dict[str, np.ndarray]) -> None:
    """Dimension 0 of every fed graph input and of every output becomes symbolic, stored intermediate shapes are
    dropped, and a fixed-batch model's Reshape targets that spell its batch copy the input's first dimension
    instead (``reshapes``, from ``batching.batch_reshapes``: initializers and Constant nodes, replaced in
    place)."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    for vi in [i for i in graph.input if i.name not in constants] + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            if len(dims):
                dims[0].Clear()
                dims[0].dim_param = "normswap_batch"
    del graph.value_info[:]
    for t in graph.initializer:
        if t.name in reshapes:
            t.CopyFrom(onnx.numpy_helper.from_array(reshapes[t.name], t.name))
    for node in graph.node:
        if node.op_type == "Constant" and len(node.output) == 1 and node.output[0] in reshapes:
            node.CopyFrom(onnx.helper.make_node("Constant", [], [node.output[0]], name=node.name,
                                                value=onnx.numpy_helper.from_array(reshapes[node.output[0]])))


def _probe_session(model: onnx.ModelProto, layers, providers: tuple[str, ...], workdir: str):
    """An onnxruntime session of the model with every measured BN output ``running + delta`` (delta a float32
    graph input, cast like the BN output: a float16 model gets a float16 delta) and the BN inputs and running
    outputs as graph outputs. The graph is edited in place for as long as the session takes to build, then
    restored: its weights are never copied."""
    from ..validate.runner import make_session
    from .io import opset_of
    from .batching import batch_reshapes, fixed_batch
    graph = model.graph
    fields = ("node", "input", "output", "value_info")
    saved = {f: [_copy(item) for item in getattr(graph, f)] for f in fields}
    fixed = fixed_batch(model)
    reshapes = batch_reshapes(model, fixed) if fixed else {}
    targets = {t.name: _copy(t) for t in graph.initializer if t.name in reshapes}  # small shape vectors
    try:
        _free_batch(model, reshapes)
        _edit_probe(graph, layers, cast_like=opset_of(model) >= 15)  # before 15, BN's scale has X's type
        return make_session(model, providers, workdir, "batch-sensitivity", optimize=True)
    finally:
        for f in fields:
            del getattr(graph, f)[:]
            getattr(graph, f).extend(saved[f])
        for t in graph.initializer:
            if t.name in targets:
                t.CopyFrom(targets[t.name])


def _copy(proto):
    twin = type(proto)()
    twin.CopyFrom(proto)
    return twin


def _edit_probe(graph: onnx.GraphProto, layers, cast_like: bool) -> None:
    scale_types = {layer.y: layer.scale_type for layer in layers}
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        graph.node.append(node)
        if node.op_type == "BatchNormalization" and node.output[0] in scale_types:
            y = node.output[0]
            graph.node[-1].output[0] = RUN + y
            delta = _cast_delta(graph, DELTA + y, RUN + y, cast_like, scale_types[y])
            graph.node.append(onnx.helper.make_node("Add", [RUN + y, delta], [y], name=f"normswap_delta/{y}"))
            graph.input.append(onnx.helper.make_tensor_value_info(DELTA + y, onnx.TensorProto.FLOAT, None))
    present = {o.name for o in graph.output}
    for layer in layers:
        for name in (layer.x, RUN + layer.y):
            if name not in present:
                graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)


def _cast_delta(graph: onnx.GraphProto, delta: str, like: str, cast_like: bool, scale_type: int) -> str:
    """The float32 delta input in the BN output's type: CastLike (opset 15+) or a Cast to the scale's type."""
    if not cast_like and scale_type == onnx.TensorProto.FLOAT:
        return delta
    node = (onnx.helper.make_node("CastLike", [delta, like], [delta + "/cast"]) if cast_like else
            onnx.helper.make_node("Cast", [delta], [delta + "/cast"], to=scale_type))
    node.name = f"normswap_delta_cast/{like}"
    graph.node.append(node)
    return delta + "/cast"


def batch_sensitivity_onnx(model: onnx.ModelProto, source: str, data: Mapping[str, np.ndarray],
                           sizes: tuple[int, ...], batches: int, seed: int, providers: tuple[str, ...],
                           progress=None) -> SensitivityReport:
    from ..onnx.batching import sample_count
    layers, notes = _bn_layers(model)
    samples = sample_count(data) or 0
    acc = Accumulator([(layer.name, "BatchNormalization", len(layer.gamma)) for layer in layers])
    if not layers:
        notes.append("no BatchNormalization to measure")
        return acc.report(source, "onnx", sizes, batches, samples, notes)
    usable = [b for b in sizes if b <= samples]
    if len(usable) < len(sizes):
        notes.append(f"batch sizes above the {samples} samples given were not measured: "
                     f"{', '.join(str(b) for b in sizes if b > samples)}")
    output = model.graph.output[0].name
    with tempfile.TemporaryDirectory(prefix="normswap-sensitivity-") as workdir:
        session = _probe_session(model, layers, providers, workdir)
        feed_names = {i.name for i in session.get_inputs()}
        zeros = {DELTA + layer.y: np.zeros((1,), np.float32) for layer in layers}  # broadcasts
        total, done = sum(batch_count(b, batches) for b in usable) * (1 + len(layers)), 0
        for size in usable:
            try:
                for index in draw_batches(samples, size, batches, seed):
                    feeds = {k: v[index] for k, v in data.items() if k in feed_names}
                    base = _run(session, feeds, zeros)
                    done += 1
                    for layer in layers:
                        x, y_run = base[layer.x], base[RUN + layer.y]
                        y_batch = batch_norm_batch_stats(x, layer.gamma, layer.beta, layer.eps)
                        delta = {**zeros, DELTA + layer.y: (y_batch - y_run).astype(np.float32)}
                        out = _run(session, feeds, delta)[output]
                        acc.add(layer.name, size, relative_error(y_batch, y_run),
                                relative_error(out, base[output]), top1(out, base[output]))
                        done += 1
                        if progress:
                            progress(done, total, f"batch sensitivity: batch size {size}")
            except _RunFailed as e:
                notes.append(f"batch size {size} could not run ({e}); export the model with a dynamic batch "
                             "dimension to measure it")
    return acc.report(source, "onnx", usable, batches, samples, notes)


class _RunFailed(Exception):
    pass


def _run(session, feeds: Mapping[str, np.ndarray], deltas: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, {**feeds, **deltas})
    except Exception as e:  # noqa: BLE001 -- onnxruntime's own errors: the batch size is what differs
        raise _RunFailed(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    return dict(zip(names, values))
