"""Small torch architectures with BatchNorm, for tests (ResNet, MobileNetV2, DenseNet styles, and more)."""
from __future__ import annotations

import torch
from torch import nn


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters, as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return module.eval()


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                      if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class Bottleneck(nn.Module):
    def __init__(self, c: int, mid: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                                  nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(self.body(x) + x)


class ResNetStyle(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 24, stride=2)
        self.layer3 = Bottleneck(24, 8)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int):
        super().__init__()
        h = c * expand
        self.body = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                  nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                  nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


class MobileNetStyle(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12),
                                  nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(12, 4), InvertedResidual(12, 6))
        self.head = nn.Sequential(nn.Conv2d(12, 20, 1, bias=False), nn.BatchNorm2d(20), nn.ReLU6())
        self.fc = nn.Linear(20, classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class DenseLayer(nn.Module):
    """Pre-activation: BN -> ReLU -> Conv; the BN reads a Concat, so it cannot fold (affine)."""

    def __init__(self, c_in: int, growth: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(c_in)
        self.conv = nn.Conv2d(c_in, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(torch.relu(self.bn(x)))], 1)


class DenseNetStyle(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dense = nn.Sequential(DenseLayer(8, 6), DenseLayer(14, 6), DenseLayer(20, 6))
        self.bn = nn.BatchNorm2d(26)
        self.fc = nn.Linear(26, classes)
        self.bn_fc = nn.BatchNorm1d(classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.dense(self.stem(x))))
        return self.bn_fc(self.fc(x.mean((2, 3))))


class UNetStyle(nn.Module):
    """Down with Conv, up with (grouped) ConvTranspose, each followed by BN."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.bn_up = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 4, 3, padding=1, bias=False)
        self.bn_up2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_up2(self.up2(torch.relu(self.bn_up(self.up(self.down(x))))))


ARCHITECTURES = {"resnet": ResNetStyle, "mobilenet": MobileNetStyle, "densenet": DenseNetStyle, "unet": UNetStyle}


def export(module: nn.Module, path, shape=(2, 1, 8, 8)) -> None:
    """Export with the dynamo exporter and optimize=False, so BN stays in the graph, as one self-contained file."""
    import onnx
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(module, (torch.randn(*shape),), str(path), dynamo=True, optimize=False, verbose=False,
                      input_names=["x"], dynamic_shapes={"x": {0: batch}})
    m = onnx.load(str(path))  # re-save with the weights inline (the exporter may write a .data file)
    onnx.save_model(m, str(path))


class AudioNet(nn.Module):
    """Conv1d over time, BN1d on (N, C, L)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Conv1d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm1d(16), nn.ReLU())
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.body(x).mean(2))


class VolumeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, 8, 3, padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(),
                                  nn.ConvTranspose3d(8, 8, 2, stride=2, groups=2), nn.BatchNorm3d(8))

    def forward(self, x):
        return self.body(x)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 32),
                                  nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(self.body(x))


INPUTS = {"resnet": (1, 8, 8), "mobilenet": (1, 8, 8), "densenet": (1, 8, 8), "unet": (1, 8, 8),
          "audio": (1, 32), "volume": (1, 4, 4, 4), "mlp": (20,)}
ALL_ARCHITECTURES = dict(ARCHITECTURES, audio=AudioNet, volume=VolumeNet, mlp=MLP)


def agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Share of samples on which two networks (in eval mode) pick the same class."""
    with torch.no_grad():
        return float((a.eval()(x).argmax(1) == b.eval()(x).argmax(1)).float().mean())
