"""torchvision and timm models, when those packages are installed (they are not pinned in CI). PyPI's
torchvision wheel is built against the CUDA torch: its compiled operators (nms, roi_align) do not load beside
the pinned CPU torch, so their fake-kernel registrations are skipped -- no model here uses them."""
import sys
import types

import pytest

torch = pytest.importorskip("torch")

import normswap  # noqa: E402
from tests.torch_nets import randomize_bn  # noqa: E402


def _check(net, x):
    for target in ("fold", "weight"):
        r = normswap.convert(net, to=target, example_inputs=x, validate=False)
        with torch.no_grad():
            torch.testing.assert_close(r.model(x), net(x), rtol=1e-4, atol=1e-4)
    g = normswap.convert(net, to="group", calibration=x, validate=False, refine=False)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in g.model.modules())
    assert g.report.calibration.segments > 1  # traced: every node ran once, segment by segment


def _torchvision_models():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("torchvision.models")


def _timm():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    return pytest.importorskip("timm")


def test_torchvision_resnet18():
    models = _torchvision_models()
    _check(randomize_bn(models.resnet18(weights=None)), torch.randn(2, 3, 64, 64))


def test_timm_batchnormact_model():
    timm = _timm()
    net = randomize_bn(timm.create_model("resnet18d", pretrained=False))
    _check(net, torch.randn(2, 3, 64, 64))


@pytest.mark.parametrize("name,size", [("tf_efficientnet_lite0", 96), ("mobilevit_xxs", 128),
                                       ("efficientvit_b0", 96), ("efficientvit_m0", 224),
                                       ("bat_resnext26ts", 256)])
def test_timm_models_plain_fx_cannot_trace(name, size):
    """Shape-dependent control flow in forward: traced with the example's values, folded, segmented."""
    timm = _timm()
    torch.manual_seed(0)
    net = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10)).eval()
    x = torch.randn(2, 3, size, size)
    r = normswap.convert(net, to="fold", example_inputs=x, validate=False)
    assert r.report.dataflow != "none" and r.report.count("folded") >= len(r.report.layers) - 1
    _check(net, x)
