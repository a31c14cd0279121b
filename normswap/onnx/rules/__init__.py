"""Rewrite rules, one module each; the registry is this explicit tuple (no import-time registration)."""
from __future__ import annotations

from . import fold_conv, fold_gemm, to_affine
from .base import BnSite, Rule, Skip, read_bn_site

FOLD_RULES: tuple[Rule, ...] = (fold_conv.RULE, fold_gemm.RULE)
AFFINE_RULE: Rule = to_affine.RULE
RULES: tuple[Rule, ...] = FOLD_RULES + (AFFINE_RULE,)

__all__ = ["AFFINE_RULE", "FOLD_RULES", "RULES", "BnSite", "Rule", "Skip", "read_bn_site"]
