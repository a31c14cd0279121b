"""PyTorch calibration segment by segment: the same fit as the level-by-level reference, every node once, on
the module's device, within a memory budget; untraceable modules fall back to the level-by-level fit."""
import copy

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import normswap  # noqa: E402
from normswap.targets import ReplaceOptions  # noqa: E402
from normswap.torch.calibrate import _calibrate_by_levels, calibrate  # noqa: E402
from normswap.torch.convert import convert_module  # noqa: E402
from normswap.torch.data import Batches  # noqa: E402
from tests.torch_nets import ALL_ARCHITECTURES, INPUTS, randomize_bn  # noqa: E402


def _setup(name: str, target: str, **options):
    torch.manual_seed(0)
    net = randomize_bn(ALL_ARCHITECTURES[name](), 0)
    x = torch.randn((24,) + INPUTS[name], generator=torch.Generator().manual_seed(1))
    converted, converter, flow, _ = convert_module(net, target, ReplaceOptions(**options), False, (x[:2],))
    return net, converted, converter.new_layers, flow.head, Batches(x, 1, 8)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "densenet", "unet"])
@pytest.mark.parametrize("target,options", [("group", {}), ("layer", {}), ("instance", {}),
                                            ("layer", {"layer_over": "channels"})])
def test_segments_give_the_level_by_level_fit(name, target, options):
    net, a, layers_a, head, data = _setup(name, target, **options)
    segmented = calibrate(net, a, layers_a, data, head=head)
    net_b, b, layers_b, _, _ = _setup(name, target, **options)
    reference = _calibrate_by_levels(net_b, b, layers_b, data, head=head)
    assert (segmented.segments > 1 or not layers_a) and segmented.passes == 1 and reference.segments == 0
    assert [la.groups for la in layers_a] == [lb.groups for lb in layers_b]
    pa, pb = _params(a), _params(b)
    for k in pa:  # float32 activations decide a near-constant channel's scale only to about a percent
        torch.testing.assert_close(pa[k], pb[k], rtol=2e-2, atol=1e-3, msg=k)
    x = torch.randn((8,) + INPUTS[name], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the same function
        ya, yb = a.eval()(x), b.eval()(x)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4 * float(yb.abs().max()))
    assert segmented.layers_changed == reference.layers_changed


def test_a_wrong_segment_order_would_be_caught():
    """Fitting every layer on the original's own inputs differs from the sequential fit: the check can fail."""
    net, a, layers, head, data = _setup("resnet", "layer")
    calibrate(net, a, layers, data, head=None)
    _, b, layers_b, _, _ = _setup("resnet", "layer")
    for k, layer in enumerate(layers_b):  # each layer alone, upstream layers unfitted
        net_c, c, layers_c, _, _ = _setup("resnet", "layer")
        _calibrate_by_levels(net_c, c, [layers_c[k]], data, head=None)
        layer.module.load_state_dict(layers_c[k].module.state_dict())
    pa, pb = _params(a), _params(b)
    assert any(not torch.allclose(pa[k], pb[k], rtol=2e-3, atol=2e-4) for k in pa)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if y.mean() > 1e9:  # data-dependent control flow: torch.fx cannot trace it
            y = -y
        return self.fc(y.mean((2, 3)))


def test_an_untraceable_module_is_fitted_level_by_level():
    torch.manual_seed(0)
    net = randomize_bn(_Untraceable())
    r = normswap.convert(net, to="group", calibration=torch.randn(16, 1, 8, 8), validate=False, refine=False)
    assert r.report.calibration.segments == 0 and r.report.calibration.passes >= 1
    assert all(layer.calibrated for layer in r.report.layers)


def test_activations_beyond_the_budget_spill_and_give_the_same_fit():
    torch.manual_seed(0)
    net = randomize_bn(ALL_ARCHITECTURES["resnet"]())
    x = torch.randn((16,) + INPUTS["resnet"])
    kept = normswap.convert(net, to="group", calibration=x, validate=False, refine=False)
    spilled = normswap.convert(net, to="group", calibration=x, validate=False, calibration_memory=0, refine=False)
    a, b = kept.report.calibration, spilled.report.calibration
    assert a.activations == "memory" and b.activations == "memory and disk" and b.spilled_bytes > 0
    for (k, va), vb in zip(kept.model.state_dict().items(), spilled.model.state_dict().values()):
        assert torch.equal(va, vb), k


def test_calibration_data_follows_the_module_device():
    net = randomize_bn(ALL_ARCHITECTURES["resnet"]())
    data = Batches(torch.randn((4,) + INPUTS["resnet"], dtype=torch.float64).permute(0, 1, 3, 2), 1, 2,
                   device=next(net.parameters()).device)
    for (batch,) in data:
        assert batch.device == next(net.parameters()).device and batch.is_contiguous()


def test_progress_names_segments_and_rate():
    calls = []
    net = randomize_bn(ALL_ARCHITECTURES["resnet"]())
    normswap.convert(net, to="group", calibration=torch.randn((16,) + INPUTS["resnet"]), validate=False,
                     progress=lambda done, total, label: calls.append((done, total, label)), refine=False)
    calib = [c for c in calls if c[2].startswith("calibrating")]
    assert calib[-1][0] == calib[-1][1] and "samples/s" in calib[0][2] and "segment 1/" in calib[0][2]
    assert copy.copy([c[0] for c in calib]) == sorted(c[0] for c in calib)
