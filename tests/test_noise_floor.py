"""Exact rewrites are judged against the float64 evaluation of the original: an exact fold of a deep net with
large activations passes (where elementwise atol/rtol calls it wrong), a wrong fold fails."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import normswap  # noqa: E402
from normswap.validate.float64 import float64_model  # noqa: E402


X = torch.randn(4, 3, 12, 12)


def _deep_net(seed=0, depth=16, channels=24):
    """Conv-BN-ReLU blocks whose BN scales make activations grow to ~1e5, then a linear head whose outputs mix
    large terms that nearly cancel: float32 rounding of the original itself exceeds 1e-4 + 1e-3 |ref| there."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, channels, 3, padding=1)]
    for k in range(depth):
        bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.2, 2.0)
            bn.weight.uniform_(1.2, 2.0)
            bn.bias.uniform_(-1, 1)
        layers += [bn, nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1)]
    layers += [nn.BatchNorm2d(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                layer.weight.mul_(2.5)  # activations grow layer by layer: outputs reach ~5e3
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():  # centre the logits on the first sample: outputs near 0 computed from ~5e3 terms
        net[-1].bias.sub_(net(X[:1])[0])
    return net




@pytest.fixture(scope="module")
def deep_onnx(tmp_path_factory):
    from normswap.torch.validate import export
    path = tmp_path_factory.mktemp("deep") / "deep.onnx"
    export(_deep_net(), (X,), path)
    return onnx.load(str(path))


def _folded_weights(model):
    return [t for t in model.graph.initializer if t.name.endswith("weight_bnfolded")]


def test_an_exact_fold_of_a_deep_net_passes_against_the_float64_noise_floor(deep_onnx):
    feeds = {deep_onnx.graph.input[0].name: X.numpy()}
    result = normswap.convert(deep_onnx, to="fold", inputs=feeds)
    v = result.report.validation
    assert v.rule == "noise floor" and "float64" in v.float64_reference and v.passed
    out = v.outputs[0]
    assert out.original_error > 0 and out.converted_error <= 4 * out.original_error + 1e-6
    assert max(abs(v) for v in (out.max_abs,)) > 1e-4  # differences an elementwise rule would weigh
    elementwise = normswap.validate(deep_onnx, result.model, inputs=feeds, atol=1e-4, rtol=1e-3)
    assert elementwise.rule == "atol/rtol" and elementwise.passed is False  # the old rule calls this exact fold wrong


@pytest.mark.parametrize("break_it", ["sign", "swap", "scale"])
def test_a_wrong_fold_of_the_same_net_fails(deep_onnx, break_it):
    feeds = {deep_onnx.graph.input[0].name: X.numpy()}
    result = normswap.convert(deep_onnx, to="fold", validate=False)
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    tensor = _folded_weights(broken)[len(_folded_weights(broken)) // 2]
    w = numpy_helper.to_array(tensor).copy()
    if break_it == "sign":
        w[3] = -w[3]  # one output channel with the wrong sign
    elif break_it == "swap":
        w[[2, 5]] = w[[5, 2]]  # two channels' scales exchanged (a transposed per-channel vector)
    else:
        w[7] *= 1.001  # a 0.1% error in one channel's scale
    tensor.CopyFrom(numpy_helper.from_array(w, tensor.name))
    report = normswap.validate(deep_onnx, broken, inputs=feeds)
    assert report.rule == "noise floor" and report.passed is False
    assert report.outputs[0].error_ratio > 4


def test_the_torch_path_judges_folds_against_the_module_in_float64():
    result = normswap.convert(_deep_net(), to="fold", example_inputs=X)
    assert result.report.validation.rule == "noise floor" and result.report.passed
    assert result.report.deployable.rule == "noise floor" and result.report.deployable.passed
    assert "torch" in result.report.validation.float64_reference


def test_without_a_float64_evaluation_the_elementwise_rule_applies_and_says_why():
    from tests.builders import conv_bn
    m = conv_bn(np.random.default_rng(0), dtype=np.float16)  # float16 weights: no float64 copy
    report = normswap.convert(m, to="fold").report.validation
    assert report.rule == "atol/rtol" and "float64" in report.rule_note and report.passed
    explicit = normswap.convert(conv_bn(np.random.default_rng(0)), to="fold", atol=1e-3).report.validation
    assert explicit.rule == "atol/rtol" and explicit.rule_note is None  # given tolerances: no float64 run


def test_the_float64_copy_computes_in_float64():
    from tests.builders import conv_bn
    m64 = float64_model(conv_bn(np.random.default_rng(0)))
    assert all(t.data_type == onnx.TensorProto.DOUBLE for t in m64.graph.initializer)
    assert m64.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.DOUBLE


def _pair_stats(export_error: float, eager_error: float = 1e-9, level: float = 1e-4):
    """A module and its own export judged against the module in float64: eager rounds almost exactly, the export
    is off by ``export_error`` (relative to an output of scale 1)."""
    from normswap.validate.compare import OutputStats
    exact = np.linspace(-1, 1, 64).reshape(4, 16)
    eager, exported = exact + eager_error, exact.copy()
    exported[1, 3] += export_error
    stats = OutputStats("y")
    stats.float32_level, stats.independent_kernels = level, True
    stats.add(eager, exported)
    stats.add_float64(eager, exported, exact)
    return stats.result()


def test_the_export_check_is_judged_on_the_pairs_own_noise():
    reordered = _pair_stats(4.2e-6)  # float32 reordering in the exporter: 4200x eager's error
    assert reordered.passed is True and reordered.error_ratio > 1000
    wrong = _pair_stats(3e-3)  # a wrong export: far beyond the model's float32 level
    assert wrong.passed is False


def test_without_independent_kernels_the_same_pair_is_judged_by_the_multiple():
    from normswap.validate.compare import OutputStats
    exact = np.linspace(-1, 1, 64).reshape(4, 16)
    stats = OutputStats("y")
    stats.float32_level = 1e-4
    cand = exact.copy()
    cand[1, 3] += 4.2e-6
    stats.add(exact + 1e-9, cand)
    stats.add_float64(exact + 1e-9, cand, exact)
    assert stats.result().passed is False  # a rewrite judged against the original: 4200x its error fails


def test_a_model_with_external_data_is_judged_against_the_float64_noise_floor(tmp_path):
    """torch.onnx (dynamo) writes its weights to a .data file: the float64 copy reads them from there."""
    from tests.builders import broken_fold, conv_bn
    m = conv_bn(np.random.default_rng(0), cin=8, cout=16)
    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    onnx.save_model(copy, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    x = {"x": np.random.default_rng(1).standard_normal((2, 8, 5, 5)).astype(np.float32)}
    result = normswap.convert(tmp_path / "m.onnx", to="fold", inputs=x)
    v = result.report.validation
    assert v.rule == "noise floor" and v.passed and v.rule_note is None
    broken = broken_fold(result.model, result.report.layers[0].new_nodes[0], "scaled")
    assert normswap.validate(tmp_path / "m.onnx", broken, inputs=x).passed is False
