"""torchvision architectures (when torchvision is installed; skipped otherwise -- it is not pinned in CI) through
fold and group with randomized BN statistics: exact folds pass validation against the float64 noise floor (deep
nets whose float32 outputs differ from float64 by more than 1e-4 were called failed by the elementwise rule),
and every export onnxruntime validates is one it can run (r3d_18's dynamo export cannot: TorchScript is used)."""
import sys
import types

import pytest

torch = pytest.importorskip("torch")

import normswap  # noqa: E402
from tests.torch_nets import randomize_bn  # noqa: E402

ARCHITECTURES = [("resnet18", (2, 3, 64, 64)), ("efficientnet_b0", (2, 3, 64, 64)),
                 ("mobilenet_v3_small", (2, 3, 64, 64)), ("regnet_y_400mf", (2, 3, 64, 64)),
                 ("shufflenet_v2_x0_5", (2, 3, 64, 64)), ("video.r3d_18", (1, 3, 4, 32, 32))]


def _model(name: str):
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    models = pytest.importorskip("torchvision.models")
    for part in name.split("."):
        models = getattr(models, part)
    torch.manual_seed(0)
    return randomize_bn(models(weights=None)).eval()


@pytest.mark.parametrize("name,shape", ARCHITECTURES, ids=[a for a, _ in ARCHITECTURES])
def test_exact_fold_passes_and_group_exports_check_out(name, shape):
    net = _model(name)
    x = torch.randn(*shape)
    folded = normswap.convert(net, to="fold", example_inputs=x)
    v = folded.report.validation
    assert folded.report.passed, (v.rule, v.rule_note, [(o.converted_error, o.original_error) for o in v.outputs])
    assert v.rule == "noise floor" and folded.report.deployable.passed
    group = normswap.convert(net, to="group", calibration=torch.randn(*((8,) + shape[1:])), inputs=x, refine=False)
    assert group.report.deployable.passed and group.report.validation is not None
