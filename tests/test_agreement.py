"""Agreement in the terms of the task (validate/agreement.py): each output shape gets its task's decision --
top-1, whole-sequence and per-position argmax, per-pixel argmax, IoU of thresholded probability maps -- the
verdict names the measure, --min-agreement gates on it, and a user's own task metric replaces it."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import normswap
from normswap.errors import UsageError
from normswap.validate.agreement import Agreement
from tests.builders import broken_fold, model, out, paddle_style, vi


def _measured(ref, cand, threshold=0.5):
    a = Agreement(threshold)
    a.add(np.asarray(ref, np.float64), np.asarray(cand, np.float64))
    return a.measure, a.value, a.extras


def test_class_scores_get_top1():
    ref = np.eye(4)[[0, 1, 2, 3, 0, 1]]
    cand = ref.copy()
    cand[5] = np.eye(4)[3]
    assert _measured(ref, ref)[:2] == ("top-1", 1.0)
    assert _measured(ref, cand)[:2] == ("top-1", pytest.approx(5 / 6))


def test_sequences_get_whole_sequence_and_per_position_agreement():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((5, 20, 7))
    cand = ref.copy()
    cand[2, 11] = ref[2, 11][::-1]  # one step of one sequence decides another class
    assert np.argmax(cand[2, 11]) != np.argmax(ref[2, 11])
    measure, value, extras = _measured(ref, cand)
    assert measure == "whole-sequence argmax" and value == pytest.approx(4 / 5)
    assert extras["per-position argmax"] == pytest.approx(1 - 1 / 100)
    assert _measured(ref, ref)[1] == 1.0


def test_score_maps_get_per_pixel_argmax():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((2, 3, 4, 4))
    cand = ref.copy()
    cand[0, :, 0, 0] = -ref[0, :, 0, 0] + 10 * (np.arange(3) == np.argmin(ref[0, :, 0, 0]))
    measure, value, _ = _measured(ref, cand)
    assert measure == "per-pixel argmax" and value == pytest.approx(1 - 1 / 32)


def test_probability_maps_get_iou_at_the_threshold():
    ref = np.zeros((1, 1, 4, 4))
    ref[0, 0, :2] = 0.9  # 8 pixels above 0.5
    cand = ref.copy()
    cand[0, 0, 0, :2] = 0.4  # 2 of them drop below 0.5, still above 0.3
    assert _measured(ref, cand)[:2] == ("map IoU (> 0.5)", pytest.approx(6 / 8))
    assert _measured(ref, cand, threshold=0.3)[:2] == ("map IoU (> 0.3)", 1.0)
    assert _measured(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)))[1] == 1.0  # nothing marked by either


def test_maps_outside_0_1_and_other_shapes_have_no_measure():
    assert _measured(np.full((1, 1, 2, 2), 3.0), np.full((1, 1, 2, 2), 3.0))[:2] == (None, None)  # logits
    assert _measured(np.zeros(5), np.zeros(5))[:2] == (None, None)
    assert _measured(np.zeros((5, 1)), np.zeros((5, 1)))[:2] == (None, None)


def _sequence_pair():
    original = paddle_style(np.random.default_rng(0), "sequence", 13)
    folded = normswap.convert(original, to="fold", validate=False)
    last = [r.new_nodes[0] for r in folded.report.layers][-1]
    return original, broken_fold(folded.model, last, "swapped")


FEEDS = {"x": np.random.default_rng(3).standard_normal((24, 3, 16, 16)).astype(np.float32)}


def test_min_agreement_gates_on_the_sequence_measure_and_the_report_names_it():
    original, changed = _sequence_pair()
    measured = normswap.validate(original, changed, check="fidelity", inputs=FEEDS)
    o = measured.outputs[0]
    assert o.agreement_measure == "whole-sequence argmax" and o.top1_agreement is None
    assert 0 < o.agreement < 1 and o.agreements["per-position argmax"] > o.agreement
    assert measured.agreement == o.agreement and "whole-sequence" in measured.agreement_measure
    assert o.cosine > 0.9  # cosine alone would call this close
    strict = normswap.validate(original, changed, check="fidelity", inputs=FEEDS, min_agreement=o.agreement + 0.01)
    loose = normswap.validate(original, changed, check="fidelity", inputs=FEEDS, min_agreement=o.agreement - 0.01)
    assert strict.passed is False and loose.passed is True


def test_a_users_task_metric_replaces_the_shape_measure():
    original, changed = _sequence_pair()
    seen = {}

    def decoded_strings_agree(ref_outputs, cand_outputs):
        seen["shapes"] = [a.shape for a in ref_outputs + cand_outputs]
        return 0.25

    low = normswap.validate(original, changed, check="fidelity", inputs=FEEDS, task_metric=decoded_strings_agree,
                            min_agreement=0.5)
    assert seen["shapes"] == [(24, 16, 12), (24, 16, 12)]  # every sample of every output, both models
    assert low.task_agreement == 0.25 and low.task_metric == "decoded_strings_agree" and low.passed is False
    assert low.agreement_measure == "task metric 'decoded_strings_agree'"
    high = normswap.validate(original, changed, check="fidelity", inputs=FEEDS, task_metric=lambda r, c: 0.9,
                             min_agreement=0.5)
    assert high.passed is True
    assert json.loads(high.to_json())["agreement"] == 0.9


def test_a_task_metric_must_return_an_agreement_and_be_callable():
    original, changed = _sequence_pair()
    with pytest.raises(UsageError, match="0..1"):
        normswap.validate(original, changed, check="fidelity", inputs=FEEDS, task_metric=lambda r, c: 2.0)
    with pytest.raises(UsageError, match="callable"):
        normswap.validate(original, changed, check="fidelity", inputs=FEEDS, task_metric="f1")
    with pytest.raises(UsageError, match="between 0 and 1"):
        normswap.validate(original, changed, check="fidelity", inputs=FEEDS, map_threshold=1.5)


def test_min_agreement_without_any_measure_fails_and_says_why():
    from onnx import helper
    m = model([helper.make_node("ReduceSum", ["x"], ["y"], axes=[1], keepdims=0)], [vi("x", [3, 4])], [out("y", 1)],
              opset=11)
    x = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    report = normswap.validate(m, m, check="fidelity", inputs=x, min_agreement=0.9)
    assert report.passed is False and "no agreement measure applies" in report.outputs[0].problem
    assert normswap.validate(m, m, check="fidelity", inputs=x, min_cosine=0.9).passed is True


def test_the_cli_names_the_measure_and_takes_the_map_threshold(tmp_path):
    original = paddle_style(np.random.default_rng(0), "map", 11)
    folded = normswap.convert(original, to="fold", validate=False).model
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for p, m in zip(paths, (original, folded)):
        onnx.save_model(m, str(p))
    np.savez(tmp_path / "x.npz", **FEEDS)
    r = subprocess.run([sys.executable, "-m", "normswap.cli", "validate", *map(str, paths), "--check", "fidelity",
                        "--inputs", str(tmp_path / "x.npz"), "--map-threshold", "0.3", "--min-agreement", "0.99"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "agreement = map IoU (> 0.3)" in r.stdout and "agreement >= 0.99" in r.stdout
