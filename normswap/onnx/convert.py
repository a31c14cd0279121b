"""The ONNX conversion driver: walk every graph (subgraphs too), apply the target's rules, record each site.

Sites are visited in topological order and the index is updated after each rewrite, so chains fold completely
(Conv -> BN -> BN folds both). Each BN site ends as exactly one LayerRecord.
"""
from __future__ import annotations

import onnx

from ..report import LayerRecord
from .graph import GraphIndex, NameRegistry
from .io import opset_of
from .rules import AFFINE_RULE, FOLD_RULES, BnSite, Rule, Skip, read_bn_site
from .rules.base import site_name
from .types import infer_value_types
from .walk import subgraphs_of

BN = "BatchNormalization"
OTHER_NORMS = ("GroupNormalization", "InstanceNormalization", "LayerNormalization", "LpNormalization",
               "MeanVarianceNormalization", "RMSNormalization")


def _producer_info(g: GraphIndex, name: str) -> tuple[str | None, str | None]:
    p = g.producer_of(name)
    if p is None:
        if name in g.inputs:
            return name, "graph input"
        return (name, "enclosing graph") if not g.defines(name) else (name, "initializer")
    node = g.nodes[p]
    return site_name(node), node.op_type


def _unfoldable_reason(g: GraphIndex, site: BnSite) -> str:
    producer, op = _producer_info(g, site.x)
    if op == "graph input":
        return f"its input '{site.x}' is a graph input, with no producer to absorb it"
    if op == "enclosing graph":
        return "its input comes from the enclosing graph"
    if op == "initializer":
        return "its input is a constant"
    return f"its input is produced by {op} '{producer}', which cannot absorb a per-channel scale"


def _apply(rule: Rule, site: BnSite, match, action: str, reason: str) -> LayerRecord:
    producer, op = _producer_info(site.graph, site.x)
    new_nodes = rule.rewrite(site, match)
    return LayerRecord(site.name, BN, action, reason, site.channels, producer, op, rule.name, site.graph.path,
                       new_nodes)


def _kept(site: BnSite, reason: str) -> LayerRecord:
    producer, op = _producer_info(site.graph, site.x)
    return LayerRecord(site.name, BN, "kept", reason, site.channels, producer, op, None, site.graph.path)


def _convert_site(g: GraphIndex, i: int, target: str, keep_unfoldable: bool) -> LayerRecord:
    site = read_bn_site(g, i)
    if isinstance(site, Skip):
        node = g.nodes[i]
        producer, op = _producer_info(g, node.input[0])
        return LayerRecord(site_name(node), BN, "kept", site.reason, None, producer, op, None, g.path)
    why_not = None
    if target == "fold":
        for rule in FOLD_RULES:
            match = rule.match(site)
            if match is None:
                continue
            if isinstance(match, Skip):
                why_not = why_not or match.reason
                continue
            return _apply(rule, site, match, "folded", f"folded by {rule.name}")
        why_not = why_not or _unfoldable_reason(g, site)
        if keep_unfoldable:
            return _kept(site, f"not foldable: {why_not} (kept by --keep-unfoldable)")
    match = AFFINE_RULE.match(site)
    if isinstance(match, Skip):
        prefix = f"not foldable: {why_not}; " if why_not else ""
        return _kept(site, f"{prefix}cannot become affine: {match.reason}")
    reason = f"not foldable: {why_not}" if why_not else "requested"
    return _apply(AFFINE_RULE, site, match, "affine", reason)


def _convert_graph(g: GraphIndex, target: str, keep_unfoldable: bool, records: list[LayerRecord],
                   opset: int) -> None:
    for i in range(len(g.nodes)):
        node = g.nodes[i]
        if i not in g.removed and node.op_type == BN and node.domain in ("", "ai.onnx"):
            records.append(_convert_site(g, i, target, keep_unfoldable))
    for i, node in enumerate(g.nodes):
        if i in g.removed:
            continue
        for k, sub in enumerate(subgraphs_of(node)):
            sub_index = GraphIndex(sub, ir_version=g.ir_version, opset=opset, types=g.types, names=g.names,
                                   parent=g, path=f"{g.path}/{site_name(node)}[{k}]")
            _convert_graph(sub_index, target, keep_unfoldable, records, opset)
            sub_index.commit()


def convert_in_place(model: onnx.ModelProto, target: str, keep_unfoldable: bool = False
                     ) -> tuple[list[LayerRecord], list[str]]:
    """Rewrite every BatchNormalization of ``model`` (edited in place) for ``target`` ('fold' or 'affine').
    Returns one record per BN site and notes for the report."""
    types, note = infer_value_types(model)
    opset = opset_of(model)
    root = GraphIndex(model.graph, ir_version=model.ir_version, opset=opset, types=types,
                      names=NameRegistry(model))
    records: list[LayerRecord] = []
    _convert_graph(root, target, keep_unfoldable, records, opset)
    root.commit()
    return records, [note] if note else []


def other_norm_sites(model: onnx.ModelProto) -> list[dict]:
    """Normalization ops other than BatchNormalization (listed by inspect, never rewritten)."""
    from .walk import iter_graphs
    sites = []
    for path, g in iter_graphs(model.graph):
        for node in g.node:
            if node.op_type in OTHER_NORMS:
                sites.append({"name": site_name(node), "op": node.op_type, "graph": path, "channels": None,
                              "producer": None, "producer_op": None, "foldable": False,
                              "action_under_fold": "untouched",
                              "reason": "not a BatchNormalization: it does not couple samples, nothing to fold"})
    return sites
