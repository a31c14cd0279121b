"""Guards shared by all rewrites, the affine fallback, subgraphs and what a conversion must preserve."""
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import normswap
from tests.builders import IR, bn_node, bn_params, conv_bn, init, model, ops, out, run, vi


def test_training_mode_bn_is_never_folded():
    rng = np.random.default_rng(0)
    m = conv_bn(rng)
    m.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    m.graph.node[1].output.extend(["running_mean", "running_var"])  # BatchNormalization-15 in training: 3 outputs
    m.opset_import[0].version = 15
    for target in ("fold", "affine"):
        r = normswap.convert(m, to=target, validate=False)
        assert r.report.layers[0].action == "kept" and "training_mode=1" in r.report.layers[0].reason
        assert ops(r.model) == ["Conv", "BatchNormalization"]


def test_inference_bn_with_training_mode_zero_folds():
    rng = np.random.default_rng(0)
    m = conv_bn(rng)
    m.graph.node[1].attribute.append(helper.make_attribute("training_mode", 0))
    m.opset_import[0].version = 15
    assert normswap.convert(m, to="fold", validate=False).report.layers[0].action == "folded"


def test_bn_after_concat_becomes_exact_affine_and_keep_unfoldable_keeps_it():
    rng = np.random.default_rng(1)
    names, params = bn_params(6, rng)
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1), bn_node("c", "y", names)]
    m = model(nodes, [vi("a", [2, 2, 4, 4]), vi("b", [2, 4, 4, 4])], [out("y", 4)], params)
    r = normswap.convert(m, to="fold")
    assert r.report.layers[0].action == "affine" and "Concat" in r.report.layers[0].reason
    assert ops(r.model) == ["Concat", "Mul", "Add"] and r.report.passed
    kept = normswap.convert(m, to="fold", keep_unfoldable=True, validate=False)
    assert kept.report.layers[0].action == "kept" and ops(kept.model) == ["Concat", "BatchNormalization"]


def test_bn_on_graph_input_and_bn_after_bn():
    rng = np.random.default_rng(2)
    n1, p1 = bn_params(3, rng, "bn1")
    n2, p2 = bn_params(3, rng, "bn2")
    nodes = [bn_node("x", "h", n1, name="bn1"), bn_node("h", "y", n2, name="bn2")]
    m = model(nodes, [vi("x", [2, 3, 4])], [out("y", 3)], p1 + p2)
    r = normswap.convert(m, to="fold")
    assert [layer.action for layer in r.report.layers] == ["affine", "affine"]
    assert "graph input" in r.report.layers[0].reason and r.report.passed
    assert r.report.nodes_after - r.report.nodes_before <= 2  # at most one more node per BN made affine


def test_chained_bns_after_a_conv_both_fold():
    rng = np.random.default_rng(3)
    m = conv_bn(rng)
    n2, p2 = bn_params(6, rng, "bn2")
    m.graph.node[1].output[0] = "h"
    m.graph.node.append(bn_node("h", "y", n2, name="bn2"))
    m.graph.initializer.extend(p2)
    r = normswap.convert(m, to="fold")
    assert [layer.action for layer in r.report.layers] == ["folded", "folded"]
    assert ops(r.model) == ["Conv"] and r.report.passed


def test_affine_target_turns_every_bn_into_mul_add():
    rng = np.random.default_rng(4)
    r = normswap.convert(conv_bn(rng), to="affine")
    assert ops(r.model) == ["Conv", "Mul", "Add"] and r.report.layers[0].action == "affine"
    assert r.report.passed and r.report.validation.check == "exact"


def test_bn15_fp16_input_with_fp32_params_gives_a_valid_typed_model():
    rng = np.random.default_rng(5)
    names, params = bn_params(4, rng)  # fp32 parameters
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn_node("r", "y", names)]
    m = model(nodes, [vi("x", [2, 4, 3, 3], TensorProto.FLOAT16)], [out("y", 4, TensorProto.FLOAT16)], params,
              opset=15)
    r = normswap.convert(m, to="fold")
    onnx.shape_inference.infer_shapes(r.model, check_type=True, strict_mode=True)
    assert r.report.layers[0].action == "affine" and r.report.passed
    consts = [t for t in r.model.graph.initializer if "affine" in t.name]
    assert consts and all(t.data_type == TensorProto.FLOAT16 for t in consts)


def test_non_constant_bn_parameters_are_kept_with_the_reason():
    rng = np.random.default_rng(6)
    names, params = bn_params(4, rng)
    m = model([bn_node("x", "y", ["g"] + names[1:])], [vi("x", [2, 4, 3]), vi("g", [4])], [out("y", 3)],
              params[1:])
    r = normswap.convert(m, to="fold", validate=False)
    assert r.report.layers[0].action == "kept" and "not constant" in r.report.layers[0].reason


def test_initializer_listed_as_input_is_overridable_from_ir4_and_constant_before():
    rng = np.random.default_rng(7)
    m = conv_bn(rng)
    m.graph.input.extend([helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                          for t in m.graph.initializer])
    r = normswap.convert(m, to="fold", validate=False)  # IR 8: overridable, like onnxruntime
    assert r.report.layers[0].action == "kept" and "override" in r.report.layers[0].reason
    old = onnx.ModelProto()
    old.CopyFrom(m)
    old.ir_version = 3
    old.opset_import[0].version = 9
    r3 = normswap.convert(old, to="fold")
    assert r3.report.layers[0].action == "folded" and r3.report.passed
    inits = {t.name for t in r3.model.graph.initializer}
    assert inits <= {i.name for i in r3.model.graph.input}  # IR 3 needs every initializer listed as input
    assert not {"W", "bn.gamma"} & inits


def test_parameters_from_constant_nodes_and_constant_subgraphs_fold():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=onnx.numpy_helper.from_array(w)),
        helper.make_node("Shape", ["W"], ["ws"]),
        helper.make_node("Slice", ["ws", "zero", "one"], ["c"]),
        helper.make_node("ConstantOfShape", ["c"], ["ones"], value=helper.make_tensor("v", 1, [1], [1.0])),
        helper.make_node("CastLike", ["ones", "x"], ["gamma"]),
        helper.make_node("Constant", [], ["beta"], value_floats=[0.1, 0.2, 0.3, 0.4]),
        helper.make_node("Expand", ["half", "c"], ["var"]),
        helper.make_node("Conv", ["x", "W"], ["conv"]),
        bn_node("conv", "y", ["gamma", "beta", "mean", "var"]),
    ]
    inits = [init("zero", np.array([0], np.int64)), init("one", np.array([1], np.int64)),
             init("half", np.array([0.5], np.float32)), init("mean", rng.standard_normal(4).astype(np.float32))]
    m = model(nodes, [vi("x", [2, 4, 3, 3])], [out("y", 4)], inits)
    r = normswap.convert(m, to="fold")
    assert r.report.layers[0].action == "folded" and r.report.passed
    assert ops(r.model) == ["Conv"]  # the constant subgraphs that only fed folded parameters are gone
    assert {t.name for t in r.model.graph.initializer} == {"conv.weight_bnfolded", "conv.bias_bnfolded"}


@pytest.mark.parametrize("kind", ["If", "Loop"])
def test_bn_inside_control_flow_bodies_is_rewritten(kind):
    rng = np.random.default_rng(9)
    names, params = bn_params(4, rng)
    w = init("W", rng.standard_normal((4, 4, 1, 1)).astype(np.float32))
    body_nodes = [helper.make_node("Conv", ["x", "W"], ["bc"], name="body_conv"),
                  bn_node("bc", "by", names, name="body_bn")]
    if kind == "If":
        then_g = helper.make_graph(body_nodes, "then", [], [out("by", 4)])
        else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["ey"])], "else", [], [out("ey", 4)])
        node = helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)
        inputs = [vi("x", [2, 4, 3, 3]), vi("cond", [], TensorProto.BOOL)]
    else:
        cond_out = helper.make_node("Identity", ["cond_in"], ["cond_out"])
        body = helper.make_graph([cond_out] + body_nodes, "body",
                                 [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL)],
                                 [vi("cond_out", [], TensorProto.BOOL), out("by", 4)])
        node = helper.make_node("Loop", ["trip", ""], ["y"], body=body)
        inputs = [vi("x", [2, 4, 3, 3]), vi("trip", [], TensorProto.INT64)]
    m = model([node], inputs, [out("y", 5 if kind == "Loop" else 4)], [w] + params)
    r = normswap.convert(m, to="fold", validate=False)
    assert [(layer.action, layer.graph.split("/")[0]) for layer in r.report.layers] == [("folded", "main")]
    assert r.report.layers[0].graph != "main"
    onnx.checker.check_model(r.model)
    body = r.model.graph.node[0].attribute[0].g
    assert "BatchNormalization" not in [n.op_type for n in body.node]
    feeds = {"x": rng.standard_normal((2, 4, 3, 3)).astype(np.float32)}
    feeds.update({"cond": np.array(True)} if kind == "If" else {"trip": np.array(2, np.int64)})
    np.testing.assert_allclose(run(r.model, feeds)[0], run(m, feeds)[0], rtol=1e-5, atol=1e-5)


def test_interface_opsets_ir_and_metadata_are_preserved():
    rng = np.random.default_rng(10)
    m = conv_bn(rng)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    m.producer_name, m.doc_string = "tests", "a model"
    helper.set_model_props(m, {"author": "me"})
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    r = normswap.convert(m, to="fold", validate=False).model
    assert r.ir_version == IR and list(r.opset_import) == list(m.opset_import)
    assert r.graph.input == m.graph.input and r.graph.output == m.graph.output
    assert list(r.metadata_props) == list(m.metadata_props) and r.producer_name == "tests"
    assert r.doc_string == "a model"


def test_the_input_model_is_never_mutated():
    rng = np.random.default_rng(11)
    m = conv_bn(rng)
    before = m.SerializeToString()
    normswap.convert(m, to="fold")
    normswap.inspect(m)
    assert m.SerializeToString() == before


def test_inspect_agrees_with_convert():
    rng = np.random.default_rng(12)
    m = conv_bn(rng, extra_consumer=True)
    sites = normswap.inspect(m).sites
    assert len(sites) == 1 and sites[0]["foldable"] is False and sites[0]["action_under_fold"] == "affine"
    assert "other consumer" in sites[0]["reason"] and sites[0]["producer_op"] == "Conv"
    assert normswap.inspect(conv_bn(rng)).sites[0]["foldable"] is True


def test_spatial_zero_bn_is_kept():
    rng = np.random.default_rng(13)
    m = conv_bn(rng)
    m.graph.node[1].attribute.append(helper.make_attribute("spatial", 0))
    m.opset_import[0].version = 7
    r = normswap.convert(m, to="fold", validate=False)
    assert r.report.layers[0].action == "kept" and "spatial=0" in r.report.layers[0].reason
    assert any("kept" in note for note in r.report.notes)


def test_bn_whose_running_statistics_outputs_are_used_is_kept():
    rng = np.random.default_rng(14)
    names, params = bn_params(4, rng)
    node = helper.make_node("BatchNormalization", ["x"] + names, ["y", "rm", "rv"], training_mode=1)
    m = model([node], [vi("x", [2, 4, 3])], [out("y", 3), out("rm", 1), out("rv", 1)], params, opset=15)
    r = normswap.convert(m, to="affine", validate=False)
    assert r.report.layers[0].action == "kept"
    node.ClearField("attribute")  # inference mode but statistics outputs wired: still kept
    node.output.extend(["saved_mean", "saved_var"])  # BatchNormalization-9 has 1 or 5 outputs
    m2 = model([node], [vi("x", [2, 4, 3])], [out("y", 3), out("rm", 1), out("rv", 1)], params, opset=9)
    r2 = normswap.convert(m2, to="affine", validate=False)
    assert r2.report.layers[0].action == "kept" and "running-statistics outputs" in r2.report.layers[0].reason


def test_unknown_input_rank_keeps_the_bn_instead_of_guessing():
    rng = np.random.default_rng(15)
    names, params = bn_params(4, rng)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)  # rank unknown
    m = model([bn_node("x", "y", names)], [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
              params)
    r = normswap.convert(m, to="fold", validate=False)
    assert r.report.layers[0].action == "kept" and "rank of its input is unknown" in r.report.layers[0].reason
    assert ops(r.model) == ["BatchNormalization"]


def test_channel_count_mismatch_is_kept():
    rng = np.random.default_rng(16)
    names, params = bn_params(4, rng)
    m = model([bn_node("x", "y", names)], [vi("x", [2, 5, 3])], [out("y", 3)], params)
    from normswap.onnx.convert import convert_in_place
    record = convert_in_place(m, "fold").records[0]  # the rule's guard, below the admission check
    assert record.action == "kept" and "5 channels" in record.reason
    with pytest.raises(normswap.InvalidModelError, match="onnxruntime refuses it"):
        normswap.convert(m, to="fold", validate=False)  # such a model is refused before converting


def test_bn_inside_a_scan_body_and_ir3_subgraph_keeps_its_signature():
    rng = np.random.default_rng(17)
    names, params = bn_params(4, rng)
    body = helper.make_graph(
        [helper.make_node("Identity", ["s_in"], ["s_out"]),
         helper.make_node("Conv", ["xi", "W"], ["c"]), bn_node("c", "yi", names)],
        "scan_body", [vi("s_in", [1]), vi("xi", [2, 4, 3, 3])], [vi("s_out", [1]), out("yi", 4)])
    node = helper.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], body=body, num_scan_inputs=1)
    m = model([node], [vi("s0", [1]), vi("xs", [3, 2, 4, 3, 3])], [vi("s_final", [1]), out("ys", 5)],
              [init("W", rng.standard_normal((4, 4, 1, 1)).astype(np.float32))] + params)
    r = normswap.convert(m, to="fold", validate=True)
    assert r.report.layers[0].action == "folded" and r.report.passed
    sub = r.model.graph.node[0].attribute[0].g
    assert [i.name for i in sub.input] == ["s_in", "xi"] and "BatchNormalization" not in [n.op_type for n in sub.node]


def test_custom_domain_producers_are_not_folded_into():
    rng = np.random.default_rng(18)
    names, params = bn_params(4, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], domain="com.example"), bn_node("c", "y", names)]
    m = model(nodes, [vi("x", [2, 4, 3, 3])], [out("y", 4)],
              [init("W", rng.standard_normal((4, 4, 1, 1)).astype(np.float32))] + params)
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    m.graph.value_info.append(vi("c", [2, 4, 3, 3]))  # shape inference cannot see through a custom op
    r = normswap.convert(m, to="fold", validate=False)
    assert r.report.layers[0].action == "affine" and "com.example" not in str(r.model.graph.initializer)
    assert r.model.graph.node[0].input[1] == "W"


@pytest.mark.parametrize("role,value", [("gamma", np.nan), ("beta", np.inf), ("mean", -np.inf), ("var", -3.0)])
def test_nonfinite_bn_parameters_are_refused_naming_the_layer(role, value):
    import normswap
    from tests.builders import conv_bn
    m = conv_bn(np.random.default_rng(0))
    tensor = next(t for t in m.graph.initializer if t.name == f"bn.{role}")
    array = onnx.numpy_helper.to_array(tensor).copy()
    array[2] = value
    tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    with pytest.raises(normswap.InvalidModelError, match="BatchNormalization 'bn'"):
        normswap.convert(m, to="fold", validate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw numpy RuntimeWarning either
        allowed = normswap.convert(m, to="fold", validate=False, allow_nonfinite=True)
    assert allowed.report.layers[0].action == "folded"


def test_a_nan_epsilon_is_refused_and_finite_parameters_pass():
    import normswap
    from tests.builders import conv_bn
    m = conv_bn(np.random.default_rng(0), eps=float("nan"))
    with pytest.raises(normswap.InvalidModelError, match="epsilon nan"):
        normswap.convert(m, to="fold", validate=False)
    assert normswap.convert(conv_bn(np.random.default_rng(0)), to="fold").report.passed


def test_duplicate_node_names_are_made_unique_and_reported():
    import onnxruntime as ort
    rng = np.random.default_rng(0)
    names, params = bn_params(4, rng)
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="dup"), bn_node("a", "b", names, name="bn"),
             helper.make_node("Relu", ["b"], ["y"], name="dup")]
    m = model(nodes, [vi("x", [2, 4, 3, 3])], [out("y", 4)], params)
    result = normswap.convert(m, to="affine", validate=False)
    got = [n.name for n in result.model.graph.node]
    assert len(got) == len(set(got)) and "dup" in got
    assert any("renamed" in note and "'dup' -> 'dup_2'" in note for note in result.report.notes)
    ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    unique = normswap.convert(model([helper.make_node("Relu", ["x"], ["a"], name="r1"), bn_node("a", "y", names)],
                                    [vi("x", [2, 4, 3, 3])], [out("y", 4)], params), to="affine", validate=False)
    assert not any("renamed" in note for note in unique.report.notes)  # the negative case: nothing to report


def _bn_after_a_contrib_op(input_dims):
    """Conv -> com.microsoft Gelu -> BN: onnx shape inference does not know the contrib domain, so the BN's input
    rank is unknown until the model runs."""
    rng = np.random.default_rng(30)
    names, params = bn_params(6, rng)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Gelu", ["c"], ["g"], name="gelu", domain="com.microsoft"),
             bn_node("g", "y", names)]
    m = model(nodes, [vi("x", input_dims)], [out("y", 4)],
              [init("W", rng.standard_normal((6, 4, 3, 3)).astype(np.float32))] + params)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return m


def test_bn_inputs_shape_inference_cannot_reach_are_learned_by_running_the_model():
    r = normswap.convert(_bn_after_a_contrib_op([2, 4, 5, 5]), to="fold")
    assert r.report.layers[0].action == "affine" and r.report.passed  # the run gave its rank
    g = normswap.convert(_bn_after_a_contrib_op([2, 4, 5, 5]), to="group", groups=3)
    assert g.report.layers[0].action == "converted" and g.report.layers[0].groups == 3
    given = normswap.convert(_bn_after_a_contrib_op([2, 4, "H", "W"]), to="fold",
                             input_shapes={"x": (2, 4, 5, 5)})
    assert given.report.layers[0].action == "affine"
    unknown = normswap.convert(_bn_after_a_contrib_op([2, 4, "H", "W"]), to="fold", validate=False)
    assert unknown.report.layers[0].action == "kept" and "rank of its input is unknown" in \
        unknown.report.layers[0].reason
    assert any("was not run to learn the rank" in n for n in unknown.report.notes)
