"""Exact validation on models with the traits of real paddle2onnx exports (issue 18): BatchNormalization with a
``momentum`` attribute at opsets 9-13, initializers among the inputs of an IR 3 model, Paddle names, BN
parameters in Constant nodes, a bias Add between Conv and BN, a ConvTranspose head, Sigmoid probability maps and
(N, T, K) sequence outputs. The right fold passes; a negated, a 1.01-scaled and two exchanged output channels
fail; a float64 yardstick that disagrees with onnxruntime is refused, with the reason; the time budget falls
back."""
import numpy as np
import onnx
import pytest
from onnx.reference import ReferenceEvaluator

import normswap
from normswap.validate import float64 as float64_module
from normswap.validate.float64 import float64_model
from tests.builders import broken_fold, paddle_style

TRAITS = [("map", 9, 3, True), ("map", 11, 7, False), ("sequence", 13, 7, False), ("classes", 11, 7, False)]
IDS = [f"{head}-opset{opset}-ir{ir}" for head, opset, ir, _ in TRAITS]


def _feeds(seed=1, n=6):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="module", params=TRAITS, ids=IDS)
def export(request):
    head, opset, ir, as_inputs = request.param
    m = paddle_style(np.random.default_rng(0), head, opset, ir, as_inputs)
    result = normswap.convert(m, to="fold", inputs=_feeds(), progress=False)
    return m, result


def test_the_right_fold_passes_against_the_float64_original(export):
    _, result = export
    v = result.report.validation
    assert v.rule == "noise floor" and v.passed is True and v.rule_note is None
    assert "inference mode" in v.float64_reference
    o = v.outputs[0]
    assert o.original_error < 1e-5 and o.caution is None  # the yardstick is at float32's level, outputs vary


@pytest.mark.parametrize("kind", ["negated", "scaled", "swapped"])
def test_a_broken_fold_fails(export, kind):
    original, result = export
    folded = [r.new_nodes[0] for r in result.report.layers if r.action == "folded"]
    for conv in (folded[0], folded[-1]):  # the first and the last folded conv (a ConvTranspose on maps)
        report = normswap.validate(original, broken_fold(result.model, conv, kind), inputs=_feeds())
        assert report.rule == "noise floor" and report.passed is False, (conv, kind)


def _stock_reference(model):
    """onnx's own reference evaluator on the float64 copy: BN with momentum in training mode (the old yardstick)."""
    evaluator = ReferenceEvaluator(float64_model(model))
    names = [o.name for o in model.graph.output]
    return (lambda feeds, seconds=None: dict(zip(names, evaluator.run(
        names, {k: v.astype(np.float64) for k, v in feeds.items()})))), "stock onnx reference evaluator"


def test_a_yardstick_that_disagrees_with_onnxruntime_is_refused_with_the_reason(export):
    from normswap.validate.runner import validate_models
    original, result = export
    report = validate_models(original, result.model, inputs=_feeds(), float64_reference=_stock_reference(original))
    assert report.rule == "atol/rtol" and report.float64_reference is None
    assert "is not used" in report.rule_note and "beyond float32's own level" in report.rule_note
    broken = broken_fold(result.model, result.report.layers[0].new_nodes[0], "negated")
    assert validate_models(original, broken, inputs=_feeds(),
                           float64_reference=_stock_reference(original)).passed is False


def test_a_yardstick_that_agrees_is_used():
    from normswap.validate.runner import validate_models
    original = paddle_style(np.random.default_rng(0), "classes", 13)
    folded = normswap.convert(original, to="fold", validate=False).model
    right = float64_module.onnx_reference(original)
    report = validate_models(original, folded, inputs=_feeds(), float64_reference=right)
    assert report.rule == "noise floor" and report.passed


def test_past_the_time_budget_the_check_falls_back_and_says_why(monkeypatch):
    from normswap.validate import runner
    original = paddle_style(np.random.default_rng(0), "map", 11)
    folded = normswap.convert(original, to="fold", validate=False).model
    monkeypatch.setattr(runner, "FLOAT64_BUDGET_MULTIPLE", 0.0)
    monkeypatch.setattr(runner, "FLOAT64_BUDGET_SECONDS", 0.0)
    report = normswap.validate(original, folded, inputs=_feeds())
    assert report.rule == "atol/rtol" and "time budget" in report.rule_note and report.passed


def test_within_the_budget_the_samples_already_evaluated_judge():
    """A budget that runs out after the first sample: that sample judges (no fallback)."""
    from normswap.onnx.batching import fixed_layout
    from normswap.validate.float64 import Unavailable
    from normswap.validate.runner import _evaluate64
    calls = []

    def reference(feeds, seconds=None):
        calls.append(seconds)
        if len(calls) > 1:
            raise Unavailable("evaluating it took longer than the float64 time budget")
        return {"y": feeds["x"][:, :1].astype(np.float64)}

    feeds = _feeds()
    model = paddle_style(np.random.default_rng(0), "classes")
    out, taken = _evaluate64(reference, feeds, None, fixed_layout(model, feeds, 256), budget=5.0)
    assert taken == 1 and out["y"].shape[0] == 1 and len(calls) == 2 and calls[0] == 5.0


def test_the_stock_evaluator_really_is_wrong_on_momentum_batchnorm():
    """The trap this guards against: onnx 1.23 evaluates opset 9-13 BN with momentum with batch statistics."""
    from tests.builders import run
    m = paddle_style(np.random.default_rng(0), "classes", 11)
    x = _feeds()
    ours, _ = float64_module.onnx_reference(m)
    stock, _ = _stock_reference(m)
    ort32 = run(m, x)[0]
    assert np.abs(ours(x)[m.graph.output[0].name] - ort32).max() < 1e-5 * np.abs(ort32).max()
    assert np.abs(stock(x)[m.graph.output[0].name] - ort32).max() > 1e-2 * np.abs(ort32).max()


def test_the_yardstick_limit_grows_with_the_model():
    small = paddle_style(np.random.default_rng(0), "classes")
    bigger = onnx.ModelProto()
    bigger.CopyFrom(small)
    bigger.graph.node.extend(n for n in small.graph.node if n.op_type == "Conv")  # more multiply-accumulates
    assert float64_module.yardstick_limit(bigger) > float64_module.yardstick_limit(small) > 0
