"""Calibration runs a fitted GroupNorm-family layer as ``A * x + B`` inside its segments (``fitted_apply``): the
algebra equals the normalization, the fit it gives equals the one through the emitted nodes, and layers that
cannot be run that way keep their emitted nodes."""
import copy

import numpy as np
import onnx
import pytest
from hypothesis import given, settings, strategies as st
from onnx import helper

import normswap.onnx.calibrate as calibrate_module
from normswap._math import group_normalize
from normswap.onnx.calibrate import _plans, calibrate
from normswap.onnx.convert import convert_in_place
from normswap.onnx.fitted_apply import affine_inputs, plan_applies, substitute
from normswap.targets import ReplaceOptions
from normswap.validate.providers import CPU

from tests.builders import bn_node, bn_params, init, model, vi
from tests.onnx.test_calibrate import MODEL, _converted

@pytest.fixture(scope="module")
def digits():
    return {"x": np.load(MODEL.parent / "digits_heldout.npz")["x"][:120]}


class _Norm:  # what affine_inputs reads of a layer
    def __init__(self, eps: float, rank: int) -> None:
        self.eps, self.rank = eps, rank


@settings(max_examples=60, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), groups_log=st.integers(0, 3), spatial=st.integers(3, 6),
       offset=st.floats(-50, 50), centred=st.booleans())
def test_a_times_x_plus_b_is_the_fitted_group_norm(seed, groups_log, spatial, offset, centred):
    """``A * x + B`` from the per-sample moments of ``x - centre`` equals ``a * GroupNorm(x) + b``."""
    rng = np.random.default_rng(seed)
    c, groups = 8, 2 ** groups_log
    x = rng.standard_normal((4, c, spatial, spatial)) * rng.uniform(0.2, 3, (1, c, 1, 1)) + offset
    a, b = rng.uniform(-2, 2, c), rng.uniform(-1, 1, c)
    centre = rng.uniform(-50, 50, c) if centred else np.zeros(c)
    xc = (x - centre[None, :, None, None]).reshape(4, c, -1)
    scale, shift = affine_inputs(_Norm(1e-5, 4), xc.sum(2), (xc * xc).sum(2), spatial * spatial, centre, groups,
                                 a, b)
    assert scale.shape == shift.shape == (4, c, 1, 1) and scale.dtype == np.float32
    expected = a[None, :, None, None] * group_normalize(x, groups, 1e-5) + b[None, :, None, None]
    got = scale.astype(np.float64) * x + shift.astype(np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max())))


def test_the_wrong_group_count_is_not_the_fitted_group_norm():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 4, 4)) * rng.uniform(0.2, 3, (1, 8, 1, 1))
    xr = x.reshape(2, 8, -1)
    scale, shift = affine_inputs(_Norm(1e-5, 4), xr.sum(2), (xr * xr).sum(2), 16, np.zeros(8), 4, np.ones(8),
                                 np.zeros(8))
    assert np.abs(scale * x + shift - group_normalize(x, 2, 1e-5)).max() > 0.1


def _applied_ops(monkeypatch) -> list[list[str]]:
    """Op types of every converted segment model calibration builds (recorded as they are built)."""
    built = []
    real = calibrate_module._Runner.build

    def build(self, segment, extra_reads=()):
        m = real(self, segment, extra_reads)
        if self.tag != "r":
            built.append([n.op_type for n in m.graph.node])
        return m
    monkeypatch.setattr(calibrate_module._Runner, "build", build)
    return built


@pytest.mark.parametrize("target,options", [("group", {}), ("layer", {}), ("instance", {})])
def test_the_fit_through_a_times_x_plus_b_equals_the_fit_through_the_emitted_nodes(digits, monkeypatch, target,
                                                                                   options):
    ref, emitted, norms = _converted(target, **options)
    with monkeypatch.context() as m:
        m.setattr(calibrate_module, "plan_applies", lambda *a: {})
        calibrate(ref, emitted, norms, digits, (CPU,), refit_output_layer=False)
    built = _applied_ops(monkeypatch)
    ref, applied, norms = _converted(target, **options)
    calibrate(ref, applied, norms, digits, (CPU,), refit_output_layer=False)
    assert not any("InstanceNormalization" in ops for ops in built)  # every layer ran as A * x + B
    fitted = {t.name: onnx.numpy_helper.to_array(t) for t in applied.graph.initializer}
    for t in emitted.graph.initializer:
        np.testing.assert_allclose(fitted[t.name], onnx.numpy_helper.to_array(t), rtol=1e-4, atol=1e-5,
                                   err_msg=t.name)
    # the model written out keeps its emitted nodes
    assert [n.op_type for n in applied.graph.node] == [n.op_type for n in emitted.graph.node]


def test_layer_norm_over_channels_keeps_its_emitted_nodes(digits, monkeypatch):
    built = _applied_ops(monkeypatch)
    ref, conv, norms = _converted("layer", layer_over="channels")
    calibrate(ref, conv, norms, digits, (CPU,), refit_output_layer=False)
    assert built and not any(name.startswith("normswap_apply") for m in built for name in m) and \
        plan_applies(conv.graph, norms, _plans(ref, conv, norms, None)[0]) == {}


def test_a_layer_whose_inner_value_is_read_elsewhere_keeps_its_emitted_nodes():
    rng = np.random.default_rng(1)
    n1, p1 = bn_params(8, rng, "bn1")
    n2, p2 = bn_params(8, rng, "bn2")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1] * 4), bn_node("c", "b", n1, name="bn1"),
             helper.make_node("Relu", ["b"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             bn_node("c2", "b2", n2, name="bn2")]  # the second layer's input needs the first one applied
    net = model(nodes, [vi("x", [None, 3, 6, 6])], [vi("b2", [None, 8, 6, 6])],
                [init("w", rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
                 init("w2", rng.standard_normal((8, 8, 3, 3)).astype(np.float32))] + p1 + p2)
    ref = copy.deepcopy(net)
    norms = convert_in_place(net, "group", options=ReplaceOptions(groups=2)).new_norms
    plan = _plans(ref, net, norms, None)[0]
    assert set(plan_applies(net.graph, norms, plan)) == {"b"}
    inner = next(n for n in net.graph.node if n.op_type == "InstanceNormalization").output[0]
    net.graph.node.append(helper.make_node("Identity", [inner], ["leak"], name="leak"))
    net.graph.output.append(onnx.ValueInfoProto(name="leak"))
    assert plan_applies(net.graph, norms, _plans(ref, net, norms, None)[0]) == {}


def test_substitution_puts_mul_add_where_the_emitted_nodes_stood():
    _, conv, norms = _converted("group")
    ref = onnx.load(str(MODEL))
    plan = _plans(ref, conv, norms, None)[0]
    applies = plan_applies(conv.graph, norms, plan)
    first = applies[norms[0].y]
    segment = plan.segments[first.segment]
    nodes = substitute(segment.nodes, {first.norm.y: first})
    names = [n.name for n in nodes]
    assert not first.nodes & set(names)
    mul = next(n for n in nodes if n.op_type == "Mul" and n.input[1] == first.scale)
    add = nodes[names.index(mul.name) + 1]
    assert add.op_type == "Add" and add.input == [mul.output[0], first.shift] and add.output == [first.norm.y]
    position = min(i for i, n in enumerate(segment.nodes) if n.name in first.nodes)
    assert names.index(mul.name) == position
