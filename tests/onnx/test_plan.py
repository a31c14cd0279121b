"""The agreement-floor plan (normswap/onnx/plan.py): as many BNs normalize as keep the task agreement at the floor,
the rest become frozen affine; each conversion judged two-fold out of sample on the calibration data."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import normswap
from normswap.errors import UnsupportedError, UsageError
from normswap.onnx.convert import convert_in_place
from normswap.targets import ReplaceOptions
from tests.builders import conv_bn

FIXTURES = Path(__file__).parent.parent.parent / "fixtures"
MODEL = str(FIXTURES / "digits_resnet.onnx")
X = np.load(FIXTURES / "digits_heldout.npz")["x"]


def _plan(to, floor, **kw):
    return normswap.convert(MODEL, to=to, calibration={"x": X[:280]}, inputs={"x": X[280:]}, agreement_floor=floor,
                            refine=False, progress=False, **kw)


def test_where_the_full_swap_misses_the_floor_the_plan_meets_it_and_normalizes_some_layers():
    full = normswap.convert(MODEL, to="instance", calibration={"x": X[:280]}, inputs={"x": X[280:]}, refine=False,
                            progress=False)
    assert full.report.validation.agreement < 0.8  # InstanceNorm everywhere loses the task
    result = _plan("instance", 0.9)
    plan = result.report.plan
    assert plan.agreement >= 0.9 > plan.full_agreement and plan.judged_samples == 280
    assert 0 < len(plan.normalizing) < 6 and len(plan.normalizing) + len(plan.frozen) == 6
    actions = {layer.name: layer.action for layer in result.report.layers}
    assert {actions[n] for n in plan.normalizing} == {"converted"} and {actions[n] for n in plan.frozen} == {"affine"}
    assert result.report.validation.agreement >= 0.9  # on the 80 validation samples too
    assert result.report.validation.agreement > full.report.validation.agreement
    ops = {n.op_type for n in result.model.graph.node}
    assert "InstanceNormalization" in ops and "BatchNormalization" not in ops
    assert plan.tried[0]["normalizing"] == 6 and len(plan.tried) >= 3
    d = result.report.to_dict()["plan"]
    assert d["fraction"] == pytest.approx(len(plan.normalizing) / 6) and d["floor"] == 0.9
    assert any(n.startswith("agreement-floor plan:") for n in result.report.notes)


def test_where_the_full_swap_meets_the_floor_every_layer_normalizes():
    plan = _plan("layer", 0.9).report.plan
    assert plan.frozen == [] and len(plan.normalizing) == 6 and plan.fraction == 1.0
    assert len(plan.tried) == 1 and plan.agreement == plan.full_agreement >= 0.9


def test_an_agreement_at_the_floor_whose_sampling_error_reaches_below_it_does_not_meet_it():
    """Layer everywhere judges 0.986 (276 of 280): at that floor the judged value is met, its bound (0.977) is not,
    so the plan freezes some BNs -- and what it keeps meets the floor with its own bound."""
    full = _plan("layer", 0.9).report.plan
    assert full.agreement > full.lower_bound >= 0.9 and full.fraction == 1.0
    plan = _plan("layer", full.agreement).report.plan
    assert plan.full_agreement == pytest.approx(full.agreement)  # the same full swap, judged the same
    assert plan.fraction < 1.0 and plan.lower_bound >= plan.floor == full.agreement
    assert plan.tried[0]["lower_bound"] == pytest.approx(full.lower_bound) and full.lower_bound < plan.floor
    assert "less 1 standard error(s)" in plan.summary() and " meets the floor" in plan.summary()


@pytest.mark.parametrize("floor, refines_full", [(0.9, True), (0.99, False)])
def test_the_full_swap_is_refined_only_when_refinements_held_out_slice_can_show_the_floor(floor, refines_full):
    """280 samples: refinement holds aside 40, whose bound with all 40 agreeing is 0.976 -- enough for 0.9, not
    for 0.99, where refining the full swap would spend the budget on a judgement that cannot pass."""
    pytest.importorskip("torch")
    from normswap.onnx.plan import lower_bound
    from normswap.options import RefinementOptions
    assert RefinementOptions(holdout=0.15).held_out(280) == 40 and lower_bound(1.0, 40) == pytest.approx(40 / 41)
    result = normswap.convert(MODEL, to="instance", calibration={"x": X[:280]}, inputs={"x": X[280:]},
                              agreement_floor=floor, refine_steps=3, refine_holdout=0.15, progress=False)
    plan = result.report.plan
    full_refined = [t for t in plan.tried if t["refined"] and t["normalizing"] == 6]
    assert bool(full_refined) is refines_full
    assert (plan.refinement_skipped is None) is refines_full
    assert any("cannot show 0.99" in n for n in result.report.notes) is (not refines_full)
    judged = [t for t in plan.tried if not t["refined"] and t["normalizing"] == len(plan.normalizing)]
    assert plan.agreement == judged[-1]["agreement"] and plan.judged == "two-fold out of sample"  # not the slice's


def test_the_most_harmless_layers_by_calibrated_fit_normalize_first():
    result = _plan("instance", 0.9)
    residual = {layer.name: layer.fit_residual for layer in
                normswap.convert(MODEL, to="instance", calibration={"x": X[:238]}, refine=False, validate=False,
                                 progress=False).report.layers}
    assert all(0 <= r <= 1 for r in residual.values())
    kept = max(residual[n] for n in result.report.plan.normalizing)
    assert all(residual[n] >= kept for n in result.report.plan.frozen)


def test_replacing_only_some_bns_freezes_the_others_as_exact_affines():
    m = onnx.load(MODEL)
    names = [n.name for n in m.graph.node if n.op_type == "BatchNormalization"]
    conversion = convert_in_place(m, "group", options=ReplaceOptions(groups=4, only=frozenset(names[:2])))
    actions = [r.action for r in conversion.records]
    assert actions == ["converted"] * 2 + ["affine"] * 4
    assert all("agreement-floor plan" in r.reason for r in conversion.records[2:])
    everything = convert_in_place(onnx.load(MODEL), "group", options=ReplaceOptions(groups=4))
    assert [r.action for r in everything.records] == ["converted"] * 6


def test_the_floor_needs_a_replacement_target_calibration_data_and_a_measure():
    with pytest.raises(UsageError, match="agreement_floor= needs a replacement target"):
        normswap.convert(MODEL, to="fold", agreement_floor=0.9)
    with pytest.raises(UsageError, match="calibration"):
        normswap.convert(MODEL, to="group", agreement_floor=0.9)
    with pytest.raises(UsageError, match=r"must lie in \(0, 1\]"):
        normswap.convert(MODEL, to="group", agreement_floor=1.5, calibration={"x": X[:50]})
    m = conv_bn(np.random.default_rng(0))  # a (N, C, H, W) feature map of C > 1 is per-pixel argmax; make it 1-D
    scalar = {"x": np.random.default_rng(1).standard_normal((40, *[d.dim_value for d in
              m.graph.input[0].type.tensor_type.shape.dim[1:]]), dtype=np.float32)}
    flat = onnx.helper.make_node("ReduceMean", [m.graph.output[0].name], ["pooled"], keepdims=0)
    m.graph.node.append(flat)
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, None))
    with pytest.raises(UsageError, match="needs a task agreement"):
        normswap.convert(m, to="layer", calibration=scalar, agreement_floor=0.9, refine=False, progress=False)


def test_torch_modules_are_told_to_export_first():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(UnsupportedError, match="export the module to ONNX"):
        normswap.convert(net, to="layer", calibration=torch.randn(8, 1, 6, 6), agreement_floor=0.9)


def test_the_cli_plans_and_reports_it(tmp_path):
    np.savez(tmp_path / "calib.npz", x=X[:280])
    np.savez(tmp_path / "held.npz", x=X[280:])
    r = subprocess.run([sys.executable, "-m", "normswap", "convert", MODEL, "--to", "instance", "--calibrate",
                        tmp_path / "calib.npz", "--inputs", tmp_path / "held.npz", "--agreement-floor", "0.9",
                        "--no-refine", "-o", tmp_path / "p.onnx", "--report", tmp_path / "r.json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "agreement-floor plan:" in r.stdout and "frozen affine by the agreement-floor plan" in r.stdout
    plan = json.loads((tmp_path / "r.json").read_text())["plan"]
    assert plan["agreement"] >= 0.9 and 0 < plan["fraction"] < 1


def test_compare_shows_the_plan_as_a_row():
    report = normswap.compare(MODEL, ["fold", "instance"], calibration={"x": X[:280]}, inputs={"x": X[280:]},
                              agreement_floor=0.9, latency=False)
    rows = {r.target: r for r in report.rows}
    assert set(rows) == {"fold", "instance", "instance+plan"}
    plan = rows["instance+plan"]
    assert plan.agreement >= 0.9 > rows["instance"].agreement and plan.batch_independent
    assert plan.report.plan is not None and 0 < plan.report.plan.fraction < 1
    assert report.recommended == "instance+plan"  # the batch-independent row that keeps the task
    with pytest.raises(UsageError, match="agreement_floor= in compare"):
        normswap.compare(MODEL, ["fold"], calibration={"x": X[:50]}, agreement_floor=0.9)


def test_the_plan_judges_each_conversion_out_of_sample():
    """On 48 calibration samples the output layer's refit makes InstanceNorm everywhere look fine on the data it
    was fitted to (0.83) and lose the task on other samples (0.41): the two-fold judge sees the latter."""
    calib, held = {"x": X[:48]}, {"x": X[280:]}
    in_sample = normswap.convert(MODEL, to="instance", calibration=calib, inputs=calib, refine=False,
                                 progress=False).report.validation.agreement
    held_out = normswap.convert(MODEL, to="instance", calibration=calib, inputs=held, refine=False,
                                progress=False).report.validation.agreement
    plan = normswap.convert(MODEL, to="instance", calibration=calib, inputs=held, agreement_floor=0.5,
                            refine=False, progress=False).report.plan
    assert plan.judged == "two-fold out of sample" and in_sample > held_out + 0.3
    assert abs(plan.full_agreement - held_out) < 0.15 and plan.full_agreement < 0.5 < in_sample


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1), st.integers(1, 10_000), st.floats(0.1, 3))
def test_the_lower_bound_lies_below_the_agreement_and_rises_with_the_samples(p, n, z):
    from normswap.onnx.plan import lower_bound
    bound = lower_bound(p, n, z)
    assert 0 <= bound <= p + 1e-12
    assert lower_bound(p, 4 * n, z) >= bound - 1e-12  # more samples: a tighter bound
    assert lower_bound(p, n, 2 * z) <= bound + 1e-12  # more standard errors: a lower one
    assert lower_bound(1.0, n, z) == pytest.approx(n / (n + z * z))  # every sample agreeing
    assert lower_bound(p, 0, z) == 0.0


def test_an_exact_plan_meets_any_floor_whatever_the_sample_count():
    """Too few samples to show 0.999 for any replacement: every BN is frozen, exact, and that meets the floor."""
    plan = normswap.convert(MODEL, to="instance", calibration={"x": X[:40]}, inputs={"x": X[280:]},
                            agreement_floor=0.999, refine=False, progress=False).report.plan
    assert plan.normalizing == [] and plan.lower_bound == 1.0 and " meets the floor" in plan.summary()
    assert all(t["lower_bound"] < 0.999 for t in plan.tried if t["normalizing"])


def test_too_few_samples_to_split_are_judged_on_the_calibration_data():
    from normswap.onnx.plan import MIN_FOLD, halves
    even, odd = halves({"x": X[:5]})
    assert np.array_equal(even["x"], X[[0, 2, 4]]) and np.array_equal(odd["x"], X[[1, 3]])
    plan = normswap.convert(MODEL, to="layer", calibration={"x": X[:2 * MIN_FOLD - 2]}, inputs={"x": X[280:]},
                            agreement_floor=0.5, refine=False, progress=False).report.plan
    assert plan.judged == "on the calibration data"


def test_the_original_runs_once_per_fold_however_many_candidates_are_judged(monkeypatch):
    import normswap.onnx.activations as activations
    folds = []
    real = activations.Activations.run

    def run(self, feeds, names):
        if self.label == "reference" and len(next(iter(feeds.values()))) == 140:  # a fold of the 280 samples
            folds.append(id(self))
        return real(self, feeds, names)
    monkeypatch.setattr(activations.Activations, "run", run)
    plan = _plan("instance", 0.9).report.plan
    judged = [t for t in plan.tried if not t["refined"]]
    assert len(judged) >= 3  # two folds each, so 6 or more judgements
    assert len(folds) == 2  # the original's outputs on each fold were kept and read back
