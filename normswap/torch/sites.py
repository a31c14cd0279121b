"""Finding every BatchNorm-like module of a network, and what it does.

Covers ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy BN (uninitialized: a clear error), BN subclasses that
carry extra behaviour after normalizing (timm's ``BatchNormAct2d``: ``drop`` and ``act`` submodules, kept by
every rewrite), ``affine=False``, ``track_running_stats=False`` (it normalizes with batch statistics even in
eval mode: there are no trained statistics to fold), BN with frozen parameters, and ``FrozenBatchNorm2d``-style
modules (torchvision / detectron2: buffers weight, bias, running_mean, running_var, an ``eps``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedError

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class TorchSite:
    """One normalization module. ``stats``: it has trained running statistics (so inference BN is a fixed
    affine map ``s * x + t``); ``couples``: in training mode it mixes the samples of a batch."""

    name: str
    module: nn.Module
    kind: str
    channels: int
    eps: float
    affine: bool
    stats: bool
    frozen: bool
    couples: bool
    extras: tuple[str, ...]  # submodules applied after normalizing (drop, act), kept by every rewrite
    problem: str | None = None  # why it cannot be rewritten at all

    def affine64(self) -> tuple[np.ndarray, np.ndarray]:
        """(gamma, beta) in float64; 1 and 0 when ``affine=False``."""
        m, c = self.module, self.channels
        gamma = _np(m.weight) if getattr(m, "weight", None) is not None else np.ones(c)
        beta = _np(m.bias) if getattr(m, "bias", None) is not None else np.zeros(c)
        return gamma, beta

    def parameters64(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(gamma, beta, mean, var) in float64, for a BN with running statistics."""
        assert self.stats, self.name
        return self.affine64() + (_np(self.module.running_mean), _np(self.module.running_var))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _is_frozen_bn(m: nn.Module) -> bool:
    """torchvision.ops.FrozenBatchNorm2d and detectron2's FrozenBatchNorm2d, recognized by shape, not import."""
    return ("FrozenBatchNorm" in type(m).__name__ and all(
        isinstance(getattr(m, k, None), torch.Tensor) for k in ("weight", "bias", "running_mean", "running_var")))


def _extras(m: nn.Module) -> tuple[str, ...]:
    return tuple(k for k in ("drop", "act") if isinstance(getattr(m, k, None), nn.Module))


def _has_custom_forward(m: nn.Module) -> bool:
    for cls in type(m).__mro__:
        if cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                   nn.modules.batchnorm._BatchNorm):
            return False
        if "forward" in cls.__dict__:
            return True
    return False


def describe(name: str, m: nn.Module) -> TorchSite | None:
    """A TorchSite for a normalization module, None for anything else."""
    if _is_frozen_bn(m):
        return TorchSite(name, m, type(m).__name__, int(m.weight.numel()), float(getattr(m, "eps", 1e-5)), True,
                         True, True, False, ())
    if not isinstance(m, BN_TYPES):
        return None
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        raise UnsupportedError(f"'{name}' is a lazy BatchNorm that was never run, so it has no channels or "
                               "statistics; run the model once on an example input before converting it")
    frozen = m.affine and not any(p.requires_grad for p in (m.weight, m.bias))
    site = TorchSite(name, m, type(m).__name__, int(m.num_features), float(m.eps), bool(m.affine),
                     bool(m.track_running_stats and m.running_mean is not None), frozen, True, _extras(m))
    if _has_custom_forward(m) and not site.extras:
        site.problem = (f"{type(m).__name__} overrides forward with behaviour normswap cannot see; "
                        "rewriting it could drop that behaviour")
    return site


def find_sites(module: nn.Module) -> list[TorchSite]:
    """Every normalization module, in registration order (execution order is found by tracing)."""
    sites = []
    for name, m in module.named_modules():
        site = describe(name, m)
        if site is not None:
            sites.append(site)
    return sites


def coupling_report(module: nn.Module) -> list[dict]:
    """What a differential-privacy or batch-1 user must know: every BN form, and whether it mixes samples."""
    rows = []
    for s in find_sites(module):
        if not s.couples:
            why = "fixed statistics and affine: does not mix samples, but cannot adapt either"
        elif not s.stats:
            why = "track_running_stats=False: normalizes with batch statistics in train AND eval mode"
        else:
            why = "normalizes with batch statistics in training mode"
            if s.frozen:
                why += " (its affine parameters are frozen, its statistics are not)"
            if not s.affine:
                why += " (affine=False)"
        rows.append({"name": s.name, "type": s.kind, "channels": s.channels, "eps": s.eps, "affine": s.affine,
                     "running_stats": s.stats, "frozen": s.frozen, "couples_samples": s.couples,
                     "extras": list(s.extras), "reason": why})
    return rows
