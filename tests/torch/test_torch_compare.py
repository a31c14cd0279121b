"""normswap.compare on a torch module: every target measured in eager PyTorch, calibrated where data is given."""
import pytest
import torch

import normswap
from normswap.errors import UsageError
from tests.torch_nets import ResNetStyle, randomize_bn


def test_compare_a_module():
    net = randomize_bn(ResNetStyle(), seed=1)
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randn(96, 1, 8, 8, generator=g), torch.randn(64, 1, 8, 8, generator=g)
    report = normswap.compare(net, ["fold", "layer", "group"], groups="auto", calibration=calib, inputs=held)
    rows = {r.target: r for r in report.rows}
    assert rows["fold"].exact and rows["fold"].passed is True and rows["fold"].top1_agreement == 1.0
    assert rows["layer"].calibrated and rows["layer"].calibration_seconds > 0
    assert rows["layer"].top1_agreement > 0.5 and rows["fold"].latency_ms > 0
    assert rows["fold"].parameters < sum(p.numel() for p in net.parameters())  # BN parameters are gone
    assert report.recommended in ("layer", "group") and report.latency_source.startswith("torch")
    assert not net.training


def test_compare_a_module_needs_inputs():
    with pytest.raises(UsageError, match="inputs"):
        normswap.compare(randomize_bn(ResNetStyle()), ["fold"])
