"""Batch-size sensitivity: the math, the ONNX and torch frontends agreeing, and the unreliable-layer verdict."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

import normswap
from normswap.batch_sensitivity import batch_norm_batch_stats, draw_batches, parse_batch_sizes, relative_error
from normswap.errors import UsageError
from tests.builders import init, model, out, vi

FIXTURES = Path(__file__).parent.parent / "fixtures"


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 6), st.integers(1, 4), st.integers(1, 3), st.integers(0, 2 ** 31 - 1))
def test_batch_statistics_normalize_each_channel_over_the_batch(n, c, spatial, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, spatial, 2)) * rng.uniform(0.5, 3, (1, c, 1, 1)) + rng.standard_normal((1, c, 1, 1))
    gamma, beta = rng.uniform(0.5, 2, c), rng.standard_normal(c)
    y = batch_norm_batch_stats(x, gamma, beta, 0.0)
    z = (y - beta.reshape(1, -1, 1, 1)) / gamma.reshape(1, -1, 1, 1)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-9)
    np.testing.assert_allclose(z.var(axis=(0, 2, 3)), 1, rtol=1e-6)


def test_draws_are_seeded_distinct_and_cover_small_sizes():
    a, b = draw_batches(100, 4, 8, seed=3), draw_batches(100, 4, 8, seed=3)
    assert all((x == y).all() for x, y in zip(a, b)) and len(a) == 16  # at least 64 samples per size
    assert all(len(set(x)) == 4 for x in a)
    assert len(draw_batches(100, 1, 8, 0)) == 64 and len(draw_batches(100, 32, 8, 0)) == 8


def test_relative_error():
    assert relative_error(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0
    assert relative_error(np.array([2.0, 0.0]), np.array([1.0, 0.0])) == pytest.approx(1.0)


def _sample_constant_model(classes=3):
    """x (N, C, 4, 4) -> BN -> ReduceMean over space -> scores (N, C). Running stats = the population's."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((400, classes, 1, 1)) * 2 + rng.standard_normal((400, classes, 4, 4)) * 0.01)
    x = x.astype(np.float32)
    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    params = [init("g", np.ones(classes, np.float32)), init("b", np.zeros(classes, np.float32)),
              init("m", mean.astype(np.float32)), init("v", var.astype(np.float32))]
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn"),
             helper.make_node("ReduceMean", ["y"], ["s"], keepdims=0, axes=[2, 3])]
    return model(nodes, [vi("x", ["N", classes, 4, 4])], [out("s", 2)], params, opset=17), x


def test_per_sample_statistics_make_batch_one_unreliable():
    m, x = _sample_constant_model()
    report = normswap.batch_sensitivity(m, {"x": x}, batch_sizes=[1, 32, 256], provider="cpu")
    (layer,) = report.layers
    assert layer.top1_agreement[1] < 0.6  # each sample normalized by itself: its class signal is gone
    assert layer.top1_agreement[1] < layer.top1_agreement[32] < layer.top1_agreement[256]
    assert layer.top1_agreement[256] > 0.95  # batch statistics close to the population's
    assert layer.model_error[1] > layer.model_error[32] > layer.model_error[256]
    assert layer.unreliable_up_to == 32 and report.unreliable() == [layer]


def test_a_layer_the_batch_cannot_disturb_is_not_flagged():
    """The BN input is the same constant for every sample: batch and running statistics give the same output."""
    c = 3
    shift = np.arange(1, c + 1, dtype=np.float32)
    params = [init("zero", np.zeros((1, c, 1, 1), np.float32)), init("shift", shift.reshape(1, c, 1, 1)),
              init("g", np.ones(c, np.float32)), init("b", np.full(c, 0.5, np.float32)), init("m", shift),
              init("v", np.ones(c, np.float32))]
    nodes = [helper.make_node("Mul", ["x", "zero"], ["z"]), helper.make_node("Add", ["z", "shift"], ["a"]),
             helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["y"], name="bn"),
             helper.make_node("ReduceMean", ["y"], ["s"], keepdims=0, axes=[2, 3])]
    m = model(nodes, [vi("x", ["N", c, 4, 4])], [out("s", 2)], params, opset=17)
    x = np.random.default_rng(1).standard_normal((64, c, 4, 4)).astype(np.float32)
    report = normswap.batch_sensitivity(m, {"x": x}, batch_sizes="1,4", provider="cpu")
    (layer,) = report.layers
    assert max(layer.layer_error.values()) < 1e-6 and max(layer.model_error.values()) < 1e-6
    assert layer.unreliable_up_to is None and report.unreliable() == []


def test_sizes_above_the_data_are_skipped_with_a_note():
    m, x = _sample_constant_model()
    report = normswap.batch_sensitivity(m, {"x": x[:10]}, batch_sizes=[2, 64], provider="cpu")
    assert report.batch_sizes == [2] and any("64" in n for n in report.notes)


def _fixed_batch_reshape(target):
    """x [4, 2, 3, 3] (batch fixed to 4) -> BN -> Reshape to ``target`` (an initializer)."""
    c = 2
    params = [init("g", np.ones(c, np.float32)), init("b", np.zeros(c, np.float32)),
              init("m", np.zeros(c, np.float32)), init("v", np.ones(c, np.float32)),
              init("shape", np.array(target, np.int64))]
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["y"], name="bn"),
             helper.make_node("Reshape", ["y", "shape"], ["r"])]
    return model(nodes, [vi("x", [4, c, 3, 3])], [out("r", 2)], params, opset=17)


def test_a_fixed_batch_spelled_in_a_reshape_is_freed_and_left_as_it_was():
    m = _fixed_batch_reshape([4, 18])
    before = m.SerializeToString()
    x = np.random.default_rng(0).standard_normal((40, 2, 3, 3)).astype(np.float32)
    report = normswap.batch_sensitivity(m, {"x": x}, batch_sizes=[2, 4, 8], provider="cpu")
    assert report.batch_sizes == [2, 4, 8] and not report.notes
    assert m.SerializeToString() == before


def test_a_batch_size_the_model_cannot_run_is_skipped_with_a_note():
    """Reshape to 2 rows of 36 values (two samples per row) of a batch fixed to 4: batch 2 cannot fill them."""
    x = np.random.default_rng(0).standard_normal((40, 2, 3, 3)).astype(np.float32)
    report = normswap.batch_sensitivity(_fixed_batch_reshape([2, 36]), {"x": x}, batch_sizes=[2, 4], provider="cpu")
    assert report.batch_sizes == [4] and 4 in report.layers[0].model_error
    assert 2 not in report.layers[0].model_error and any("batch size 2 could not run" in n for n in report.notes)


def test_onnx_and_torch_frontends_measure_the_same(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.torch_nets import ResNetStyle, export, randomize_bn
    net = randomize_bn(ResNetStyle(), seed=2)
    path = tmp_path / "net.onnx"
    export(net, path)
    x = np.random.default_rng(0).standard_normal((48, 1, 8, 8)).astype(np.float32)
    a = normswap.batch_sensitivity(net, torch.from_numpy(x), batch_sizes=[2, 16], provider="cpu")
    b = normswap.batch_sensitivity(path, {onnx.load(str(path)).graph.input[0].name: x}, batch_sizes=[2, 16],
                                   provider="cpu")
    assert len(a.layers) == len(b.layers) == 9
    key = (lambda r: (r.layer_error[2], r.model_error[2], r.layer_error[16], r.model_error[16]))
    # module order and execution order may differ (a shortcut's BN): the same layers measure the same
    for ta, tb in zip(sorted(a.layers, key=key), sorted(b.layers, key=key)):
        assert ta.channels == tb.channels
        for size in (2, 16):
            assert ta.layer_error[size] == pytest.approx(tb.layer_error[size], rel=1e-3, abs=1e-5)
            assert ta.model_error[size] == pytest.approx(tb.model_error[size], rel=1e-3, abs=1e-5)
    assert net.training is False and all(not m.training for m in net.modules())


def test_inspect_carries_the_sensitivity_in_its_json():
    x = np.load(FIXTURES / "digits_heldout.npz")["x"]
    report = normswap.inspect(FIXTURES / "digits_resnet.onnx", batch_sensitivity_data={"x": x}, batch_sizes=[2, 8])
    data = json.loads(report.to_json())
    assert len(data["sites"]) == 6 and data["batch_sensitivity"]["batch_sizes"] == [2, 8]
    assert [layer["name"] for layer in data["batch_sensitivity"]["layers"]] == [s["name"] for s in data["sites"]]
    for layer in report.batch_sensitivity.layers:  # smaller batches disturb every layer more
        assert layer.layer_error[2] > layer.layer_error[8]


@pytest.mark.parametrize("sizes", ["0,2", "a,b", "", [-1]])
def test_bad_batch_sizes_are_usage_errors(sizes):
    with pytest.raises(UsageError, match="batch_sizes"):
        parse_batch_sizes(sizes)


@pytest.mark.parametrize("opset", [13, 17])
def test_float16_models_are_measured_and_the_callers_model_is_left_alone(opset):
    from tests.builders import conv_bn
    m = conv_bn(np.random.default_rng(0), dtype=np.float16)
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", opset))
    if opset < 15:  # BN's parameters then share its input's type
        bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
        for t in m.graph.initializer:
            if t.name in bn.input[1:]:
                t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    before = m.SerializeToString()
    x = np.random.default_rng(1).standard_normal((40, 4, 5, 5)).astype(np.float16)
    report = normswap.batch_sensitivity(m, {"x": x}, batch_sizes=[2, 8], provider="cpu")
    assert 0 < report.layers[0].model_error[8] < report.layers[0].model_error[2]
    assert m.SerializeToString() == before
