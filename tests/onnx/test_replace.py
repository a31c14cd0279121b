"""group / layer / instance: every emitted form against float64 reference math (also at |mean|/std >= 100),
group choice, and the sites that cannot be normalized sensibly."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import normswap
from normswap._math import channel_normalize, group_normalize
from tests.builders import bn_node, bn_params, model, ops, out, run, vi


def _bn_model(shape, opset=17, elem=TensorProto.FLOAT, eps=1e-5, rng=None):
    rng = rng or np.random.default_rng(0)
    names, params = bn_params(shape[1], rng)
    m = model([helper.make_node("Identity", ["x"], ["h"]), bn_node("h", "y", names, eps=eps)],
              [vi("x", list(shape), elem)], [out("y", len(shape), elem)], params, opset=opset)
    gamma, beta = (onnx.numpy_helper.to_array(p).astype(np.float64) for p in params[:2])
    return m, gamma, beta


def _expected(x, gamma, beta, groups, eps, channels_only=False):
    z = channel_normalize(x, eps) if channels_only else group_normalize(x, groups, eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return z * gamma.reshape(shape) + beta.reshape(shape)


CASES = [  # (target, options, shape, expected groups)
    ("group", {"groups": 4}, (2, 8, 4, 4), 4),
    ("group", {"groups": 32}, (2, 12, 3, 3), 6),       # 12 groups of 9 values are too small: 6 of 18
    ("group", {"groups": 5}, (2, 12, 3, 3), 4),        # 12 % 5: largest divisor not above 5
    ("group", {"group_size": 4}, (2, 12, 3, 3), 3),
    ("group", {"groups": 2}, (2, 64), 2),              # (N, C): 32 values per group
    ("group", {"groups": 2}, (2, 6, 5, 5, 2), 2),      # 3-D
    ("layer", {}, (2, 8, 4, 4), 1),
    ("layer", {}, (2, 32), 1),
    ("instance", {}, (2, 8, 4, 4), 8),
    ("instance", {}, (2, 8, 20), 8),                   # 1-D
]


@pytest.mark.parametrize("offset", [0.0, 100.0, 1000.0])
@pytest.mark.parametrize("target,opts,shape,groups", CASES)
def test_emitted_form_matches_float64_reference(target, opts, shape, groups, offset):
    m, gamma, beta = _bn_model(shape, eps=1e-3)
    r = normswap.convert(m, to=target, validate=False, **opts)
    assert r.report.layers[0].action == "converted" and r.report.layers[0].groups == groups
    onnx.checker.check_model(r.model)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 1.0 + offset).astype(np.float32)  # |mean| / std up to 1000
    got = run(r.model, {"x": x})[0]
    expected = _expected(x.astype(np.float64), gamma, beta, groups, 1e-3)
    # float32 input quantization alone is ~ offset * 6e-8 relative to std 1
    np.testing.assert_allclose(got, expected, atol=1e-4 + offset * 2e-6, rtol=1e-4)


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("shape", [(2, 16, 3, 3), (2, 16), (2, 16, 5)])
def test_layer_over_channels_at_every_opset(opset, shape):
    m, gamma, beta = _bn_model(shape, opset=opset)
    r = normswap.convert(m, to="layer", layer_over="channels", validate=False)
    assert r.model.opset_import[0].version == opset  # never changed silently
    reduce = next(n for n in r.model.graph.node if n.op_type == "ReduceMean")
    assert len(reduce.input) == (2 if opset >= 18 else 1)  # axes: an input from opset 18, an attribute before
    x = (np.random.default_rng(2).standard_normal(shape) + 100).astype(np.float32)
    expected = _expected(x.astype(np.float64), gamma, beta, None, 1e-5, channels_only=True)
    np.testing.assert_allclose(run(r.model, {"x": x})[0], expected, atol=2e-4, rtol=1e-4)


def test_opset_upgrade_is_explicit():
    m, _, _ = _bn_model((2, 16, 3, 3), opset=13)
    r = normswap.convert(m, to="layer", layer_over="channels", opset=18, validate=False)
    assert r.model.opset_import[0].version == 18
    assert len(next(n for n in r.model.graph.node if n.op_type == "ReduceMean").input) == 2  # the opset-18 form
    assert m.opset_import[0].version == 13
    with pytest.raises(normswap.UsageError, match="only upgrades"):
        normswap.convert(m, to="group", opset=11)


@pytest.mark.parametrize("target", ["group", "layer", "instance"])
def test_fp16_inputs_stay_fp16(target):
    m, gamma, beta = _bn_model((2, 8, 4, 4), elem=TensorProto.FLOAT16)
    r = normswap.convert(m, to=target, validate=False, **({"groups": 2} if target == "group" else {}))
    onnx.shape_inference.infer_shapes(r.model, check_type=True, strict_mode=True)
    x = np.random.default_rng(3).standard_normal((2, 8, 4, 4)).astype(np.float16)
    got = run(r.model, {"x": x})[0]
    assert got.dtype == np.float16
    g = {"group": 2, "layer": 1, "instance": 8}[target]
    np.testing.assert_allclose(got, _expected(x.astype(np.float64), gamma, beta, g, 1e-5), atol=3e-2, rtol=1e-2)


def test_groups_too_small_on_nc_input_are_enlarged_and_degenerate_sites_become_affine():
    # opacus#567: GroupNorm(C, C) on (N, C) input outputs beta for any input
    m, _, _ = _bn_model((2, 64))
    r = normswap.convert(m, to="group", groups=32, validate=False)
    layer = r.report.layers[0]
    assert layer.action == "converted" and layer.groups == 4
    assert "asked groups=32: 32 groups would hold fewer than" in layer.reason
    tiny, _, _ = _bn_model((2, 8))  # 8 values per sample: no group can be large enough
    r = normswap.convert(tiny, to="group", validate=True)
    layer = r.report.layers[0]
    assert layer.action == "affine" and "discard the signal" in layer.reason
    assert r.report.passed is None and r.report.validation.outputs[0].cosine > 0.999999  # measured, no gate


def test_instance_without_spatial_dims_is_reported_and_made_affine():
    m, _, _ = _bn_model((2, 32))
    r = normswap.convert(m, to="instance", validate=False)
    assert r.report.layers[0].action == "affine" and "no spatial dims" in r.report.layers[0].reason


def test_unknown_spatial_size_is_read_by_running_the_model():
    names, params = bn_params(8, np.random.default_rng(4))
    m = model([bn_node("x", "y", names)], [vi("x", ["N", 8, "H", "W"])], [out("y", 4)], params)
    r = normswap.convert(m, to="group", groups=4, validate=False, input_shapes={"x": (1, 8, 4, 4)})
    assert r.report.layers[0].action == "converted" and r.report.layers[0].groups == 4
    assert "Shape" in ops(r.model)  # the reshape back uses the run-time shape


def test_new_nodes_carry_the_rule_name_and_the_report_maps_them():
    m, _, _ = _bn_model((2, 8, 4, 4))
    r = normswap.convert(m, to="group", groups=2, validate=False)
    new = r.report.layers[0].new_nodes
    assert new and all("normswap_to_groupnorm" in n for n in new)
    assert {n.name for n in r.model.graph.node} >= set(new)
    assert "BatchNormalization" not in ops(r.model)


def test_without_calibration_the_report_says_the_function_is_not_preserved():
    m, _, _ = _bn_model((2, 8, 4, 4))
    r = normswap.convert(m, to="layer")
    assert r.report.function_preserved is False
    assert any("NOT preserved" in n for n in r.report.notes)
    assert r.report.validation.check == "fidelity" and r.report.to_dict()["function_preserved"] is False


def test_fidelity_gates():
    m, _, _ = _bn_model((2, 8, 4, 4))
    assert normswap.convert(m, to="instance", min_cosine=-1.0).report.passed
    r = normswap.convert(m, to="instance", min_cosine=0.99999999)
    assert r.report.passed is False and not r.report.validation.outputs[0].passed
    with pytest.raises(normswap.ValidationFailedError):
        r.save("never.onnx")


def test_bn_parameters_from_constant_nodes_are_replaced():
    rng = np.random.default_rng(5)
    g, b = rng.uniform(0.5, 1.5, 8).astype(np.float32), rng.uniform(-1, 1, 8).astype(np.float32)
    nodes = [helper.make_node("Constant", [], ["g"], value=onnx.numpy_helper.from_array(g)),
             helper.make_node("Constant", [], ["b"], value=onnx.numpy_helper.from_array(b)),
             helper.make_node("ConstantOfShape", ["c"], ["m"]),
             helper.make_node("Expand", ["one", "c"], ["v"]),
             bn_node("x", "y", ["g", "b", "m", "v"])]
    inits = [onnx.numpy_helper.from_array(np.array([8], np.int64), "c"),
             onnx.numpy_helper.from_array(np.array([1.0], np.float32), "one")]
    mdl = model(nodes, [vi("x", [2, 8, 4, 4])], [out("y", 4)], inits)
    r = normswap.convert(mdl, to="group", groups=4, validate=False)
    assert r.report.layers[0].action == "converted"
    assert not {"Constant", "ConstantOfShape", "Expand"} & set(ops(r.model))
    x = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(r.model, {"x": x})[0],
                               _expected(x, g.astype(np.float64), b.astype(np.float64), 4, 1e-5), atol=1e-4)


def test_group_size_reason_quotes_what_was_asked():
    m, _, _ = _bn_model((2, 64, 4, 4))
    layer = normswap.convert(m, to="group", group_size=7, validate=False).report.layers[0]
    assert layer.groups == 8 and "asked group_size=7: 64 channels are not a multiple of 7" in layer.reason
    exact = normswap.convert(m, to="group", group_size=8, validate=False).report.layers[0]
    assert exact.groups == 8 and "asked" not in exact.reason


def test_one_channel_per_group_is_called_instance_norm():
    m, _, _ = _bn_model((2, 16, 4, 4))
    layer = normswap.convert(m, to="group", groups=32, validate=False).report.layers[0]
    assert layer.groups == 16 and "one channel per group: InstanceNorm" in layer.reason
    two = normswap.convert(m, to="group", groups=8, validate=False).report.layers[0]
    assert two.groups == 8 and "InstanceNorm" not in two.reason
