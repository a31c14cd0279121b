"""The catalogue of conversion targets: the one place a target is declared.

The CLI's ``--to`` choices and the documentation's target table are generated from ``TARGETS``.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str
    exact: bool
    summary: str


TARGETS: tuple[Target, ...] = (
    Target("fold", True,
           "Fold each BatchNormalization into its producing Conv / ConvTranspose / Gemm / MatMul; "
           "BNs without a foldable producer become an exact per-channel Mul+Add."),
    Target("affine", True, "Turn every BatchNormalization into an exact per-channel Mul+Add."),
)

TARGET_NAMES: tuple[str, ...] = tuple(t.name for t in TARGETS)


def get_target(name: str) -> Target:
    """Look up a target by name; raises ``KeyError`` for an unknown one."""
    for target in TARGETS:
        if target.name == name:
            return target
    raise KeyError(name)
