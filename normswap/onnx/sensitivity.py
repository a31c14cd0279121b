"""Batch-size sensitivity of an ONNX model's BatchNorms (see ``normswap.batch_sensitivity`` for the measure).

One onnxruntime session serves every layer: each BN output ``y`` becomes ``y_run + delta`` with ``delta`` a new
graph input, fed as a scalar zero for every layer but the one measured, which gets ``y_batch - y_run`` (its batch
statistics computed in float64 from its input in the same batch). The batch dimension of the inputs and outputs
is made symbolic so batches of any size run; sizes a model cannot run (a batch baked into a Reshape) are skipped
with a note.
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping

import numpy as np
import onnx

from ..batch_sensitivity import Accumulator, batch_count, batch_norm_batch_stats, draw_batches, relative_error, top1
from ..report import SensitivityReport
from .external import tensor_array

DELTA = "normswap_batch_delta::"
RUN = "normswap_running::"


def _bn_layers(model: onnx.ModelProto) -> tuple[list[tuple[onnx.NodeProto, np.ndarray, np.ndarray, float]],
                                                 list[str]]:
    """Main-graph inference BNs whose scale and bias are initializers; notes for the others."""
    inits = {t.name: t for t in model.graph.initializer}
    layers, notes = [], []
    for node in model.graph.node:
        if node.op_type != "BatchNormalization":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        name = node.name or node.output[0]
        if attrs.get("training_mode", 0) == 1 or len(node.input) < 5:
            notes.append(f"'{name}' is not an inference BatchNormalization; not measured")
        elif node.input[1] not in inits or node.input[2] not in inits:
            notes.append(f"'{name}': its scale or bias is computed, not stored; not measured")
        else:
            layers.append((node, tensor_array(inits[node.input[1]]).astype(np.float64).reshape(-1),
                           tensor_array(inits[node.input[2]]).astype(np.float64).reshape(-1),
                           float(attrs.get("epsilon", 1e-5))))
    return layers, notes


def _free_batch(graph: onnx.GraphProto) -> None:
    """Dimension 0 of every graph input and output becomes symbolic; stored intermediate shapes are dropped."""
    for vi in list(graph.input) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            if len(dims):
                dims[0].Clear()
                dims[0].dim_param = "normswap_batch"
    del graph.value_info[:]


def _probe_model(model: onnx.ModelProto, layers) -> onnx.ModelProto:
    """A copy whose BN outputs are ``running + delta`` (delta a graph input) and whose BN inputs and running
    outputs are graph outputs too."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph = probe.graph
    _free_batch(graph)
    wanted = {node.output[0] for node, *_ in layers}
    nodes = list(graph.node)
    del graph.node[:]
    for node in nodes:
        if node.op_type == "BatchNormalization" and node.output[0] in wanted:
            y = node.output[0]
            node.output[0] = RUN + y
            graph.node.append(node)
            graph.node.append(onnx.helper.make_node("Add", [RUN + y, DELTA + y], [y], name=f"normswap_delta/{y}"))
            graph.input.append(onnx.helper.make_tensor_value_info(DELTA + y, onnx.TensorProto.FLOAT, None))
        else:
            graph.node.append(node)
    present = {o.name for o in graph.output}
    for node, *_ in layers:
        for name in (node.input[0], RUN + node.output[0]):
            if name not in present:
                graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
    return probe


def batch_sensitivity_onnx(model: onnx.ModelProto, source: str, data: Mapping[str, np.ndarray],
                           sizes: tuple[int, ...], batches: int, seed: int, providers: tuple[str, ...],
                           progress=None) -> SensitivityReport:
    from ..onnx.batching import sample_count
    from ..validate.runner import make_session
    layers, notes = _bn_layers(model)
    samples = sample_count(data) or 0
    acc = Accumulator([(node.name or node.output[0], node.op_type, len(gamma)) for node, gamma, _, _ in layers])
    if not layers:
        notes.append("no BatchNormalization to measure")
        return acc.report(source, "onnx", sizes, batches, samples, notes)
    usable = [b for b in sizes if b <= samples]
    if len(usable) < len(sizes):
        notes.append(f"batch sizes above the {samples} samples given were not measured: "
                     f"{', '.join(str(b) for b in sizes if b > samples)}")
    probe = _probe_model(model, layers)
    output = model.graph.output[0].name
    with tempfile.TemporaryDirectory(prefix="normswap-sensitivity-") as workdir:
        session = make_session(probe, providers, workdir, "batch-sensitivity", optimize=True)
        feed_names = {i.name for i in session.get_inputs()}
        zeros = {DELTA + node.output[0]: np.zeros((1,), np.float32) for node, *_ in layers}  # broadcasts
        total, done = sum(batch_count(b, batches) for b in usable) * (1 + len(layers)), 0
        for size in usable:
            try:
                for index in draw_batches(samples, size, batches, seed):
                    feeds = {k: v[index] for k, v in data.items() if k in feed_names}
                    base = _run(session, feeds, zeros)
                    done += 1
                    for node, gamma, beta, eps in layers:
                        x, y_run = base[node.input[0]], base[RUN + node.output[0]]
                        y_batch = batch_norm_batch_stats(x, gamma, beta, eps)
                        delta = {**zeros, DELTA + node.output[0]: (y_batch - y_run).astype(np.float32)}
                        out = _run(session, feeds, delta)[output]
                        acc.add(node.name or node.output[0], size, relative_error(y_batch, y_run),
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
