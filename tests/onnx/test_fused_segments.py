"""Calibration runs segment ``s`` of the original and of the converted model in one session (``fused_segments``):
two graphs with the same value names stay apart, linked values flow inside, and the fit is the one two separate
sessions give."""
import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

import normswap.onnx.calibrate as calibrate_module
from normswap.onnx.calibrate import calibrate
from normswap.onnx.fused_segments import can_fuse, fuse
from normswap.validate.providers import CPU

from tests.builders import init, model, vi
from tests.onnx.test_calibrate import MODEL, _converted


@pytest.fixture(scope="module")
def digits():
    return {"x": np.load(MODEL.parent / "digits_heldout.npz")["x"][:120]}


def _run(m: onnx.ModelProto, feeds: dict) -> dict:
    session = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _pair():
    """Two models using the same names for different computations; the second reads a 'target' input and has an
    If whose branch reads an outer value."""
    first = model([helper.make_node("Mul", ["x", "w"], ["h"], name="n"), helper.make_node("Relu", ["h"], ["y"])],
                  [vi("x", [2, 3])], [vi("h", [2, 3]), vi("y", [2, 3])], [init("w", np.full((2, 3), 2, np.float32))])
    branch = helper.make_graph([helper.make_node("Neg", ["h"], ["b"])], "then", [], [vi("b", [2, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["h"], ["b2"])], "else", [], [vi("b2", [2, 3])])
    second = model([helper.make_node("Add", ["x", "w"], ["h"], name="n"),
                    helper.make_node("Sub", ["h", "target"], ["d"], name="d"),
                    helper.make_node("ReduceSum", ["d"], ["s"], keepdims=0, name="s"),
                    helper.make_node("Greater", ["s", "zero"], ["c"], name="c"),
                    helper.make_node("If", ["c"], ["out"], name="if", then_branch=branch, else_branch=other)],
                   [vi("x", [2, 3]), vi("target", [2, 3])], [vi("out", [2, 3]), vi("d", [2, 3])],
                   [init("w", np.full((2, 3), 5, np.float32)), init("zero", np.zeros((), np.float32))])
    return first, second


def test_fused_graphs_keep_their_own_values_and_read_the_linked_ones():
    first, second = _pair()
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    alone_first = _run(first, {"x": x})
    alone_second = _run(second, {"x": x, "target": alone_first["y"]})
    fused = fuse(copy.deepcopy(first), copy.deepcopy(second), "p::", {"target": "y", "x": "x"}, drop_outputs={"h"})
    onnx.checker.check_model(fused)
    assert [i.name for i in fused.graph.input] == ["x"]  # the target is the first's y, x is bound once
    got = _run(fused, {"x": x})
    assert set(got) == {"y", "p::out", "p::d"}  # h no longer written out
    np.testing.assert_array_equal(got["y"], alone_first["y"])
    np.testing.assert_array_equal(got["p::out"], alone_second["out"])
    np.testing.assert_array_equal(got["p::d"], alone_second["d"])


def test_an_unlinked_input_stays_an_input_of_its_own():
    first, second = _pair()
    fused = fuse(first, second, "p::", {"target": "not_computed_here"})
    assert [i.name for i in fused.graph.input] == ["x", "p::x", "p::target"]
    x = np.ones((2, 3), np.float32)
    got = _run(fused, {"x": x, "p::x": x + 1, "p::target": np.zeros((2, 3), np.float32)})
    np.testing.assert_array_equal(got["p::d"], x + 1 + 5)


def test_models_that_disagree_on_opsets_or_functions_are_not_fused():
    first, second = _pair()
    assert can_fuse(first, second)
    other = copy.deepcopy(second)
    other.opset_import[0].version += 1
    assert not can_fuse(first, other)
    other = copy.deepcopy(second)
    other.functions.append(helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("Neg", ["a"], ["b"])],
                                                [helper.make_opsetid("", 17)]))
    assert not can_fuse(first, other)
    other = copy.deepcopy(second)
    other.ir_version -= 1
    assert not can_fuse(first, other)


def _sessions(monkeypatch) -> list[str]:
    """The input names of every segment session calibration opens."""
    opened = []
    real = calibrate_module._Runner.session

    def session(self, m, s):
        opened.append([i.name for i in m.graph.input])
        return real(self, m, s)
    monkeypatch.setattr(calibrate_module._Runner, "session", session)
    return opened


@pytest.mark.parametrize("target,options", [("group", {}), ("layer", {}), ("instance", {}),
                                            ("layer", {"layer_over": "channels"})])
def test_fused_segments_fit_what_separate_sessions_fit(digits, monkeypatch, target, options):
    ref, separate, norms = _converted(target, **options)
    with monkeypatch.context() as m:
        m.setattr(calibrate_module, "can_fuse", lambda *a: False)
        opened = _sessions(m)
        apart = calibrate(ref, separate, norms, digits, (CPU,))
    separate_sessions = len(opened)
    opened = _sessions(monkeypatch)
    ref, fused, norms = _converted(target, **options)
    together = calibrate(ref, fused, norms, digits, (CPU,))
    assert len(opened) == together.segments < separate_sessions  # one session per segment
    assert not any(name.startswith(calibrate_module.FUSED + calibrate_module.TARGET) for names in opened
                   for name in names)  # every BN output flowed inside its session
    assert together.layers_changed == apart.layers_changed
    fitted = {t.name: onnx.numpy_helper.to_array(t) for t in fused.graph.initializer}
    for t in separate.graph.initializer:
        np.testing.assert_allclose(fitted[t.name], onnx.numpy_helper.to_array(t), rtol=1e-5, atol=1e-6,
                                   err_msg=t.name)


def test_a_conversion_to_another_opset_calibrates_with_the_segments_apart(digits, monkeypatch):
    """The original at its own opset and the converted model upgraded are not fused (their nodes may mean
    different things): each segment then has a session per model, and the fit still holds."""
    import normswap
    fused = []
    real = calibrate_module.can_fuse

    def spy(first, second):
        fused.append(real(first, second))
        return fused[-1]
    monkeypatch.setattr(calibrate_module, "can_fuse", spy)
    opened = _sessions(monkeypatch)
    result = normswap.convert(MODEL, "group", calibration=digits, opset=21, refine=False, validate=False,
                              progress=False)
    assert fused == [False] and result.report.calibration.layers_changed
    assert len(opened) > result.report.calibration.segments  # the original's and the converted's sessions
    assert any(name.startswith(calibrate_module.TARGET) for names in opened for name in names)
