"""Validation: provider selection (with a stand-in runtime), inputs, metrics, and reports."""
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import normswap
from normswap.errors import InvalidModelError, UnsupportedError, UsageError
from normswap.validate import providers as prov
from normswap.validate.compare import compare_output, top1_agreement
from normswap.validate.inputs import parse_input_shape, random_inputs
from tests.builders import conv_bn, model, out, vi


class FakeRuntime:
    """Stands in for the onnxruntime module: lists CUDA, and creates it only when ``cuda_works``."""

    def __init__(self, listed=True, cuda_works=False):
        self.listed, self.cuda_works, self.severity = listed, cuda_works, []

    def get_available_providers(self):
        return [prov.CUDA, prov.CPU] if self.listed else [prov.CPU]

    def set_default_logger_severity(self, level):
        self.severity.append(level)

    class SessionOptions:
        log_severity_level = 2

    def InferenceSession(self, data, options, providers):
        assert options.log_severity_level == prov.ORT_SILENT  # the probe is quiet
        rt = self

        class Session:
            def get_providers(self):
                return [p for p in providers if p != prov.CUDA or rt.cuda_works]
        return Session()


def test_auto_uses_cuda_only_when_a_session_really_gets_it():
    assert prov.select_providers("auto", FakeRuntime(cuda_works=True)).providers == (prov.CUDA, prov.CPU)
    fallback = prov.select_providers("auto", FakeRuntime(cuda_works=False))
    assert fallback.providers == (prov.CPU,) and "fell back" in fallback.note
    assert prov.select_providers("auto", FakeRuntime(listed=False)).providers == (prov.CPU,)


def test_cuda_request_fails_clearly_when_cuda_is_not_usable():
    with pytest.raises(UnsupportedError, match="CUDA was requested"):
        prov.select_providers("cuda", FakeRuntime(cuda_works=False))
    assert prov.select_providers("cuda", FakeRuntime(cuda_works=True)).providers[0] == prov.CUDA
    assert prov.select_providers("cpu", FakeRuntime(cuda_works=True)).providers == (prov.CPU,)
    with pytest.raises(UsageError):
        prov.select_providers("tpu", FakeRuntime())


def test_probe_restores_the_default_log_level():
    rt = FakeRuntime(cuda_works=False)
    prov.cuda_status(rt)
    assert rt.severity == [prov.ORT_SILENT, prov.ORT_DEFAULT_LOG_SEVERITY]


def test_check_ran_rejects_a_silent_cpu_fallback():
    choice = prov.ProviderChoice("cuda", (prov.CUDA, prov.CPU), "")
    with pytest.raises(UnsupportedError):
        prov.check_ran(choice, [prov.CPU])
    prov.check_ran(choice, [prov.CUDA, prov.CPU])


def test_real_report_names_the_providers_that_ran():
    r = normswap.convert(conv_bn(np.random.default_rng(0)), to="fold", provider="cpu")
    assert r.report.validation.providers == [prov.CPU]
    assert r.report.validation.reference_optimization == "ORT_DISABLE_ALL"


def test_metrics():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]], np.float32)
    c = compare_output("y", ref, ref + np.float32(1e-5))
    assert c.passed and c.max_abs == pytest.approx(1e-5, rel=1e-2) and c.cosine == pytest.approx(1.0)
    assert c.top1_agreement == 1.0
    bad = compare_output("y", ref, ref[:, ::-1].copy())
    assert not bad.passed and bad.top1_agreement == 0.0 and bad.max_rel == pytest.approx(1.0)
    nan = ref.copy()
    nan[0, 0] = np.nan
    assert not compare_output("y", ref, nan).passed
    assert not compare_output("y", ref, ref[:1]).passed
    assert top1_agreement(np.zeros((4, 3, 2)), np.zeros((4, 3, 2))) is None
    assert json.dumps(bad.__dict__)


def test_half_outputs_get_half_tolerance_but_not_float32():
    ref = np.ones((2, 2), np.float16)
    assert compare_output("y", ref, ref + np.float16(0.004)).passed
    assert not compare_output("y", ref.astype(np.float32), ref.astype(np.float32) + 0.004).passed


def test_inputs_generation_and_shapes():
    m = model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", ["N", 3, "H"])], [out("y", 3)])
    with pytest.raises(UsageError, match=r"input_shapes=\{'x': \(D0, D1, \.\.\.\)\}"):
        random_inputs(m)
    feeds = random_inputs(m, {"x": (1, 3, 7)})
    assert feeds["x"].shape == (1, 3, 7) and feeds["x"].dtype == np.float32
    with pytest.raises(UsageError, match="fixes it"):
        random_inputs(m, {"x": (1, 4, 7)})
    with pytest.raises(UsageError, match="unknown input"):
        random_inputs(m, {"z": (1,)})
    m2 = model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", ["N", 3], TensorProto.INT64)], [out("y", 2)])
    assert random_inputs(m2)["x"].shape == (2, 3)  # a symbolic batch becomes 2
    assert parse_input_shape("in:1,3,224,224") == ("in", (1, 3, 224, 224))
    assert parse_input_shape("a:b:2") == ("a:b", (2,))
    for bad in ("x", "x:a,b", "x:0,1", ":1"):
        with pytest.raises(UsageError):
            parse_input_shape(bad)


def test_npz_inputs_are_used_and_pickles_refused(tmp_path):
    m = conv_bn(np.random.default_rng(1))
    x = np.random.default_rng(2).standard_normal((2, 4, 5, 5))
    np.savez(tmp_path / "in.npz", x=x)
    r = normswap.validate(m, m, inputs=tmp_path / "in.npz")
    assert r.passed and r.inputs.endswith("in.npz")
    np.savez(tmp_path / "wrong.npz", y=x)
    with pytest.raises(UsageError, match="no array for input"):
        normswap.validate(m, m, inputs=tmp_path / "wrong.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InvalidModelError, match="Python objects"):
        normswap.validate(m, m, inputs=tmp_path / "obj.npz")


def test_a_wrong_candidate_fails_validation():
    rng = np.random.default_rng(3)
    m = conv_bn(rng)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(m)
    wrong.graph.initializer[0].raw_data = np.zeros_like(onnx.numpy_helper.to_array(m.graph.initializer[0])).tobytes()
    report = normswap.validate(m, wrong)
    assert not report.passed and not report and report.outputs[0].max_abs > 0.1
    assert json.loads(report.to_json())["passed"] is False


def test_io_binding_path_gives_the_same_values(tmp_path):
    # on CUDA, validation binds inputs on the device once per batch for both models; the path runs on CPU too
    from normswap.onnx.activations import Activations, upload
    from normswap.validate.providers import CPU
    m = conv_bn(np.random.default_rng(9))
    x = {"x": np.random.default_rng(1).standard_normal((2, 4, 5, 5)).astype(np.float32)}
    run = Activations(m, ["c"], (CPU,), str(tmp_path), "model")
    assert run.device == "cpu" and upload(x, "cpu") == x
    plain, bound = run.run(x, ["y", "c", "x"]), run.run(x, ["y", "c", "x"], bind=True)
    for k in ("y", "c", "x"):
        np.testing.assert_array_equal(plain[k], bound[k])


def test_no_samples_or_nonfinite_data_is_refused_with_exit_3(tmp_path):
    import subprocess
    import sys
    from tests.builders import conv_bn
    m = conv_bn(np.random.default_rng(0))
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path))
    x = np.random.default_rng(1).standard_normal((3, 4, 5, 5)).astype(np.float32)
    cases = {"empty.npz": x[:0], "nan.npz": np.full_like(x, np.nan), "inf.npz": np.where(x > 1, np.inf, x)}
    for name, array in cases.items():
        np.savez(tmp_path / name, x=array)
        r = subprocess.run([sys.executable, "-m", "normswap.cli", "validate", path, path, "--inputs",
                            tmp_path / name], capture_output=True, text=True)
        assert r.returncode == 3 and "array 'x'" in r.stderr and len(r.stderr.splitlines()) == 1, (name, r.stderr)
    np.savez(tmp_path / "ok.npz", x=x)  # the positive case
    r = subprocess.run([sys.executable, "-m", "normswap.cli", "validate", path, path, "--inputs", tmp_path / "ok.npz"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_calibration_data_that_is_all_nan_is_invalid_input():
    from normswap.errors import InvalidModelError
    x = np.full((8, 1, 8, 8), np.nan, np.float32)
    with pytest.raises(InvalidModelError, match="NaN"):
        normswap.convert(Path(__file__).parent.parent / "fixtures" / "digits_resnet.onnx", to="layer",
                         calibration={"x": x}, validate=False, refine=False)


def test_a_reference_output_with_nan_or_no_values_never_passes():
    from normswap.validate.compare import OutputStats
    ref = np.array([[1.0, np.nan]])
    for check in ("exact", "fidelity"):
        stats = OutputStats("y")
        stats.add(ref, ref.copy())
        result = stats.result(check)
        assert not result.passed and "NaN" in result.problem
    empty = OutputStats("y")
    empty.add(np.zeros((0, 3)), np.zeros((0, 3)))
    assert not empty.result("fidelity").passed and "no values" in empty.result().problem
    fine = OutputStats("y")
    fine.add(np.ones((2, 3)), np.ones((2, 3)))
    assert fine.result().passed and fine.result().problem is None


def _constant_output_model() -> onnx.ModelProto:
    """Conv -> BN -> Mul(0) -> Add(c): every input gives the same output, so validation proves nothing."""
    from tests.builders import init
    m = conv_bn(np.random.default_rng(0))
    m.graph.node[1].output[0] = "bn_out"
    m.graph.node.extend([helper.make_node("Mul", ["bn_out", "zero"], ["z"]),
                         helper.make_node("Add", ["z", "offset"], ["y"])])
    m.graph.initializer.extend([init("zero", np.zeros(1, np.float32)),
                                init("offset", np.arange(6, dtype=np.float32).reshape(6, 1, 1))])
    return m


def test_validation_that_cannot_tell_models_apart_says_so():
    r = normswap.convert(_constant_output_model(), to="fold")
    out = r.report.validation.outputs[0]
    assert out.passed and out.caution and "same for all 2 samples" in out.caution
    assert r.report.validation.cautions == [f"output 'y': {out.caution}"]
    assert r.report.to_dict()["validation"]["cautions"] == r.report.validation.cautions


def test_outputs_within_atol_of_zero_are_a_caution_and_ordinary_outputs_are_not():
    m = conv_bn(np.random.default_rng(0))
    gamma = next(t for t in m.graph.initializer if t.name == "bn.gamma")
    beta = next(t for t in m.graph.initializer if t.name == "bn.beta")
    mean = next(t for t in m.graph.initializer if t.name == "bn.mean")
    ordinary = normswap.convert(m, to="fold").report.validation
    assert ordinary.passed and ordinary.cautions == []
    for t, v in ((gamma, 1e-7), (beta, 0.0), (mean, 0.0)):
        t.CopyFrom(onnx.numpy_helper.from_array(np.full(6, v, np.float32), t.name))
    tiny = normswap.convert(m, to="fold", atol=1e-4).report.validation  # the elementwise rule
    assert tiny.passed and "within atol" in tiny.outputs[0].caution
    relative = normswap.convert(m, to="fold").report.validation  # the noise-floor rule is relative: no blind spot
    assert relative.rule == "noise floor" and relative.passed and not relative.outputs[0].caution
    assert "within atol" not in (normswap.convert(m, to="fold", atol=1e-9).report.validation.outputs[0].caution
                                 or "")


def test_cli_warns_when_validation_cannot_tell_models_apart(tmp_path):
    import subprocess
    import sys
    p = tmp_path / "c.onnx"
    onnx.save_model(_constant_output_model(), str(p))
    r = subprocess.run([sys.executable, "-m", "normswap.cli", "convert", str(p), "--to", "fold"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "warning: validation cannot tell the models apart on output 'y'" in r.stderr


def test_a_negative_dim_value_is_a_dynamic_dimension():
    m = conv_bn(np.random.default_rng(0))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # paddle2onnx's dynamic batch
    r = normswap.convert(m, to="group", groups=2, input_shapes={"x": (4, 4, 5, 5)})
    assert r.report.validation.outputs[0].shape[0] == 4 and r.report.layers[0].groups == 2
    assert normswap.convert(m, to="fold").report.passed  # generated with the default batch
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3  # a positive value is fixed
    with pytest.raises(UsageError, match="fixes it to 3"):
        normswap.convert(m, to="fold", input_shapes={"x": (4, 4, 5, 5)})


def test_scalar_boolean_and_integer_inputs_get_0d_arrays():
    from tests.builders import init
    m = conv_bn(np.random.default_rng(0))
    m.graph.node[1].output[0] = "bn_out"
    m.graph.input.extend([helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                          helper.make_tensor_value_info("k", TensorProto.INT64, [])])
    m.graph.node.extend([helper.make_node("Cast", ["flag"], ["flag_f"], to=TensorProto.FLOAT),
                         helper.make_node("Cast", ["k"], ["k_f"], to=TensorProto.FLOAT),
                         helper.make_node("Add", ["flag_f", "k_f"], ["s"]),
                         helper.make_node("Add", ["s", "one"], ["s1"]),
                         helper.make_node("Mul", ["bn_out", "s1"], ["y"])])
    m.graph.initializer.append(init("one", np.ones((), np.float32)))
    feeds = random_inputs(m)
    assert isinstance(feeds["flag"], np.ndarray) and feeds["flag"].shape == () and feeds["k"].shape == ()
    assert normswap.convert(m, to="fold").report.passed


def test_inputs_are_checked_before_any_work(monkeypatch):
    import normswap.onnx.calibrate as calibrate_module
    m = conv_bn(np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((8, 4, 5, 5)).astype(np.float32)

    def never(*args, **kwargs):
        raise AssertionError("calibration ran before the inputs were checked")
    monkeypatch.setattr(calibrate_module, "calibrate", never)
    cases = [({"nope": x}, "has no array for input"), ({"x": x[:, :, :, 0]}, "rank 4"),
             ({"x": x[:, :3]}, "has 3 at axis 1 but the model fixes it to 4")]
    for inputs, message in cases:
        with pytest.raises(UsageError, match=message):
            normswap.convert(m, to="group", groups=2, calibration={"x": x}, inputs=inputs, refine=False)
    with pytest.raises(UsageError, match="unknown input"):
        normswap.convert(m, to="group", groups=2, calibration={"x": x}, input_shapes={"y": (2, 4, 5, 5)}, refine=False)
    with pytest.raises(UsageError, match="min_cosine=0.9 gate"):
        normswap.convert(m, to="fold", min_cosine=0.9)
    monkeypatch.undo()
    assert normswap.convert(m, to="group", groups=2, calibration={"x": x}, inputs={"x": x},
                            refine=False).report.calibration


def test_arrays_with_different_sample_counts_are_refused():
    from normswap.validate.inputs import check_feeds
    m = conv_bn(np.random.default_rng(0))
    m.graph.input.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 2]))
    with pytest.raises(UsageError, match="different numbers of samples"):
        check_feeds({"x": np.zeros((3, 4, 5, 5), np.float32), "z": np.zeros((2, 2), np.float32)}, m, "data")
    assert len(check_feeds({"x": np.zeros((3, 4, 5, 5), np.float32), "z": np.zeros((3, 2), np.float32)}, m, "d")) == 2


def test_cuda_sessions_run_with_tf32_off_and_the_report_says_so_only_on_cuda():
    from normswap.validate.providers import CPU, CUDA, session_providers
    assert session_providers((CUDA, CPU)) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert session_providers((CUDA, CPU), tf32=True)[0] == (CUDA, {"use_tf32": "1"})
    assert session_providers((CPU,)) == [CPU]
    report = normswap.convert(conv_bn(np.random.default_rng(0)), to="fold", provider="cpu").report.validation
    assert report.tf32 is None and report.reference_optimization == "ORT_DISABLE_ALL"


def test_a_probability_map_whose_outputs_vary_carries_no_caution_and_a_constant_one_does():
    from tests.builders import paddle_style
    m = paddle_style(np.random.default_rng(0), "map", 11)
    x = np.random.default_rng(1).standard_normal((6, 3, 16, 16)).astype(np.float32)
    varied = normswap.convert(m, to="fold", inputs={"x": x}).report.validation
    assert varied.rule == "noise floor" and not varied.cautions
    same = normswap.convert(m, to="fold", inputs={"x": np.repeat(x[:1], 6, axis=0)}).report.validation
    assert same.cautions and "same for all 6 samples" in same.cautions[0]


def test_with_calibration_data_and_no_inputs_validation_runs_on_a_held_aside_slice():
    x = np.load(Path(__file__).parent.parent / "fixtures" / "digits_heldout.npz")["x"][:40]
    model = str(Path(__file__).parent.parent / "fixtures" / "digits_resnet.onnx")
    group = normswap.convert(model, to="layer", calibration={"x": x}, progress=False, refine=False).report
    assert group.calibration.samples == 34 and group.validation.outputs[0].shape[0] == 6
    assert group.validation.inputs.startswith("6 sample(s) held aside from the calibration= data")
    fold = normswap.convert(model, to="fold", calibration={"x": x}, progress=False, refine=False).report
    assert fold.validation.outputs[0].shape[0] == 40 and "nothing is fitted" in fold.validation.inputs
    assert any("served as the validation inputs" in n for n in fold.notes)
    with_inputs = normswap.convert(model, to="layer", calibration={"x": x}, inputs={"x": x[:8]}, progress=False,
                                   refine=False)
    assert with_inputs.report.calibration.samples == 40 and with_inputs.report.validation.inputs == "given arrays"


def _counting_reference_runs(monkeypatch) -> list[int]:
    import normswap.onnx.activations as activations
    runs = []
    real = activations.Activations.run

    def run(self, feeds, names):
        if self.label == "reference":
            runs.append(len(next(iter(feeds.values()))))
        return real(self, feeds, names)
    monkeypatch.setattr(activations.Activations, "run", run)
    return runs


def test_kept_reference_runs_are_read_instead_of_running_the_reference_again(monkeypatch):
    from normswap.validate.runner import validate_models
    fixtures = Path(__file__).parent.parent / "fixtures"
    ref = onnx.load(str(fixtures / "digits_resnet.onnx"))
    cand = normswap.convert(ref, to="layer", validate=False).model
    x = {"x": np.load(fixtures / "digits_heldout.npz")["x"][:50]}
    runs = _counting_reference_runs(monkeypatch)
    kept: dict = {}
    first = validate_models(ref, cand, inputs=x, check="fidelity", reference_runs=kept, batch_size=20)
    assert runs == [20, 20, 10] and sorted(kept) == [1, 2, 3]
    again = validate_models(ref, cand, inputs=x, check="fidelity", reference_runs=kept, batch_size=20)
    assert runs == [20, 20, 10]  # read, not run
    assert again.outputs[0].cosine == first.outputs[0].cosine and again.agreement == first.agreement
    fresh = validate_models(ref, cand, inputs=x, check="fidelity", batch_size=20)
    assert runs == [20, 20, 10] * 2 and fresh.outputs[0].cosine == first.outputs[0].cosine


def test_kept_reference_runs_without_a_value_asked_for_run_the_reference(monkeypatch):
    from normswap.validate.runner import validate_models
    fixtures = Path(__file__).parent.parent / "fixtures"
    ref = onnx.load(str(fixtures / "digits_resnet.onnx"))
    conversion = normswap.convert(ref, to="layer", validate=False)
    x = {"x": np.load(fixtures / "digits_heldout.npz")["x"][:30]}
    runs = _counting_reference_runs(monkeypatch)
    kept: dict = {}
    validate_models(ref, conversion.model, inputs=x, check="fidelity", reference_runs=kept)
    layer = conversion.report.layers[0].name
    value = next(n.output[0] for n in ref.graph.node if n.name == layer)
    report = validate_models(ref, conversion.model, inputs=x, check="fidelity", reference_runs=kept,
                             layer_outputs=(value,))
    assert runs == [30, 30] and value in report.layer_cosine  # the kept run lacked the layer's value
