"""The PyTorch path keeps what a trained network learned: digits CNN, held-out agreement."""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

import normswap  # noqa: E402
from tests.torch_nets import agreement  # noqa: E402


@pytest.mark.slow
def test_calibration_and_distillation_keep_the_function(trained):
    net, calib, held = trained
    opacus = normswap.convert(net, to="group", calibration=calib, validate=False, refine=False)
    for layer in opacus.report.layers:  # what Opacus does: fresh GroupNorm, gamma = 1, beta = 0
        norm = opacus.model.get_submodule(layer.name)
        with torch.no_grad():
            norm.weight.fill_(1.0)
            norm.bias.zero_()
    copied = normswap.convert(net, to="group", example_inputs=calib, validate=False)
    calibrated = normswap.convert(net, to="group", groups="auto", calibration=calib, validate=False, refine=False)
    distilled = normswap.convert(net, to="group", groups="auto", calibration=calib, refine_steps=150,
                                 validate=False)
    scores = [agreement(net, r.model, held) for r in (opacus, copied, calibrated, distilled)]
    assert scores[0] < 0.6 and scores[1] < 0.6  # forgetting, without calibration
    assert scores[2] >= 0.97
    assert scores[3] >= scores[2] - 0.003  # distillation is kept only if it lowers the output error
    assert any("refine" in n for n in distilled.report.notes)
    assert set(calibrated.report.calibration.layers_changed) >= {layer.name for layer in calibrated.report.layers}
    assert calibrated.report.calibration.head == "fc"


def test_input_module_untouched_by_calibration_and_distillation(trained):
    net, calib, _ = trained
    before = {k: v.clone() for k, v in net.state_dict().items()}
    normswap.convert(net, to="layer", calibration=calib[:64], refine_steps=5, validate=False)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(p.requires_grad for p in net.parameters())
