"""The catalogue of conversion targets: the one place a target is declared.

The CLI's ``--to`` choices and the documentation's target table are generated from ``TARGETS``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._math import MIN_GROUP_ELEMENTS


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
    Target("group", False,
           "GroupNorm with per-channel scale and shift (--groups G or --group-size S, chosen per layer); "
           "independent of the batch size."),
    Target("layer", False,
           "LayerNorm: each sample over all its non-batch dims (or over channels at each position with "
           "--layer-over channels), per-channel scale and shift."),
    Target("instance", False, "InstanceNorm: each sample, each channel, over the spatial dims; per-channel "
           "scale and shift."),
    Target("weight", True, "Fold BN into its producer, then express the producer's weight as g * v / ||v|| per "
           "output channel (weight normalization); exact."),
)

REPLACEMENT_TARGETS = ("group", "layer", "instance")
LAYER_OVER = ("all", "channels")
DEFAULT_GROUPS = 32
AUTO_GROUPS = "auto"


def resolve_groups(to: str, groups: int | str | None, group_size: int | None) -> tuple[int, bool]:
    """``(G, by_fit)`` for the group target: ``groups=G`` is honoured in every layer C allows (the largest divisor of
    C not above G); ``groups="auto"`` lets calibration choose each layer's count by measured fit (up to
    ``DEFAULT_GROUPS``); neither given: ``DEFAULT_GROUPS``, honoured. Options that conflict, or that the target
    would ignore, are refused (``UsageError``) quoting what the caller passed."""
    from .errors import UsageError, option
    if groups is not None and group_size is not None:
        raise UsageError(f"pass {option('groups', groups)} or {option('group_size', group_size)}, not both")
    given = (option("groups", groups) if groups is not None else
             option("group_size", group_size) if group_size is not None else None)
    if given is not None and to != "group":
        raise UsageError(f"{given} applies to {option('to', 'group')} only, not {option('to', to)}; remove it")
    if groups is None or groups == AUTO_GROUPS:
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int)
                                       or group_size < 1):
            raise UsageError(f"{option('group_size', group_size)} must be a positive integer")
        return DEFAULT_GROUPS, groups == AUTO_GROUPS
    if isinstance(groups, str) and groups.isdigit():
        groups = int(groups)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise UsageError(f"{option('groups', groups)} must be a positive integer or '{AUTO_GROUPS}'")
    return groups, False


@dataclass(frozen=True)
class ReplaceOptions:
    """How BN is replaced by a normalization (targets group / layer / instance).

    ``groups`` / ``group_size``: the group target (exactly one is used: ``group_size`` when set); ``layer_over``:
    ``all`` normalizes each sample over all non-batch dims, ``channels`` over C at each position;
    ``min_group_elements``: values a group must hold per sample (see ``_math.MIN_GROUP_ELEMENTS``);
    ``allow_nonfinite``: rewrite a BN whose parameters are not finite (else the conversion is refused, exit 3);
    ``only``: the names of the BNs to replace, every other one becoming a frozen per-channel affine (the
    agreement-floor plan, ``onnx.plan``); None: all of them.
    """

    groups: int = DEFAULT_GROUPS
    group_size: int | None = None
    layer_over: str = "all"
    min_group_elements: int = MIN_GROUP_ELEMENTS
    allow_nonfinite: bool = False  # rewrite BNs with NaN / infinite parameters, NaN epsilon or negative variance
    groups_by_fit: bool = False  # groups="auto": ``groups`` is only the limit calibration chooses under
    only: frozenset[str] | None = None  # replace only these BNs (by name); the others become frozen affine

TARGET_NAMES: tuple[str, ...] = tuple(t.name for t in TARGETS)


def get_target(name: str) -> Target:
    """Look up a target by name; raises ``KeyError`` for an unknown one."""
    for target in TARGETS:
        if target.name == name:
            return target
    raise KeyError(name)


DEFAULT_REPLACE_OPTIONS = ReplaceOptions()


def auto_groups_note(limit: int) -> str:
    """Said when ``groups="auto"`` has no calibration data to choose by."""
    from .errors import option
    return (f"{option('groups', AUTO_GROUPS)} chooses group counts by fit on calibration data; without it each "
            f"layer uses the largest count up to {limit} its channels allow")
