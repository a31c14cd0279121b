"""Replace BatchNormalization by GroupNorm, LayerNorm (one group) or InstanceNorm (one group per channel).

Before:  x -> BatchNormalization -> y
After:   x -> Reshape(N, G, -1) -> InstanceNormalization(1, 0) -> Reshape(x's shape) -> Mul(a) -> Add(b) -> y
         (instance: one InstanceNormalization(a, b) node)

Each sample's C channels are split into G contiguous groups, each normalized over its channels and positions
(population variance, the BN's own epsilon), then scaled and shifted per channel by ``a``, ``b``. Without
calibration ``a = gamma`` and ``b = beta`` (the BN's own affine -- the function is *not* preserved); calibration
refits them. Not exact: validated for fidelity.

Group choice (``_math.choose_groups``): group -- the largest divisor of C not above ``--groups`` (or C / S for
``--group-size S``) whose groups hold at least ``min_group_elements`` values per sample; layer -- G = 1;
instance -- G = C, only with spatial dims. With calibration data, the group target's G is then chosen per layer
among the allowed counts (divisors of C up to the asked G, groups large enough) by measured fit. Conditions: the input's rank and element type are known, and its
non-batch size is known (shape inference, ``--input-shape`` or calibration data). A site that fails them is
reported and made affine instead.
"""
from __future__ import annotations

import math

from ...errors import option
from ..._math import allowed_groups, choose_groups, group_choice_note
from .base import FLOAT_TYPES, BnSite, Rewritten, Rule, Skip
from .emit import Emitter, affine, from_float, group_normalize, instance_norm, to_float


def spatial_size(site: BnSite) -> int | None:
    """Positions per channel (product of dims 2..), from shape inference or shapes observed at run time."""
    dims = site.x_type.dims if site.x_type is not None else None
    if dims is not None and all(isinstance(d, int) and d > 0 for d in dims[2:]):
        return math.prod(dims[2:])
    observed = site.graph.observed_shapes.get(site.x)
    return math.prod(observed[2:]) if observed is not None else None


def _common(site: BnSite) -> tuple[int, int, int] | Skip:
    """(rank, element type, spatial size) or why the site cannot be normalized."""
    if site.x_type is None or site.x_type.rank is None:
        return Skip(f"the rank of its input is unknown; pass {option('input_shapes')} so shape inference can find it")
    if site.x_type.elem_type not in FLOAT_TYPES:
        return Skip("the element type of its input is unknown or not floating point")
    spatial = spatial_size(site)
    if spatial is None:
        return Skip(f"the spatial size of its input is unknown; pass {option('input_shapes')} or "
                    f"{option('calibration')} data")
    return site.x_type.rank, site.x_type.elem_type, spatial


def _match(kind: str):
    def match(site: BnSite) -> tuple[int, int, int, str] | Skip:
        common = _common(site)
        if isinstance(common, Skip):
            return common
        rank, elem, spatial = common
        opts = site.options
        if kind == "instance":
            if rank < 3:
                return Skip("its input has no spatial dims, so there is nothing to normalize each channel over")
            groups, how = choose_groups(site.channels, spatial, groups=site.channels,
                                        min_elements=opts.min_group_elements)
        elif kind == "layer":
            groups, how = choose_groups(site.channels, spatial, groups=1, min_elements=opts.min_group_elements)
        elif opts.group_size is not None:
            groups, how = choose_groups(site.channels, spatial, group_size=opts.group_size,
                                        min_elements=opts.min_group_elements)
        else:
            groups, how = choose_groups(site.channels, spatial, groups=opts.groups,
                                        min_elements=opts.min_group_elements, say_asked=not opts.groups_by_fit)
        if groups is None:
            return Skip(how)
        if kind == "group":
            how += group_choice_note(groups, site.channels, opts.groups_by_fit and opts.group_size is None,
                                     opts.groups)
        if kind == "instance" and groups != site.channels:
            return Skip(f"each channel holds only {spatial} values per sample "
                        f"(< {opts.min_group_elements}); instance-normalizing it would discard the signal")
        candidates = tuple(allowed_groups(site.channels, spatial, groups, opts.min_group_elements)) \
            if kind == "group" else ()
        return rank, elem, groups, how, candidates
    return match


def _rewrite(kind: str):
    def rewrite(site: BnSite, m: tuple[int, int, int, str, tuple[int, ...]]) -> Rewritten:
        rank, elem, groups, how, candidates = m
        e = Emitter(site, f"to_{kind}norm")
        if kind == "instance":
            scale, shift = instance_norm(e, site.x, site.gamma, site.beta, elem)
            return Rewritten(e.commit(), groups=groups, scale=scale, shift=shift, detail=how)
        z, consts = group_normalize(e, to_float(e, site.x, elem), groups)
        scale, shift = affine(e, from_float(e, z, elem), site.gamma, site.beta, rank, elem)
        return Rewritten(e.commit(), groups=groups, scale=scale, shift=shift, detail=how,
                         group_candidates=candidates, group_consts=consts)
    return rewrite


GROUP_RULE = Rule("to_groupnorm", "BN replaced by GroupNorm with per-channel affine", _match("group"),
                  _rewrite("group"))
LAYER_RULE = Rule("to_layernorm", "BN replaced by LayerNorm over (C, ...) with per-channel affine", _match("layer"),
                  _rewrite("layer"))
INSTANCE_RULE = Rule("to_instancenorm", "BN replaced by InstanceNorm with per-channel affine", _match("instance"),
                     _rewrite("instance"))
