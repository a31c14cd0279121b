"""Dataflow for modules plain torch.fx cannot trace: defaulted arguments bound (torchcrepe's forward(x,
embed=False)), shape-dependent Python control flow fixed by the example's values (timm's 'same' padding,
mobilevit's patch arithmetic, efficientvit's window checks, caches filled in forward), torch.export's graph
with its module calls collapsed back (an isinstance check), each graph checked against the module; folds stay
exact, calibration runs in segments with the level-by-level fit, the report
names the tracer, and what cannot be traced safely still falls back."""
import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import normswap  # noqa: E402
from normswap.targets import ReplaceOptions  # noqa: E402
from normswap.torch.calibrate import _calibrate_by_levels, calibrate  # noqa: E402
from normswap.torch.convert import convert_module  # noqa: E402
from normswap.torch.data import Batches  # noqa: E402
from normswap.torch.sites import find_sites  # noqa: E402
from normswap.torch.tracing import defaulted, trace  # noqa: E402
from tests.torch_nets import randomize_bn  # noqa: E402


def _x(n: int = 16, size: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class EmbedSwitch(nn.Module):
    """torchcrepe's shape: a defaulted flag that Python branches on."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x, embed=False):
        x = F.relu(self.bn1(self.conv1(x)))
        if embed:
            return x
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class SamePad(nn.Conv2d):
    """timm's Conv2dSame: TF 'same' padding computed from the input's size in forward."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads = [total // 2, total - total // 2] + pads
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StandardizedConv(nn.Conv2d):
    """A weight-standardized conv: scaling its weight does not scale its output."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ShapeBranches(nn.Module):
    """Control flow on shapes (mobilevit / efficientvit style) and a cache filled in forward (timm's attention
    bias cache): plain torch.fx cannot trace it."""

    def __init__(self, patch: int = 5):
        super().__init__()
        self.patch = patch
        self.stem, self.bn0 = SamePad(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8)
        self.conv, self.bn1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.proj, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.gain = nn.Parameter(torch.full((1, 8, 1, 1), 1.5))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        _, _, h, w = x.shape
        new_h = math.ceil(h / self.patch) * self.patch
        if new_h != h:
            x = F.interpolate(x, size=(new_h, math.ceil(w / self.patch) * self.patch), mode="bilinear")
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.gain.detach() * 2
        x = F.relu(self.bn1(self.conv(x))) * self.cache[key]
        return self.bn2(self.proj(x)).mean((2, 3))


class BatchBranch(ShapeBranches):
    """A branch on the batch size: no fixed value can stand for it."""

    def forward(self, x):
        y = super().forward(x)
        return y * 2 if x.shape[0] == 2 else y


class DataBranch(ShapeBranches):
    """A branch on a tensor's values: the example's outcome would hold for the example alone."""

    def forward(self, x):
        y = super().forward(x)
        return y * 2 if (y.sum() > 0) else y


class TypeCheck(nn.Module):
    """An isinstance check on the input: a torch.fx proxy is not a tensor, so both fx tracers take the wrong
    branch (and fail); torch.export sees the real type."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc, self.bn_fc = nn.Linear(8, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        y = torch.relu(self.bn(self.conv(x)))
        return self.bn_fc(self.fc(y.mean((2, 3))))


def _net(cls, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(cls(), seed).eval()


def test_defaulted_arguments_are_the_ones_left_to_their_defaults():
    assert defaulted(EmbedSwitch(), 1) == {"embed": False}
    assert defaulted(EmbedSwitch(), 2) == {}
    assert defaulted(EmbedSwitch(), None) == {"embed": False}


def test_a_defaulted_flag_is_bound_and_the_module_folds_exactly():
    net, x = _net(EmbedSwitch), _x()
    r = normswap.convert(net, to="fold", example_inputs=x[:2], validate=False)
    assert r.report.dataflow == "torch.fx (defaults bound: embed=False)"
    assert [layer.action for layer in r.report.layers] == ["folded", "folded"]
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), net(x), rtol=1e-5, atol=1e-5)


def test_shape_control_flow_is_traced_with_the_examples_values():
    net, x = _net(ShapeBranches), _x()
    traced = trace(net, {s.name for s in find_sites(net)}, (x[:2],))
    assert traced.ok and traced.source.startswith("torch.fx with the example's values") and traced.fixed
    cached = list(net.cache.values())  # the module's own runs may fill it; tracing must not leave a proxy there
    assert all(type(v) is torch.Tensor for v in cached), cached
    with torch.no_grad():  # the graph holds for other batch sizes of the same shape
        torch.testing.assert_close(traced.graph_module(x), net(x))


def test_without_an_example_shape_control_flow_cannot_be_traced():
    net = _net(ShapeBranches)
    traced = trace(net, {s.name for s in find_sites(net)}, None)
    assert not traced.ok and "pass example inputs" in traced.problem


@pytest.mark.parametrize("cls,problem", [(BatchBranch, "does not reproduce the module on a batch of"),
                                         (DataBranch, "depends on the values of tensor")])
def test_values_that_differ_between_batches_are_not_fixed(cls, problem):
    net, x = _net(cls), _x()
    traced = trace(net, {s.name for s in find_sites(net)}, (x[:2],))
    assert not traced.ok and problem in traced.problem
    r = normswap.convert(net, to="fold", example_inputs=x[:2], validate=False)
    assert r.report.dataflow == "none" and {layer.action for layer in r.report.layers} == {"affine"}
    with torch.no_grad():  # the fallback is still exact
        torch.testing.assert_close(r.model(x[:3]), net(x[:3]), rtol=1e-5, atol=1e-5)


def test_a_value_traced_module_folds_exactly_even_into_a_same_padding_conv():
    net, x = _net(ShapeBranches), _x()
    r = normswap.convert(net, to="fold", example_inputs=x[:2], validate=False)
    assert r.report.dataflow.startswith("torch.fx with the example's values")
    assert [layer.action for layer in r.report.layers] == ["folded"] * 3
    assert isinstance(r.model.stem, SamePad) and r.model.stem.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_conv_whose_forward_does_not_scale_with_its_weight_is_not_folded_into():
    torch.manual_seed(0)
    net = randomize_bn(nn.Sequential(StandardizedConv(3, 8, 3, padding=1), nn.BatchNorm2d(8))).eval()
    x = _x()
    r = normswap.convert(net, to="fold", example_inputs=x[:2], validate=False)
    layer = r.report.layers[0]
    assert layer.action == "affine" and "does not scale its output" in layer.reason
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), net(x), rtol=1e-5, atol=1e-5)


def test_what_torch_fx_cannot_follow_is_taken_from_torch_export_and_folds_exactly():
    net, x = _net(TypeCheck), _x()
    r = normswap.convert(net, to="fold", example_inputs=x[:2], validate=False)
    assert r.report.dataflow == "torch.export"
    assert [(layer.action, layer.producer) for layer in r.report.layers] == [("folded", "conv"), ("folded", "fc")]
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), net(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [EmbedSwitch, ShapeBranches, TypeCheck])
def test_untraceable_by_plain_fx_calibrates_in_segments_with_the_level_by_level_fit(cls):
    x = _x(24)

    def setup():
        net = _net(cls)
        converted, converter, _, _ = convert_module(net, "group", ReplaceOptions(groups=2), False, (x[:2],))
        return net, converted, converter.new_layers

    net, a, layers_a = setup()
    segmented = calibrate(net, a, layers_a, Batches(x, 1, 8), head=None)
    net_b, b, layers_b = setup()
    reference = _calibrate_by_levels(net_b, b, layers_b, Batches(x, 1, 8), head=None)
    assert segmented.segments > 1 and reference.segments == 0
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=2e-3, atol=2e-4, msg=k)


def test_batches_of_another_shape_than_the_traced_one_calibrate_level_by_level():
    net = _net(ShapeBranches)
    x12, x16 = _x(8, 12), _x(8, 16, seed=2)
    converted, converter, _, _ = convert_module(net, "group", ReplaceOptions(groups=2), False, (x12[:2],))

    def batches():
        yield (x12,)
        yield (x16,)

    report = calibrate(net, converted, converter.new_layers, Batches(batches(), 1, 8), head=None)
    assert report.segments == 0 and report.passes >= 1
    assert any("differ in shape" in note for note in report.notes)
