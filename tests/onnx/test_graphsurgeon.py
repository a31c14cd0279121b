"""onnx-graphsurgeon Graphs are accepted where the API takes an ONNX model, and one is returned when given."""
from pathlib import Path

import numpy as np
import onnx
import pytest

gs = pytest.importorskip("onnx_graphsurgeon")

import normswap  # noqa: E402

FIXTURE = Path(__file__).parent.parent.parent / "fixtures" / "digits_resnet.onnx"


def test_convert_inspect_and_validate_take_a_graphsurgeon_graph():
    graph = gs.import_onnx(onnx.load(str(FIXTURE)))
    nodes_before = len(graph.nodes)
    result = normswap.convert(graph, to="fold")
    assert result.report.passed and result.report.count("folded") == 6
    assert isinstance(result.graph, gs.Graph)
    assert not any(n.op == "BatchNormalization" for n in result.graph.nodes)
    assert len(graph.nodes) == nodes_before  # the caller's graph is not edited
    assert any(n.op == "BatchNormalization" for n in graph.nodes)
    assert len(normswap.inspect(graph).sites) == 6
    assert normswap.validate(graph, result.graph).passed
    exported = gs.export_onnx(result.graph)
    assert exported.ir_version == onnx.load(str(FIXTURE)).ir_version


def test_a_proto_in_gives_no_graph_out():
    result = normswap.convert(onnx.load(str(FIXTURE)), to="fold", validate=False)
    assert result.graph is None and isinstance(result.model, onnx.ModelProto)


def test_a_broken_graph_is_refused_with_a_normswap_error():
    graph = gs.import_onnx(onnx.load(str(FIXTURE)))
    conv = next(n for n in graph.nodes if n.op == "Conv")
    conv.inputs[1].values = np.zeros((1,), np.float32)  # a Conv weight of rank 1
    with pytest.raises(normswap.NormswapError):
        normswap.convert(graph, to="fold")
