"""Malformed models end in normswap's own errors (one line, documented exit code), never in an internal error.

The shipped fixture is mutated at the protobuf level -- dims, payload length, element type, node inputs and
outputs, attributes, rewiring into cycles, op types -- and converted (fold, and group without calibration) and
inspected. CI runs a bounded, fixed set of examples; set NORMSWAP_FUZZ_EXAMPLES for a longer, random run
(docs/safety.md).
"""
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import normswap

FIXTURE = Path(__file__).parent.parent.parent / "fixtures" / "digits_resnet.onnx"
EXAMPLES = int(os.environ.get("NORMSWAP_FUZZ_EXAMPLES", "120"))
BASE = onnx.load(str(FIXTURE))
MUTATIONS = ("dims", "raw_data", "data_type", "drop_input", "swap_input", "drop_outputs", "attribute", "cycle",
             "op_type", "bias_shape")


def _mutate(model: onnx.ModelProto, kind: str, a: int, b: int, value: int) -> None:
    g = model.graph
    inits, nodes = g.initializer, g.node
    if kind == "dims":
        t = inits[a % len(inits)]
        del t.dims[:]
        t.dims.extend([value % 7, (b % 5) + 1][: 1 + b % 2])
    elif kind == "raw_data":
        t = inits[a % len(inits)]
        if t.raw_data:
            t.raw_data = t.raw_data[: max(0, len(t.raw_data) - 1 - value % 9)]
    elif kind == "data_type":
        inits[a % len(inits)].data_type = value % 30 if b % 2 else 99
    elif kind == "drop_input":
        node = nodes[a % len(nodes)]
        if node.input:
            del node.input[b % len(node.input)]
    elif kind == "swap_input":
        node = nodes[a % len(nodes)]
        if node.input:
            names = [o for n in nodes for o in n.output] + [t.name for t in inits] + ["nowhere"]
            node.input[b % len(node.input)] = names[value % len(names)]
    elif kind == "drop_outputs":
        del nodes[a % len(nodes)].output[:]
    elif kind == "attribute":
        node = nodes[a % len(nodes)]
        if node.attribute:
            attr = node.attribute[b % len(node.attribute)]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = value - 3
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = [float("nan"), -1.0, 0.0, 1e30][value % 4]
            elif attr.type == onnx.AttributeProto.INTS:
                attr.ints[:] = [value - 3] * (b % 5)
    elif kind == "cycle":
        early, late = sorted((a % len(nodes), b % len(nodes)))
        if nodes[early].input and nodes[late].output:
            nodes[early].input[0] = nodes[late].output[0]
    elif kind == "op_type":
        nodes[a % len(nodes)].op_type = ["BatchNormalization", "Relu", "Conv", "Gemm", "Add", "Frobnicate"][value % 6]
    elif kind == "bias_shape":
        conv = next((n for n in nodes if n.op_type == "Conv"), None)
        if conv is not None:
            bias = onnx.numpy_helper.from_array(np.ones((value % 4 + 2, 3), np.float32), "odd_bias")
            inits.append(bias)
            if len(conv.input) > 2:
                conv.input[2] = "odd_bias"
            else:
                conv.input.append("odd_bias")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize="NORMSWAP_FUZZ_EXAMPLES" not in os.environ)  # CI: the same examples every run
@given(kinds=st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3), a=st.integers(0, 10_000),
       b=st.integers(0, 10_000), value=st.integers(0, 10_000), target=st.sampled_from(["fold", "group"]))
@example(kinds=["swap_input"], a=31, b=1, value=287, target="fold")  # found by a long run: a 0-d Conv weight
def test_a_malformed_model_ends_in_a_normswap_error(kinds, a, b, value, target):
    model = onnx.ModelProto()
    model.CopyFrom(BASE)
    for k, kind in enumerate(kinds):
        _mutate(model, kind, a + k, b + 7 * k, value + 13 * k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in (lambda: normswap.inspect(model),
                    lambda: normswap.convert(model, to=target, validate=True, progress=False)):
            try:
                run()
            except normswap.NormswapError:
                pass


def test_the_mutations_do_break_the_model():
    """The fuzz test above can fail: its mutations produce models normswap must refuse."""
    refused = 0
    for kind in MUTATIONS:
        model = onnx.ModelProto()
        model.CopyFrom(BASE)
        _mutate(model, kind, 3, 1, 5)
        try:
            normswap.convert(model, to="fold", progress=False)
        except normswap.NormswapError:
            refused += 1
    assert refused >= len(MUTATIONS) // 2


@pytest.mark.parametrize("kind", MUTATIONS)
def test_each_mutation_class_is_an_error_or_a_valid_conversion(kind):
    for seed in range(6):
        model = onnx.ModelProto()
        model.CopyFrom(BASE)
        _mutate(model, kind, seed * 11, seed * 5 + 1, seed * 3 + 2)
        try:
            result = normswap.convert(model, to="fold", progress=False)
        except normswap.NormswapError as e:
            assert "\n" not in str(e)
        else:
            assert result.report.passed in (True, False)
