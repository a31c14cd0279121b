"""Pairing each BatchNorm with the module that produces its input -- from the dataflow, never module order.

The network is traced (``tracing.trace``: torch.fx, with defaulted arguments bound, else with the example's
values fixed where Python control flow needs them) with every normalization module kept as a leaf. A BN's
producer is the Conv / ConvTranspose / Linear call whose output feeds it, provided that output has no other
user, the producer module is called once, and the BN module is called once; a subclass that computes its own
forward ('same' padding, weight standardization) only when a scaled copy is checked to scale its output. With
example inputs, shapes are
propagated so a Linear is paired only when its output is 2-D (the BN's channel axis is its feature axis).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .fold import folded, output_axis
from .sites import TorchSite
from .tracing import PRODUCERS, trace



@dataclass
class Dataflow:
    traced: bool
    problem: str | None = None
    source: str = "torch.fx"  # which tracer produced the graph ("none": module order)
    producers: dict[str, str] = field(default_factory=dict)  # site name -> producer module name
    producer_types: dict[str, str] = field(default_factory=dict)  # site name -> producer module class
    why_not: dict[str, str] = field(default_factory=dict)  # site name -> why it has no foldable producer
    order: list[str] = field(default_factory=list)  # site names in execution order
    levels: dict[str, int] = field(default_factory=dict)  # 1 + deepest site upstream
    head: str | None = None  # a Linear whose output is the model's output


def _shapes(gm: fx.GraphModule, example: tuple) -> None:
    from torch.fx.passes.shape_prop import ShapeProp
    ShapeProp(gm).propagate(*example)


def analyze(module: nn.Module, sites: list[TorchSite], example: tuple | None) -> Dataflow:
    names = {s.name for s in sites}
    traced = trace(module, names, example)
    problem = traced.problem
    if traced.ok:
        gm = traced.graph_module
        graph = gm.graph
        if example is not None:
            try:
                _shapes(gm, example)
            except Exception as e:  # an op shape propagation cannot run
                problem = f"shapes could not be propagated through the traced model ({str(e)[:200]})"
    if problem is not None:
        return Dataflow(False, problem, "none", order=[s.name for s in sites],
                        levels={s.name: k + 1 for k, s in enumerate(sites)})
    flow = Dataflow(True, source=traced.source)
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


def _own_forward(layer: nn.Module) -> bool:
    """A subclass of a torch.nn convolution / linear layer that replaces how the output is computed (weight
    standardization, 'same' padding...): its weight may not enter its output linearly."""
    base = next(c for c in type(layer).__mro__ if c.__module__.startswith("torch.nn."))
    return any(getattr(type(layer), f, None) is not getattr(base, f, None) for f in ("forward", "_conv_forward"))


def _folds_exactly(layer: nn.Module, call: fx.Node) -> bool:
    """Whether ``layer`` with its weight scaled by s per output channel and bias s*b + t computes s*layer(x) + t,
    on one random sample of the shape its call received (a 'same'-padding conv does; a weight-standardized one
    does not). Needs the shapes of example inputs."""
    arg = call.args[0] if call.args else None
    meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
    if meta is None or not meta.dtype.is_floating_point:
        return False
    g = torch.Generator().manual_seed(0)
    channels = layer.weight.shape[output_axis(layer)] * (layer.groups if output_axis(layer) == 1 else 1)
    s = (torch.rand(channels, generator=g, dtype=torch.float64) + 0.5).numpy()
    t = torch.randn(channels, generator=g, dtype=torch.float64).numpy()
    x = torch.randn((1,) + tuple(meta.shape[1:]), generator=g).to(layer.weight.device, meta.dtype)
    training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            y, y2 = layer(x).double(), folded(layer, s, t)(x).double()
    except Exception:
        return False
    finally:
        layer.train(training)
    view = (1, -1) + (1,) * (y.dim() - 2) if not isinstance(layer, nn.Linear) else (1,) * (y.dim() - 1) + (-1,)
    want = y * torch.from_numpy(s).view(view) + torch.from_numpy(t).view(view)
    return bool(torch.allclose(y2, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()) + 1e-6))


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
    if _own_forward(producer) and not _folds_exactly(producer, src):
        return None, (f"its producer {type(producer).__name__} '{src.target}' computes its own forward, and scaling "
                      "its weight and bias does not scale its output (checked on a random input of its shape)")
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
