"""Pairing each BatchNorm with the module that produces its input -- from the dataflow, never module order.

``torch.fx`` traces the network with every normalization module (and the usual layers) kept as leaves. A BN's
producer is the Conv / ConvTranspose / Linear call whose output feeds it, provided that output has no other
user, the producer module is called once, and the BN module is called once. With example inputs, shapes are
propagated so a Linear is paired only when its output is 2-D (the BN's channel axis is its feature axis).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

from .sites import TorchSite

PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
             nn.Linear)


@dataclass
class Dataflow:
    traced: bool
    problem: str | None = None
    producers: dict[str, str] = field(default_factory=dict)  # site name -> producer module name
    producer_types: dict[str, str] = field(default_factory=dict)  # site name -> producer module class
    why_not: dict[str, str] = field(default_factory=dict)  # site name -> why it has no foldable producer
    order: list[str] = field(default_factory=list)  # site names in execution order
    levels: dict[str, int] = field(default_factory=dict)  # 1 + deepest site upstream
    head: str | None = None  # a Linear whose output is the model's output


class LeafTracer(fx.Tracer):
    """torch.fx tracing that keeps the named modules as calls (leaves)."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)


def _shapes(gm: fx.GraphModule, example: tuple) -> None:
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(*example)


def analyze(module: nn.Module, sites: list[TorchSite], example: tuple | None) -> Dataflow:
    names = {s.name for s in sites}
    try:
        graph = LeafTracer(names).trace(module)
        gm = fx.GraphModule(module, graph)
        if example is not None:
            _shapes(gm, example)
    except Exception as e:  # data-dependent control flow, unsupported ops...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return Dataflow(False, f"torch.fx could not trace the model ({first[:200]})",
                        order=[s.name for s in sites], levels={s.name: k + 1 for k, s in enumerate(sites)})
    flow = Dataflow(True)
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    level: dict[fx.Node, int] = {}
    for node in graph.nodes:
        base = max((level.get(a, 0) for a in node.all_input_nodes), default=0)
        level[node] = base
        if node.op != "call_module" or node.target not in names:
            continue
        level[node] = base + 1
        if node.target not in flow.levels:
            flow.order.append(node.target)
            flow.levels[node.target] = base + 1
        flow.why_not.pop(node.target, None)
        producer, reason = _pair(module, node, calls)
        if producer is None:
            flow.why_not[node.target] = reason
        else:
            flow.producers[node.target] = producer
            flow.producer_types[node.target] = type(module.get_submodule(producer)).__name__
    for s in sites:  # never called in forward
        if s.name not in flow.levels:
            flow.why_not[s.name] = "it is never called by forward"
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    if isinstance(out, fx.Node) and out.op == "call_module" and isinstance(module.get_submodule(out.target),
                                                                           nn.Linear):
        flow.head = out.target
    return flow


def _pair(module: nn.Module, node: fx.Node, calls: dict[str, int]) -> tuple[str | None, str | None]:
    """(the producer's module name, None) or (None, why there is no foldable producer)."""
    if calls.get(node.target, 0) > 1:
        return None, "the BN module is called more than once"
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return None, "its input is not a traced value"
    if src.op != "call_module":
        what = src.target if src.op == "call_function" else src.op
        return None, (f"its input is produced by {getattr(what, '__name__', what)}, which cannot absorb a "
                      "per-channel scale")
    producer = module.get_submodule(src.target)
    if not isinstance(producer, PRODUCERS):
        return None, f"its input is produced by {type(producer).__name__} '{src.target}', which cannot absorb a scale"
    if len(src.users) != 1:
        return None, f"the output of '{src.target}' also feeds {len(src.users) - 1} other consumer(s)"
    if calls.get(src.target, 0) > 1:
        return None, f"'{src.target}' is called more than once (a shared module)"
    if isinstance(producer, nn.Linear):
        meta = src.meta.get("tensor_meta")
        if meta is None:
            return None, "the Linear's output rank is unknown (pass example inputs)"
        if len(meta.shape) != 2:
            return None, (f"the Linear's output is {len(meta.shape)}-D, so the BN's channel axis is not its "
                          "feature axis")
    return src.target, None
