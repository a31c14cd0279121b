"""Rewrite rules, one module each; the registry is these explicit tuples (no import-time registration)."""
from __future__ import annotations

from . import fold_conv, fold_gemm, to_affine, to_groupnorm, to_layernorm_channels, to_weightnorm
from .base import BnSite, Rewritten, Rule, Skip, read_bn_site

FOLD_RULES: tuple[Rule, ...] = (fold_conv.RULE, fold_gemm.RULE)
AFFINE_RULE: Rule = to_affine.RULE
WEIGHT_RULES: tuple[Rule, ...] = to_weightnorm.RULES
GROUP_RULE: Rule = to_groupnorm.GROUP_RULE
LAYER_RULE: Rule = to_groupnorm.LAYER_RULE
INSTANCE_RULE: Rule = to_groupnorm.INSTANCE_RULE
LAYER_CHANNELS_RULE: Rule = to_layernorm_channels.RULE
RULES: tuple[Rule, ...] = FOLD_RULES + (AFFINE_RULE,) + WEIGHT_RULES + (GROUP_RULE, LAYER_RULE, INSTANCE_RULE,
                                                                       LAYER_CHANNELS_RULE)

__all__ = ["AFFINE_RULE", "FOLD_RULES", "GROUP_RULE", "INSTANCE_RULE", "LAYER_CHANNELS_RULE", "LAYER_RULE", "RULES",
           "WEIGHT_RULES", "BnSite", "Rewritten", "Rule", "Skip", "read_bn_site"]
