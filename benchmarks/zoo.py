"""torchvision architectures for the calibration benchmarks: random weights, BN statistics randomized (so a
conversion has something to lose), exported to ONNX with the batch fixed as most exports fix it.

torchvision's compiled operators (nms, roi_align) are built against the CUDA torch wheel and do not load with
the CPU build; the benchmarks use none of them, so their fake-kernel registrations are skipped.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path


def torchvision_models():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision
    return torchvision.models


def randomized(name: str, seed: int = 0):
    """torchvision ``name`` in eval mode with BN running statistics and affine drawn at random."""
    import torch
    torch.manual_seed(seed)
    model = getattr(torchvision_models(), name)(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def export(model, size: int, path: Path, batch: int = 1) -> Path:
    """ONNX export keeping every BatchNormalization (dynamo, optimize=False), batch fixed to ``batch``."""
    import torch
    x = torch.randn(batch, 3, size, size)
    torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False, input_names=["x"], verbose=False)
    import onnx
    m = onnx.load(str(path))
    if m.ir_version > 10:
        m.ir_version = 10
    onnx.save(m, str(path))
    return path
