"""PyTorch path: every target on every architecture, exactness, guards, and what is preserved."""
import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import normswap  # noqa: E402
from tests.torch_nets import ALL_ARCHITECTURES, INPUTS, randomize_bn  # noqa: E402

EXACT = ("fold", "affine", "weight")
REPLACE = ("group", "layer", "instance")


def _net(name, seed=0):
    torch.manual_seed(seed)
    return randomize_bn(ALL_ARCHITECTURES[name](), seed)


def _x(name, n=16, seed=1):
    return torch.randn((n,) + INPUTS[name], generator=torch.Generator().manual_seed(seed))


def _no_bn_left(module):
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@pytest.mark.parametrize("name", list(ALL_ARCHITECTURES))
@pytest.mark.parametrize("target", EXACT)
def test_exact_targets_compute_the_same_function(name, target):
    net, x = _net(name), _x(name)
    before = copy.deepcopy(net.state_dict())
    r = normswap.convert(net, to=target, example_inputs=x, validate=False)
    assert _no_bn_left(r.model)
    with torch.no_grad():
        ref, got = net(x), r.model(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    for k, v in net.state_dict().items():  # the input module is never touched
        assert torch.equal(v, before[k])
    assert not {p.data_ptr() for p in net.parameters()} & {p.data_ptr() for p in r.model.parameters()}


@pytest.mark.parametrize("name", list(ALL_ARCHITECTURES))
def test_fold_pairs_by_dataflow(name):
    r = normswap.convert(_net(name), to="fold", example_inputs=_x(name), validate=False)
    actions = {layer.action for layer in r.report.layers}
    if name == "densenet":  # pre-activation BNs read a Concat (and the stem conv feeds it too)
        assert actions == {"folded", "affine"}
    else:
        assert actions == {"folded"}


@pytest.mark.parametrize("name", list(ALL_ARCHITECTURES))
@pytest.mark.parametrize("target", REPLACE)
def test_replacement_targets_keep_channels_eps_and_mode(name, target):
    net, x = _net(name), _x(name)
    net.train()
    r = normswap.convert(net, to=target, calibration=x, validate=False, refine=False)
    assert _no_bn_left(r.model) and r.model.training
    for layer in r.report.layers:
        assert layer.action in ("converted", "affine")
        if layer.action == "converted":
            new = r.model.get_submodule(layer.name)
            assert isinstance(new, (nn.GroupNorm,)) and new.num_channels == layer.channels
            assert new.eps == net.get_submodule(layer.name).eps and new.training
            assert layer.calibrated
    if name == "mlp" and target == "instance":
        assert all("no spatial dims" in layer.reason for layer in r.report.layers)


def test_layer_over_channels_is_channel_layer_norm():
    from normswap.torch.modules import ChannelLayerNorm
    net, x = _net("resnet"), _x("resnet")
    r = normswap.convert(net, to="layer", layer_over="channels", calibration=x, validate=False, refine=False)
    convs = [layer for layer in r.report.layers if layer.action == "converted"]
    assert convs and all(isinstance(r.model.get_submodule(layer.name), ChannelLayerNorm) for layer in convs)


def test_weight_target_uses_torch_weight_norm():
    from torch.nn.utils import parametrize
    r = normswap.convert(_net("resnet"), to="weight", example_inputs=_x("resnet"), validate=False)
    conv = r.model.get_submodule("layer1.conv1")
    assert parametrize.is_parametrized(conv, "weight")


def test_group_rules_match_the_onnx_path():
    net = nn.Sequential(nn.Linear(4, 64), nn.BatchNorm1d(64), nn.Linear(64, 8), nn.BatchNorm1d(8)).eval()
    r = normswap.convert(net, to="group", groups=32, calibration=torch.randn(8, 4), validate=False, refine=False)
    first, second = r.report.layers
    # (N, 64): 32 groups of 2 values would normalize to a constant (opacus#567): fewer, larger groups
    assert first.action == "converted" and (64 // first.groups) >= 16
    assert second.action == "affine" and "discard the signal" in second.reason


def test_conversion_fidelity_is_validated_in_onnx_runtime():
    net, x = _net("resnet"), _x("resnet", 64)
    r = normswap.convert(net, to="group", calibration=x, inputs=_x("resnet", 32, seed=5), refine=False)
    v = r.report.validation
    assert v.check == "fidelity" and v.providers and v.outputs[0].cosine > 0.99
    assert r.report.deployable.check == "exact" and r.report.deployable.passed
    assert all(layer.drift_cosine is not None for layer in r.report.layers)
    exact = normswap.convert(net, to="fold", example_inputs=x)
    assert exact.report.passed and exact.report.validation.check == "exact"
    assert exact.report.to_dict()["frontend"] == "torch"


class _ConvBN(nn.Module):
    """conv-BN whose output is per sample, or (``per_sample=False``) the mean over the batch."""

    def __init__(self, per_sample: bool = True):
        super().__init__()
        self.body, self.per_sample = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3)), per_sample

    def forward(self, x):
        y = self.body(x)
        return y if self.per_sample else y.mean(0)


def test_the_deployable_check_runs_float64_on_the_first_samples_only():
    from normswap.validate.float64 import FLOAT64_SAMPLES
    torch.manual_seed(0)
    net = randomize_bn(_ConvBN(), 0)
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    r = normswap.convert(net, to="group", calibration=x, refine=False)
    d = r.report.deployable
    assert d.passed and d.rule == "noise floor" and f"{FLOAT64_SAMPLES} sample(s)" in d.float64_reference
    assert d.outputs[0].original_error < 1e-5  # eager float32 against float64 on the same samples
    assert d.outputs[0].shape[0] == 40  # the float32 comparison still covers every sample


def test_an_output_that_is_not_per_sample_is_judged_in_float64_on_every_sample():
    torch.manual_seed(0)
    net = randomize_bn(_ConvBN(per_sample=False), 0)
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    r = normswap.convert(net, to="group", calibration=x, refine=False)
    d = r.report.deployable
    assert d.passed and d.rule == "noise floor"
    # the eager float32 mean is at float32 rounding of the float64 one over the same 40 samples (a float64 mean
    # over the first 4 would be off by the spread of the samples)
    assert d.outputs[0].original_error < 1e-5


def test_the_deployable_check_reuses_the_exports_cpu_run(monkeypatch, tmp_path):
    import onnx

    import normswap.onnx.activations as activations
    from normswap.torch.validate import _eager_vs_onnx, export
    labels = []

    class Counted(activations.Activations):
        def __init__(self, model, names, providers, workdir, label):
            labels.append(label)
            super().__init__(model, names, providers, workdir, label)
    monkeypatch.setattr(activations, "Activations", Counted)
    torch.manual_seed(0)
    net = randomize_bn(_ConvBN(), 0)
    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    r = normswap.convert(net, to="group", calibration=x, refine=False, provider="cpu")
    assert r.report.deployable.passed and r.report.deployable.providers == ["CPUExecutionProvider"]
    assert "reference" in labels and "exported" not in labels  # the export's own check run was compared
    export(r.model, (x,), tmp_path / "c.onnx")
    again = _eager_vs_onnx(r.model.eval(), (x,), onnx.load(str(tmp_path / "c.onnx")), {"x": x.numpy()},
                           ["CPUExecutionProvider"], None, None, "given inputs")
    assert again.passed and "exported" in labels  # without the export's outputs it runs the export itself
