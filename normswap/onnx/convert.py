"""The ONNX conversion driver: walk every graph (subgraphs too), apply the target's rules, record each site.

Sites are visited in topological order and the index is updated after each rewrite, so chains fold completely
(Conv -> BN -> BN folds both). Each BN site ends as exactly one LayerRecord; every new normalization is also
returned as a ``NewNorm`` so calibration can refit its scale and shift.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from ..errors import option
from ..report import LayerRecord
from ..targets import DEFAULT_REPLACE_OPTIONS, ReplaceOptions
from .graph import GraphIndex, NameRegistry
from .io import opset_of
from .rules import (AFFINE_RULE, FOLD_RULES, GROUP_RULE, INSTANCE_RULE, LAYER_CHANNELS_RULE, LAYER_RULE,
                    WEIGHT_RULES, BnSite, Rule, Skip, read_bn_site)
from .rules.base import site_name
from .types import ValueType, infer_value_types
from .walk import subgraphs_of

BN = "BatchNormalization"
OTHER_NORMS = ("GroupNormalization", "InstanceNormalization", "LayerNormalization", "LpNormalization",
               "MeanVarianceNormalization", "RMSNormalization")


@dataclass
class NewNorm:
    """A normalization that replaced a BN: where its output is, and the initializers of its per-channel affine."""

    record: LayerRecord
    x: str
    y: str
    channels: int
    groups: int | None  # None: LayerNorm over channels at each position
    eps: float
    scale: str
    shift: str
    graph: str
    group_candidates: tuple[int, ...] = ()
    group_consts: tuple[str, str, str] | None = None
    elem_type: int = onnx.TensorProto.FLOAT  # of the layer's input and output
    rank: int | None = None  # of the layer's input, where known


@dataclass
class Conversion:
    records: list[LayerRecord] = field(default_factory=list)
    new_norms: list[NewNorm] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


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


def _kept(site: BnSite, reason: str) -> LayerRecord:
    producer, op = _producer_info(site.graph, site.x)
    return LayerRecord(site.name, BN, "kept", reason, site.channels, producer, op, None, site.graph.path)


class _SiteConverter:
    def __init__(self, target: str, keep_unfoldable: bool, options: ReplaceOptions, out: Conversion) -> None:
        self.target, self.keep_unfoldable, self.options, self.out = target, keep_unfoldable, options, out

    def _apply(self, rule: Rule, site: BnSite, match, action: str, reason: str) -> LayerRecord:
        producer, op = _producer_info(site.graph, site.x)
        done = rule.rewrite(site, match)
        if done.detail:
            reason = f"{reason}: {done.detail}"
        record = LayerRecord(site.name, BN, action, reason, site.channels, producer, op, rule.name,
                             site.graph.path, done.new_nodes, groups=done.groups)
        if action == "converted" and done.scale is not None:
            self.out.new_norms.append(NewNorm(record, site.x, site.y, site.channels, done.groups, site.eps,
                                              done.scale, done.shift, site.graph.path, done.group_candidates,
                                              done.group_consts, site.x_type.elem_type if site.x_type and
                                              site.x_type.elem_type else onnx.TensorProto.FLOAT,
                                              site.x_type.rank if site.x_type else None))
        return record

    def _first_match(self, rules: tuple[Rule, ...], site: BnSite) -> tuple[Rule, object] | str | None:
        """The first rule that matches, else the first rule's reason for skipping, else None."""
        why_not = None
        for rule in rules:
            match = rule.match(site)
            if match is None:
                continue
            if isinstance(match, Skip):
                why_not = why_not or match.reason
                continue
            return rule, match
        return why_not

    def _affine(self, site: BnSite, why_not: str | None, prefix: str = "not foldable") -> LayerRecord:
        match = AFFINE_RULE.match(site)
        if isinstance(match, Skip):
            first = f"{prefix}: {why_not}; " if why_not else ""
            return _kept(site, f"{first}cannot become affine: {match.reason}")
        reason = f"{prefix}: {why_not}" if why_not else "requested"
        return self._apply(AFFINE_RULE, site, match, "affine", reason)

    def convert(self, g: GraphIndex, i: int) -> LayerRecord:
        site = read_bn_site(g, i, self.options)
        if isinstance(site, Skip):
            node = g.nodes[i]
            producer, op = _producer_info(g, node.input[0])
            return LayerRecord(site_name(node), BN, "kept", site.reason, None, producer, op, None, g.path)
        if self.target in ("fold", "weight"):
            rules = FOLD_RULES if self.target == "fold" else WEIGHT_RULES
            found = self._first_match(rules, site)
            if isinstance(found, tuple):
                rule, match = found
                action = "folded" if self.target == "fold" else "converted"
                return self._apply(rule, site, match, action, f"{action} by {rule.name}")
            why_not = found or _unfoldable_reason(g, site)
            if self.keep_unfoldable:
                return _kept(site, f"not foldable: {why_not} (kept by {option('keep_unfoldable')})")
            return self._affine(site, why_not)
        if self.target == "affine":
            return self._affine(site, None)
        if self.options.only is not None and site.name not in self.options.only:
            match = AFFINE_RULE.match(site)
            if not isinstance(match, Skip):
                return self._apply(AFFINE_RULE, site, match, "affine", "frozen affine by the agreement-floor plan "
                                   f"(no plan normalizing it as {self.target} norm was shown to keep the floor)")
        rule = {"group": GROUP_RULE, "instance": INSTANCE_RULE}.get(self.target) or (
            LAYER_CHANNELS_RULE if self.options.layer_over == "channels" else LAYER_RULE)
        match = rule.match(site)
        if isinstance(match, Skip):
            return self._affine(site, match.reason, prefix=f"cannot become {self.target} norm")
        return self._apply(rule, site, match, "converted", f"converted by {rule.name}")


def _convert_graph(g: GraphIndex, converter: _SiteConverter) -> None:
    for i in range(len(g.nodes)):
        node = g.nodes[i]
        if i not in g.removed and node.op_type == BN and node.domain in ("", "ai.onnx"):
            converter.out.records.append(converter.convert(g, i))
    for i, node in enumerate(g.nodes):
        if i in g.removed:
            continue
        for k, sub in enumerate(subgraphs_of(node)):
            sub_index = GraphIndex(sub, ir_version=g.ir_version, opset=g.opset, types=g.types, names=g.names,
                                   parent=g, path=f"{g.path}/{site_name(node)}[{k}]")
            _convert_graph(sub_index, converter)
            sub_index.commit()


ShapeProbe = Callable[[list[str], bool], dict[str, tuple[tuple[int, ...], int]]]


def _unresolved_bn_inputs(model: onnx.ModelProto, types: dict, need_sizes: bool) -> list[str]:
    """Main-graph BN inputs whose rank (or, with ``need_sizes``, whose non-batch dims) shape inference did not
    find."""
    names = []
    for node in model.graph.node:
        if node.op_type == BN and node.input:
            vt = types.get(node.input[0])
            if vt is None or vt.dims is None or vt.elem_type == 0 or (
                    need_sizes and not all(isinstance(d, int) and d > 0 for d in vt.dims[1:])):
                names.append(node.input[0])
    return names


def convert_in_place(model: onnx.ModelProto, target: str, keep_unfoldable: bool = False,
                     options: ReplaceOptions = DEFAULT_REPLACE_OPTIONS, shape_probe: ShapeProbe | None = None
                     ) -> Conversion:
    """Rewrite every BatchNormalization of ``model`` (edited in place) for ``target``. ``shape_probe`` runs the
    model once to learn the element type and shape of BN inputs shape inference could not reach (every rule
    needs their rank; replacement targets also need their spatial size to choose groups)."""
    types, note = infer_value_types(model)
    out = Conversion(notes=[note] if note else [])
    names = NameRegistry(model)
    renamed = _unique_node_names(model, names)
    if renamed:
        shown = ", ".join(f"'{a}' -> '{b}'" for a, b in renamed[:5]) + (", ..." if len(renamed) > 5 else "")
        out.notes.append(f"{len(renamed)} node(s) shared a name with another node (onnxruntime refuses that) and "
                         f"were renamed: {shown}")
    root = GraphIndex(model.graph, ir_version=model.ir_version, opset=opset_of(model), types=types, names=names)
    if shape_probe is not None:
        replacing = target in ("group", "layer", "instance")
        unresolved = _unresolved_bn_inputs(model, types, need_sizes=replacing)
        if unresolved:
            seen = shape_probe(unresolved, replacing)
            for name, (shape, elem_type) in seen.items():
                root.observed_shapes[name] = shape
                known = types.get(name)
                if known is None or known.dims is None or known.elem_type == 0:
                    types.set(name, ValueType(elem_type, (None,) + tuple(shape[1:])))
            if not replacing and len(seen) < len(unresolved):
                out.notes.append("the model was not run to learn the rank of BN inputs shape inference could not "
                                 f"reach (no data to run it on); pass {option('input_shapes')} or "
                                 f"{option('inputs')} to let normswap run it")
    _convert_graph(root, _SiteConverter(target, keep_unfoldable, options, out))
    root.commit()
    return out


def _unique_node_names(model: onnx.ModelProto, names: NameRegistry) -> list[tuple[str, str]]:
    """Give every node whose (non-empty) name an earlier node already has a fresh name; returns the renames."""
    from .walk import iter_graphs
    seen: set[str] = set()
    renamed = []
    for _, g in iter_graphs(model.graph):
        for node in g.node:
            if node.name and node.name in seen:
                new = names.fresh(node.name)
                renamed.append((node.name, new))
                node.name = new
            seen.add(node.name)
    return renamed


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
