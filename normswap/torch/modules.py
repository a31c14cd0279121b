"""Modules that replace BatchNorm in a converted network."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _channel_view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.view((1, -1) + (1,) * (x.dim() - 2))


class ChannelAffine(nn.Module):
    """``y = scale * x + shift`` per channel (axis 1): the exact inference form of a BatchNorm."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.clone())
        self.register_buffer("shift", shift.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * _channel_view(self.scale, x) + _channel_view(self.shift, x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis at every position (ConvNeXt's LayerNorm2d), per-channel affine."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return F.layer_norm(x, (x.shape[1],), self.weight, self.bias, self.eps)
        y = F.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


class WithExtras(nn.Module):
    """A replacement followed by the extra behaviour of the BN subclass it replaced (dropout, activation)."""

    def __init__(self, norm: nn.Module, extras: dict[str, nn.Module]) -> None:
        super().__init__()
        self.norm = norm
        self.extras = nn.ModuleDict(extras)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        for m in self.extras.values():
            x = m(x)
        return x


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
