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


def test_torchvision_resnet18():
    models = _torchvision_models()
    _check(randomize_bn(models.resnet18(weights=None)), torch.randn(2, 3, 64, 64))


def test_timm_batchnormact_model():
    timm = pytest.importorskip("timm")
    net = randomize_bn(timm.create_model("resnet18d", pretrained=False))
    _check(net, torch.randn(2, 3, 64, 64))
