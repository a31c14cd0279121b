"""The module's dataflow as a torch.fx graph, for modules plain symbolic tracing cannot follow.

Three tracers, tried in order; the first that succeeds names the result's ``source``:

1. ``torch.fx``: symbolic tracing with the given leaves. Parameters of ``forward`` that callers leave at their
   defaults (``forward(x, embed=False)``, then ``if embed:``) are bound to those defaults as constants, so Python
   control flow on them is resolved at trace time (fx's ``concrete_args``; the graph asserts the value).
2. ``torch.fx with the example's values``: the same tracing with the example run alongside. Every node's value
   is computed as it is recorded, so where Python needs a real value -- ``if H == ws``, ``math.ceil(H / p)``,
   ``range(n)``, ``x.device.type`` -- the example's value is used and fixed into the graph (each one counted).
   Only Python values (shapes, sizes, devices) are fixed: control flow on a tensor's contents ends the trace.
   Shapes stay symbolic where only tensor ops read them. Modules that cache values in forward get their plain
   attributes back after tracing. The graph is then checked against the module on the example and on a batch
   of a different size: a graph whose fixed values depend on the batch is refused. Such a graph holds for
   inputs of the example's non-batch shape, which is what calibration feeds it (it checks).
3. ``torch.export``: its aten graph with the leaves' calls collapsed back into call_module nodes
   (``export_graph``), checked the same way; shapes other than the batch dimension are the example's.
4. None: the caller falls back (module order for pairing, level-by-level passes for calibration) and says why.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
             nn.Linear)
STATIC = (str, torch.device, torch.dtype, torch.layout, torch.memory_format)  # never differ between batches
# While fx traces, it patches nn.Module.__call__ / __getattr__ and wrapped functions; the example's values are
# computed with those patches lifted (torch 2.13; without the helper the value tracer fails and says so).
_UNPATCHED = getattr(fx._symbolic_trace, "_maybe_revert_all_patches", contextlib.nullcontext)


@dataclass
class Traced:
    graph_module: fx.GraphModule | None
    source: str  # "torch.fx", "torch.fx (defaults bound: ...)", "torch.fx with the example's values (...)",
    # "torch.export", or "none"
    problem: str | None = None  # why no tracer could follow the module
    fixed: list[str] = field(default_factory=list)  # values the example fixed into the graph

    @property
    def ok(self) -> bool:
        return self.graph_module is not None


class LeafTracer(fx.Tracer):
    """torch.fx tracing that keeps the named modules and every convolution / linear layer (subclasses too, such
    as a 'same'-padding Conv2d) as calls (leaves)."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or isinstance(m, PRODUCERS) or super().is_leaf_module(m, qualname)


def defaulted(module: nn.Module, given: int | None) -> dict[str, Any]:
    """The parameters of ``module.forward`` a caller passing ``given`` positional inputs leaves at their defaults
    (``given=None``: every parameter that has a default)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    bound = {}
    for k, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        if given is None or k >= given:
            bound[p.name] = p.default
    return bound


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


@contextlib.contextmanager
def _state_kept(module: nn.Module):
    """Restore every submodule's plain attributes after tracing: a module that caches a value in forward
    (timm's attention-bias cache) would otherwise keep a proxy there. Containers are copied one level deep;
    parameters, buffers and submodules are not touched."""
    skip = {"_parameters", "_buffers", "_modules"}
    saved = [(m, {k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
                  for k, v in vars(m).items() if k not in skip}) for m in module.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for k in [k for k in vars(m) if k not in skip and k not in attrs]:
                delattr(m, k)
            vars(m).update(attrs)


def _graph_module(module: nn.Module, tracer: fx.Tracer, bound: dict[str, Any]) -> fx.GraphModule:
    with _state_kept(module):
        return fx.GraphModule(module, tracer.trace(module, concrete_args=bound or None))


def trace(module: nn.Module, leaves: set[str], example: tuple | None = None) -> Traced:
    """``module``'s graph with ``leaves`` kept as calls, by the first tracer that can follow it."""
    bound = defaulted(module, len(example) if example is not None else None)
    try:
        gm = _graph_module(module, LeafTracer(leaves), bound)
        names = ", ".join(f"{k}={v!r}" for k, v in bound.items())
        return Traced(gm, f"torch.fx (defaults bound: {names})" if bound else "torch.fx")
    except Exception as e:  # data-dependent control flow, unsupported ops...
        symbolic = _first_line(e)
    if example is None:
        return Traced(None, "none", f"torch.fx could not trace the model ({symbolic}); pass example inputs to "
                                    "trace it with their values")
    tracer = ValueTracer(leaves, example, bound)
    training = module.training
    module.eval()  # the example runs through the real layers: BN statistics must not move
    try:
        try:
            with torch.no_grad():
                gm = _graph_module(module, tracer, bound)
                _check(module, gm, example)
            return Traced(gm, f"torch.fx with the example's values ({len(tracer.fixed)} fixed)",
                          fixed=tracer.fixed)
        except Exception as e:
            valued = _first_line(e)
        try:
            gm = _exported(module, leaves, example)
            return Traced(gm, "torch.export", fixed=["the example's non-batch shape"])
        except Exception as e:
            return Traced(None, "none", f"torch.fx could not trace the model ({symbolic}), nor with the example's "
                                        f"values ({valued}), nor torch.export ({_first_line(e)})")
    finally:
        module.train(training)


def _exported(module: nn.Module, leaves: set[str], example: tuple) -> fx.GraphModule:
    from .export_graph import exported
    from .validate import _quiet_exporter
    layers = {name for name, m in module.named_modules() if isinstance(m, PRODUCERS)}
    with _quiet_exporter(), _state_kept(module):
        gm = exported(module, leaves | layers, example)
    with torch.no_grad():
        _check(module, gm, example)
    return gm


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _check(module: nn.Module, gm: fx.GraphModule, example: tuple) -> None:
    """The traced graph must reproduce the module on the example and on a batch of another size."""
    batched = any(isinstance(a, torch.Tensor) and a.dim() > 0 for a in example)
    other = tuple(torch.cat([a, a[:1]]) if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in example)
    for args in (example, other) if batched else (example,):
        if not _same(gm(*args), module(*args)):
            size = next((len(a) for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), 1)
            raise ValueError(f"the traced graph does not reproduce the module on a batch of {size}")


class _ValueProxy(fx.Proxy):
    """A proxy that hands Python the example's value wherever Python needs a real one."""

    def __getattr__(self, k: str):
        value = getattr(self.tracer.value(self), k, None)
        if isinstance(value, STATIC):
            return value
        return _ValueAttribute(self, k)

    def __len__(self) -> int:
        return self.tracer.fix(self, len)

    def __index__(self) -> int:
        return self.tracer.fix(self, operator.index)

    def __int__(self) -> int:
        return self.tracer.fix(self, int)

    def __float__(self) -> float:
        return self.tracer.fix(self, float)

    def __ceil__(self) -> int:
        return self.tracer.fix(self, math.ceil)

    def __floor__(self) -> int:
        return self.tracer.fix(self, math.floor)

    def __trunc__(self) -> int:
        return self.tracer.fix(self, math.trunc)


class _ValueAttribute(fx.proxy.Attribute, _ValueProxy):
    pass


def _run(kind: str, target, args, kwargs, root: nn.Module):
    if kind == "get_attr":
        obj = root
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj
    if kind == "call_module":
        return root.get_submodule(target)(*args, **kwargs)
    if kind == "call_function":
        return target(*args, **kwargs)
    if kind == "call_method":
        return getattr(args[0], target)(*args[1:], **kwargs)
    raise ValueError(kind)


class ValueTracer(LeafTracer):
    """``LeafTracer`` that computes each node's value on the example as the node is recorded."""

    def __init__(self, leaves: set[str], example: tuple, bound: dict[str, Any]) -> None:
        super().__init__(leaves)
        self.example, self.bound = list(example), bound
        self.values: dict[fx.Node, Any] = {}
        self.fixed: list[str] = []
        self._placeholders = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":
            k, self._placeholders = self._placeholders, self._placeholders + 1
            self.values[node] = (self.example[k] if k < len(self.example)
                                 else self.bound.get(str(target).removesuffix("_1"), args[0] if args else None))
        elif kind != "output":
            real_args = fx.node.map_arg(args, self.values.__getitem__)
            real_kwargs = fx.node.map_arg(kwargs, self.values.__getitem__)
            with _UNPATCHED():
                self.values[node] = _run(kind, target, real_args, real_kwargs, self.root)
        return node

    def value(self, proxy: fx.Proxy):
        return self.values[proxy.node]

    def fix(self, proxy: fx.Proxy, how) -> Any:
        """The example's value where Python needs one -- only a shape, size, device or other Python value:
        control flow on a tensor's contents would hold for this example alone, so it ends the trace."""
        real = self.value(proxy)
        if isinstance(real, torch.Tensor):
            raise fx.proxy.TraceError(f"Python control flow depends on the values of tensor '{proxy.node.name}'")
        value = how(real)
        self.fixed.append(f"{proxy.node.name}={value!r}")
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self.fix(obj, bool)

    def iter(self, obj: fx.Proxy):
        return (obj[i] for i in range(self.fix(obj, len)))

    def keys(self, obj: fx.Proxy):
        return self.fix(obj, lambda v: list(v.keys()))
