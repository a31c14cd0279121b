"""normswap.compare: one run of the original shared by every target, the same numbers as separate conversions,
the rows and the recommendation."""
import json
from pathlib import Path

import numpy as np
import pytest

import normswap
from normswap.comparison import NORMALIZING, recommend
from normswap.errors import UsageError
from normswap.report import CompareRow

from tests.builders import count_original_runs

FIXTURES = Path(__file__).parent.parent / "fixtures"
MODEL = FIXTURES / "digits_resnet.onnx"
ROW_KEYS = {"target", "exact", "top1_agreement", "cosine", "groups", "latency_ms", "parameters",
            "calibration_seconds", "batch_independent", "nodes"}


@pytest.fixture(scope="module")
def digits():
    x = np.load(FIXTURES / "digits_heldout.npz")["x"]
    return {"x": x[:160]}, {"x": x[160:]}


@pytest.fixture(scope="module")
def compared(digits):
    calib, held = digits
    return normswap.compare(MODEL, calibration=calib, inputs=held, groups="auto", provider="cpu")


def test_replacement_targets_share_one_run_of_the_original(digits, monkeypatch):
    calib, held = digits
    calls = count_original_runs(monkeypatch.setattr)
    normswap.convert(MODEL, to="layer", calibration=calib, validate=False, refine=False)
    alone = len(calls)
    calls.clear()
    report = normswap.compare(MODEL, ["group", "layer", "instance"], calibration=calib, inputs=held,
                              latency=False, provider="cpu")
    assert alone > 0 and len(calls) == alone  # three targets, the original's segments ran once
    assert [r.report.calibration.shared_with for r in report.rows] == [3, 3, 3]


def test_compare_measures_what_separate_conversions_measure(digits, compared):
    calib, held = digits
    rows = {r.target: r for r in compared.rows}
    for target in ("group", "layer", "instance"):
        alone = normswap.convert(MODEL, to=target, calibration=calib, inputs=held, provider="cpu",
                                 **({"groups": "auto"} if target == "group" else {}), refine=False)
        out = alone.report.validation.outputs[0]
        assert rows[target].top1_agreement == out.top1_agreement
        assert rows[target].cosine == pytest.approx(out.cosine, abs=1e-6)
        assert rows[target].groups == normswap.comparison.group_summary(alone.report)
    for target in ("fold", "affine", "weight"):
        assert rows[target].exact and rows[target].passed is True and rows[target].top1_agreement == 1.0


def test_rows_carry_the_documented_fields(compared):
    data = json.loads(compared.to_json())
    assert [r["target"] for r in data["rows"]] == list(normswap.comparison.DEFAULT_TARGETS)
    for row in data["rows"]:
        assert ROW_KEYS <= set(row)
        assert row["parameters"] > 0 and row["nodes"] > 0 and row["latency_ms"] > 0
        assert (row["calibration_seconds"] is not None) == (row["target"] in NORMALIZING)
    assert data["recommended"] in NORMALIZING and data["reason"]


def test_finetune_recommends_the_best_batch_independent_normalization(compared):
    best = max((r for r in compared.rows if r.target in NORMALIZING), key=lambda r: (r.top1_agreement, r.cosine))
    assert compared.recommended == best.target
    assert f"{best.top1_agreement:.1%}" in compared.reason


def test_deploy_recommends_the_fastest_exact_target(compared):
    target, reason = recommend(compared.rows, "deploy")
    fastest = min((r for r in compared.rows if r.exact), key=lambda r: r.latency_ms)
    assert target == fastest.target and "exact" in reason


def _row(target, exact, agreement, latency, passed=True, kept=0):
    return CompareRow(target, exact, agreement, agreement, None, kept == 0, 10, 5, latency, 1.0, None, True,
                      passed, kept, 1)


def test_recommendation_skips_failed_and_batch_dependent_rows():
    rows = [_row("fold", True, 1.0, 1.0, passed=False), _row("affine", True, 1.0, 2.0),
            _row("group", False, 0.99, 3.0, passed=None), _row("layer", False, 0.995, 3.0, passed=None, kept=1)]
    assert recommend(rows, "deploy")[0] == "affine"  # fold failed validation
    assert recommend(rows, "finetune")[0] == "group"  # layer left a BN in place


def test_finetune_without_a_normalizing_target_recommends_nothing(digits):
    calib, held = digits
    report = normswap.compare(MODEL, "fold,affine", inputs=held, latency=False, provider="cpu")
    assert report.recommended is None and "no batch-independent" in report.reason
    assert all(r.latency_ms is None for r in report.rows)


def test_uncalibrated_comparison_says_so(digits):
    _, held = digits
    report = normswap.compare(MODEL, ["layer"], inputs=held, latency=False, provider="cpu")
    assert any("not calibrated" in n for n in report.notes)
    assert report.rows[0].calibration_seconds is None and "uncalibrated" in report.reason


@pytest.mark.parametrize("kwargs, words", [
    ({"targets": "fold,bogus"}, "targets"), ({"targets": ""}, "targets"), ({"purpose": "ship"}, "purpose"),
    ({"targets": ["group"], "groups": "many"}, "groups")])
def test_bad_arguments_are_usage_errors(kwargs, words):
    with pytest.raises(UsageError, match=words):
        normswap.compare(MODEL, **kwargs)


def test_compare_accepts_an_onnx_graphsurgeon_graph(digits):
    gs = pytest.importorskip("onnx_graphsurgeon")
    import onnx
    _, held = digits
    report = normswap.compare(gs.import_onnx(onnx.load(str(MODEL))), "fold", inputs=held, latency=False)
    assert report.rows[0].passed is True and report.source == "<onnx_graphsurgeon.Graph>"


def test_no_recommendation_when_every_target_keeps_the_batchnorms(digits):
    """BN parameters that are also graph inputs (callers may override them) are kept by every target: said."""
    import onnx
    _, held = digits
    m = onnx.load(str(MODEL))
    names = {i.name for i in m.graph.input}
    for node in m.graph.node:
        if node.op_type == "BatchNormalization" and node.input[1] not in names:
            init = next(t for t in m.graph.initializer if t.name == node.input[1])
            m.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for purpose in ("finetune", "deploy"):
        report = normswap.compare(m, "fold,layer", inputs=held, latency=False, purpose=purpose, provider="cpu")
        assert all(not r.batch_independent for r in report.rows)
        assert report.recommended is None and "left BatchNorm layers in place" in report.reason


def test_deploy_recommendation_without_latency(digits):
    _, held = digits
    report = normswap.compare(MODEL, "fold,affine", inputs=held, latency=False, purpose="deploy", provider="cpu")
    assert report.recommended in ("fold", "affine") and "latency not measured" in report.reason
