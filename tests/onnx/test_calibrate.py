"""Calibration keeps what the network learned: measured on held-out digits, against the uncalibrated swap, and
checked against the plain sequential fit it must reproduce at a fraction of the cost."""
import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import normswap
from normswap.onnx.calibrate import _plans, calibrate
from normswap.onnx.convert import convert_in_place
from normswap.onnx.segments import plan_segments
from normswap.targets import ReplaceOptions
from normswap.validate.providers import CPU

from tests.builders import bn_node, bn_params, init, model, vi
from tests.onnx.sequential_calibration import sequential_fit

FIXTURES = Path(__file__).parent.parent.parent / "fixtures"
MODEL = FIXTURES / "digits_resnet.onnx"


@pytest.fixture(scope="module")
def digits():
    x = np.load(FIXTURES / "digits_heldout.npz")["x"]
    return {"x": x[:200]}, {"x": x[200:]}  # calibration, held out


def _agreement(result):
    return result.report.validation.outputs[0].top1_agreement


def _arrays(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}


def _assert_same_weights(a: onnx.ModelProto, b: onnx.ModelProto, rtol=1e-4, atol=1e-5) -> None:
    wa, wb = _arrays(a), _arrays(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].shape == wb[name].shape, name
        np.testing.assert_allclose(wa[name], wb[name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("target,options,floor", [("layer", {}, 0.97), ("group", {"groups": "auto"}, 0.97)])
def test_calibration_recovers_the_function(digits, target, options, floor):
    calib, held = digits
    plain = normswap.convert(MODEL, to=target, inputs=held, **options)
    fitted = normswap.convert(MODEL, to=target, inputs=held, calibration=calib, min_agreement=floor, **options,
                              refine=False)
    assert _agreement(plain) < 0.6  # copying gamma/beta forgets (Opacus-style)
    assert _agreement(fitted) >= floor
    assert fitted.report.function_preserved and fitted.report.calibration.samples == 200
    assert all(layer.calibrated for layer in fitted.report.layers)
    changed = fitted.report.calibration.layers_changed
    assert set(changed) >= {layer.name for layer in fitted.report.layers}
    assert fitted.report.calibration.head in changed  # the output layer was refitted, and listed


def test_norms_only_scope_leaves_the_output_layer(digits):
    calib, held = digits
    r = normswap.convert(MODEL, to="layer", inputs=held, calibration=calib, refit_output_layer=False, refine=False)
    assert r.report.calibration.head is None and r.report.calibration.scope == "norms"
    head = {t.name: t for t in onnx.load(str(MODEL)).graph.initializer}
    after = {t.name: t for t in r.model.graph.initializer}
    for name in ("fc.weight", "fc.bias"):
        assert after[name] == head[name]


def test_asked_groups_are_honoured_and_auto_chooses_by_fit(digits):
    calib, held = digits
    by_fit = normswap.convert(MODEL, to="group", groups="auto", calibration=calib, inputs=held, refine=False)
    fixed = normswap.convert(MODEL, to="group", groups=32, calibration=calib, inputs=held, refine=False)
    assert [layer.groups for layer in fixed.report.layers] == [16, 16, 16, 24, 24, 24]  # largest divisor <= 32
    assert any(a.groups != b.groups for a, b in zip(by_fit.report.layers, fixed.report.layers))
    assert "chose" in by_fit.report.layers[-1].reason


def test_batch_size_does_not_change_the_fit(digits):
    calib, held = digits
    a = normswap.convert(MODEL, to="layer", calibration=calib, calibration_batch_size=7, validate=False, refine=False)
    b = normswap.convert(MODEL, to="layer", calibration=calib, calibration_batch_size=1000, validate=False,
                         refine=False)
    _assert_same_weights(a.model, b.model)


def _converted(target: str, **options):
    ref = onnx.load(str(MODEL))
    conv = copy.deepcopy(ref)
    norms = convert_in_place(conv, target, options=ReplaceOptions(**options)).new_norms
    return ref, conv, norms


@pytest.mark.parametrize("target,options,choose", [
    ("group", {}, True), ("group", {}, False), ("group", {"groups": 4}, True), ("layer", {}, True),
    ("layer", {"layer_over": "channels"}, True), ("instance", {}, True)])
def test_segmented_fit_equals_the_sequential_fit(digits, target, options, choose):
    calib, _ = digits
    ref, expected, norms = _converted(target, **options)
    sequential_fit(ref, expected, norms, calib, choose_groups=choose)
    ref, got, norms = _converted(target, **options)
    report = calibrate(ref, got, norms, calib, (CPU,), refit_output_layer=False, choose_groups=choose)
    _assert_same_weights(got, expected)
    assert report.segments == 6 and report.passes == 1  # a chain of six norms: six segments, one sweep


def test_the_comparison_with_the_sequential_fit_can_fail(digits):
    """Fitting every layer on the original's own inputs (no sequential dependence) must not pass for it."""
    calib, _ = digits
    ref, expected, norms = _converted("layer")
    sequential_fit(ref, expected, norms, calib)
    ref, parallel, norms = _converted("layer")
    for k in range(len(norms)):  # each layer alone, on a network whose other layers hold gamma / beta
        _, alone, alone_norms = _converted("layer")
        sequential_fit(ref, alone, [alone_norms[k]], calib)
        fitted = _arrays(alone)
        inits = {t.name: t for t in parallel.graph.initializer}
        for name in (norms[k].scale, norms[k].shift):
            inits[name].CopyFrom(onnx.numpy_helper.from_array(fitted[name], name))
    with pytest.raises(AssertionError):
        _assert_same_weights(parallel, expected)


def test_every_node_runs_in_exactly_one_segment(digits):
    ref, conv, norms = _converted("group")
    by_node = {name: n for n in norms for name in n.record.new_nodes}
    late = {i: by_node[node.name].x for i, node in enumerate(conv.graph.node) if node.name in by_node}
    plan = plan_segments(conv.graph, roots=[n.x for n in norms], late=late, hold=[conv.graph.output[0].name])
    constant = _constant_outputs(conv.graph)
    ran = [o for seg in plan.segments for node in seg.nodes for o in node.output if o not in constant]
    assert sorted(ran) == sorted(o for node in conv.graph.node for o in node.output if o not in constant)
    for n in norms:  # a layer's emitted nodes all run after its input's segment: it is fitted in between
        emitted = [s.index for s in plan.segments for node in s.nodes if node.name in n.record.new_nodes]
        assert min(emitted) > plan.segment_of[n.x]


def _constant_outputs(graph: onnx.GraphProto) -> set[str]:
    """Outputs of the nodes that read only initializers and other such nodes."""
    known, out = {t.name for t in graph.initializer}, set()
    for node in graph.node:
        if all(i in known for i in node.input if i):
            out.update(node.output)
            known.update(node.output)
    return out


def test_constant_nodes_run_inside_each_segment_that_reads_them_never_between_segments():
    """paddle2onnx keeps BN parameters (and computes weights) in Constant nodes: passed between segments they
    reached later segments as graph inputs, where onnxruntime cannot fold or prepack them."""
    from tests.builders import paddle_style
    ref = paddle_style(np.random.default_rng(0), head="map")
    conv = copy.deepcopy(ref)
    norms = convert_in_place(conv, "group", ReplaceOptions(groups=2)).new_norms
    _, plan, _ = _plans(ref, conv, norms, None)  # the original's cut: its BNs read Constant nodes
    made = _constant_outputs(ref.graph)
    assert made and len(plan.segments) > 2
    for seg in plan.segments:
        assert not made & set(seg.reads + seg.writes)
        computed = {o for node in seg.nodes for o in node.output}
        for node in seg.nodes:  # every constant this segment's nodes read is computed in it
            assert all(i in computed or i not in made for i in node.input)
    # a constant node is copied only where it is read: not every segment computes every constant
    assert any(not {o for node in seg.nodes for o in node.output} >= made for seg in plan.segments)
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((24, 3, 16, 16)).astype(np.float32)}
    report = calibrate(ref, conv, norms, data, (CPU,), batch_size=8)
    assert report.segments > 2 and len(report.layers_changed) == len(norms)


def test_activations_spill_to_disk_beyond_the_memory_budget(digits):
    calib, _ = digits
    kept = normswap.convert(MODEL, to="group", calibration=calib, validate=False, refine=False)
    spilled = normswap.convert(MODEL, to="group", calibration=calib, validate=False, calibration_memory=0, refine=False)
    a, b = kept.report.calibration, spilled.report.calibration
    assert a.activations == "memory" and a.spilled_bytes == 0 and a.peak_activation_bytes > 0
    assert b.activations == "memory and disk" and b.spilled_bytes > 0 and b.peak_activation_bytes == 0
    assert b.peak_rss_bytes > 0 and b.memory_budget == 0
    _assert_same_weights(kept.model, spilled.model, rtol=0, atol=0)


def test_calibration_reports_progress(digits):
    calls = []
    normswap.convert(MODEL, to="layer", calibration=digits[0], validate=False,
                     progress=lambda done, total, label: calls.append((done, total, label)), refine=False)
    assert calls and calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == sorted(c[0] for c in calls)
    assert "samples/s" in calls[0][2] and "segment 1/" in calls[0][2]


def test_mismatched_calibration_data_is_a_usage_error(tmp_path):
    np.savez(tmp_path / "c.npz", y=np.zeros((3, 1, 8, 8), np.float32))
    with pytest.raises(normswap.UsageError, match="no array for input"):
        normswap.convert(MODEL, to="layer", calibration=tmp_path / "c.npz", refine=False)


def test_parallel_branches_share_a_segment():
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["a"], name="ra"),
                           helper.make_node("Relu", ["x"], ["b"], name="rb"),
                           helper.make_node("Add", ["a", "b"], ["c"], name="add"),
                           helper.make_node("Relu", ["c"], ["d"], name="rd")], "g", [], [])
    # 'ra' and 'rb' apply layers fitted on x, 'rd' one fitted on c
    plan = plan_segments(g, roots=["d"], late={0: "x", 1: "x", 3: "c"})
    assert [[n.name for n in s.nodes] for s in plan.segments] == [[], ["ra", "rb", "add"], ["rd"]]
    assert plan.segments[1].writes == ["c"] and plan.segments[2].reads == ["c"]
    raised = plan_segments(g, roots=["d"], raised={"a": "x", "b": "x"}, export={"a": 0, "b": 0})
    assert [[n.name for n in s.nodes] for s in raised.segments] == [["ra", "rb"], ["add", "rd"]]
    assert raised.segments[0].writes == ["a", "b"]


# --- any batch layout ------------------------------------------------------------------------------------------

def _fixed_batch_net(batch: int | str, *, slice_first: bool = False) -> onnx.ModelProto:
    """x -> Conv -> BN -> Relu -> Conv -> BN -> Relu -> GlobalAveragePool -> Reshape([batch, 8]) -> Gemm, with the
    batch fixed the way exporters fix it (a constant Reshape target); ``slice_first`` adds a Slice that keeps
    sample 0 only, which no freed batch dimension can survive."""
    rng = np.random.default_rng(3)
    inits = [init("w1", rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
             init("w2", rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2),
             init("fc", rng.standard_normal((8, 4)).astype(np.float32)), init("fcb", np.zeros(4, np.float32))]
    n1, p1 = bn_params(8, rng, "bn1")
    n2, p2 = bn_params(8, rng, "bn2")
    shape_value = np.array([batch if isinstance(batch, int) else 0, 8], np.int64)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1] * 4),
             bn_node("c1", "b1", n1, name="bn1"), helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1] * 4),
             bn_node("c2", "b2", n2, name="bn2"), helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
             helper.make_node("Constant", [], ["shape"], name="shape", value=onnx.numpy_helper.from_array(
                 shape_value)),
             helper.make_node("Reshape", ["p", "shape"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], name="head")]
    outputs = [vi("logits", [batch, 4])]
    if slice_first:
        inits += [init("s0", np.array([0], np.int64)), init("s1", np.array([1], np.int64))]
        nodes.append(helper.make_node("Slice", ["logits", "s0", "s1", "s0"], ["first"], name="first"))
        outputs.append(vi("first", [1, 4]))
    return model(nodes, [vi("x", [batch, 3, 8, 8])], outputs, inits + p1 + p2)


def _images(count: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(7).standard_normal((count, 3, 8, 8)).astype(np.float32)}


def test_a_fixed_batch_model_calibrates_and_validates_with_any_sample_count():
    fixed = normswap.convert(_fixed_batch_net(1), to="group", groups=4, calibration=_images(37),
                             inputs=_images(23), refine=False)
    free = normswap.convert(_fixed_batch_net("N"), to="group", groups=4, calibration=_images(37),
                            inputs=_images(23), refine=False)
    note = fixed.report.calibration.batch_layout
    assert "fixes its batch to 1" in note and "free it" in note
    assert fixed.report.validation is not None and fixed.report.validation.outputs[0].top1_agreement > 0.5
    for a, b in zip(fixed.model.graph.initializer, free.model.graph.initializer):  # the same fit either way
        if a.name != "shape":
            np.testing.assert_allclose(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), rtol=1e-4,
                                       atol=1e-5)
    assert [d.dim_value for d in fixed.model.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]


def test_a_batch_that_cannot_be_freed_is_fed_at_the_models_own_size():
    net = _fixed_batch_net(2, slice_first=True)
    result = normswap.convert(net, to="group", groups=4, calibration=_images(5), inputs=_images(3), refine=False)
    note = result.report.calibration.batch_layout
    assert "fed 2 sample(s) per run" in note and "changes its results" in note
    reference = normswap.convert(net, to="group", groups=4, calibration=_images(5), inputs=_images(3),
                                 calibration_batch_size=2, refine=False)
    _assert_same_weights(result.model, reference.model)
    assert result.report.validation.outputs[0].name == "logits"


def test_fit_sums_in_the_graph_match_numpy_at_old_and_new_opsets():
    import onnxruntime as ort
    from normswap._math import MOMENTS, Z_SUMS
    from normswap.onnx.fit_stats import add_fit_stats
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 4, 5, 5)) * 3 + 40).astype(np.float32)
    y = (rng.standard_normal((3, 4, 5, 5)) + 20).astype(np.float32)
    xc, yc = rng.uniform(30, 50, 4), rng.uniform(15, 25, 4)
    for opset in (11, 18):
        for channel_norm in (False, True):
            m = model([], [vi("x", None), vi("y", None)], [], opset=opset)
            shape, sums = add_fit_stats(m.graph, opset, x="x", target="y", channels=4, eps=1e-5, x_center=xc,
                                        y_center=yc, channel_norm=channel_norm, prefix="t")
            names = [shape, *sums.values()]
            got = dict(zip(names, ort.InferenceSession(m.SerializeToString(), providers=[CPU]).run(
                names, {"x": x, "y": y})))
            xr = x.reshape(3, 4, -1).astype(np.float64) - xc[None, :, None]
            yr = y.reshape(3, 4, -1).astype(np.float64) - yc[None, :, None]
            assert list(got[shape]) == [3, 4, 25]
            if channel_norm:
                from normswap._math import channel_normalize
                z = channel_normalize(x, 1e-5).reshape(3, 4, -1)
                want = dict(zip(Z_SUMS, (z.sum(2), (z * z).sum(2), yr.sum(2), (yr * yr).sum(2), (z * yr).sum(2))))
            else:
                want = dict(zip(MOMENTS, (xr.sum(2), (xr * xr).sum(2), (xr * yr).sum(2), yr.sum(2),
                                          (yr * yr).sum(2))))
            for k, v in want.items():
                np.testing.assert_allclose(got[sums[k]], v, rtol=1e-4, atol=1e-3, err_msg=f"{k} at opset {opset}")


def test_a_non_tensor_value_between_segments_is_refused_in_one_line():
    from normswap.onnx.segments import Segment, segment_model
    m = model([helper.make_node("SequenceLength", ["seq"], ["n"], name="len")], [], [vi("n", [])])
    with pytest.raises(normswap.UnsupportedError, match="non-tensor value 'seq'"):
        segment_model(m, Segment(1, list(m.graph.node), ["seq"], ["n"]), {"seq": None}, False)
    ok = segment_model(m, Segment(1, list(m.graph.node), ["seq"], ["n"]), {"seq": np.dtype(np.int64)}, False)
    assert [i.name for i in ok.graph.input] == ["seq"] and [o.name for o in ok.graph.output] == ["n"]


def test_an_ir3_model_listing_initializers_as_inputs_calibrates_when_g_changes(digits):
    calib, held = digits
    m = onnx.load(str(MODEL))
    m.ir_version = 3  # initializers must also be inputs, with their shapes
    m.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer)
    result = normswap.convert(m, to="group", groups="auto", calibration=calib, inputs=held, progress=False,
                              refine=False)
    assert [layer.groups for layer in result.report.layers][0] != 16  # the fit changed G: shapes were updated
    assert result.report.validation.outputs[0].top1_agreement >= 0.97
    declared = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in result.model.graph.input}
    for t in result.model.graph.initializer:
        assert declared[t.name] == list(t.dims), t.name


def test_a_caffe2_light_model_with_initializers_among_its_inputs_calibrates():
    """onnx's Caffe2-era 'light' models (IR 3: every initializer is also a graph input, *_SHAPE and dummy
    tensors among them) calibrate: the segment models keep what the graph needs."""
    import onnx.backend.test
    light = Path(onnx.backend.test.__file__).parent / "data" / "light" / "light_shufflenet.onnx"
    if not light.exists():
        pytest.skip("this onnx build ships no light models")
    m = onnx.load(str(light))
    name = normswap_inputs(m)[0]
    data = {name: np.random.default_rng(0).standard_normal((4, 3, 224, 224)).astype(np.float32)}
    r = normswap.convert(m, to="group", groups="auto", calibration=data, inputs=data, progress=False, refine=False)
    assert r.report.count("converted") == 49 and r.report.calibration.segments > 1
    assert r.report.validation.outputs[0].cosine > 0.99


def normswap_inputs(m):
    from normswap.validate.inputs import model_inputs
    return [i.name for i in model_inputs(m)]


def test_function_preserved_is_decided_by_a_gate_and_unknown_without_one(digits):
    calib, held = digits
    measured = normswap.convert(MODEL, to="group", groups=32, calibration=calib, inputs=held, progress=False,
                                refine=False)
    assert measured.report.function_preserved is None and measured.report.passed is None
    failed = normswap.convert(MODEL, to="group", groups=32, calibration=calib, inputs=held, min_agreement=0.99,
                              progress=False, refine=False)
    assert failed.report.function_preserved is False and failed.report.passed is False
    kept = normswap.convert(MODEL, to="group", groups="auto", calibration=calib, inputs=held, min_agreement=0.9,
                            progress=False, refine=False)
    assert kept.report.function_preserved is True and kept.report.passed is True


def test_large_inputs_calibrate_in_smaller_batches_small_ones_in_the_asked_batch():
    from normswap.onnx.batching import BATCH_INPUT_BYTES, batch_rows
    pages = {"x": np.zeros((64, 3, 736, 736), np.float32)}  # 6.5 MB a sample
    lines = {"x": np.zeros((64, 3, 48, 192), np.float32)}
    assert batch_rows(pages, 64) == BATCH_INPUT_BYTES // (3 * 736 * 736 * 4) < 64
    assert batch_rows(lines, 64) == 64 and batch_rows(lines, 8) == 8
    assert batch_rows({"x": np.zeros((2, 3, 4096, 4096), np.float32)}, 64) == 1
