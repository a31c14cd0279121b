"""The PyTorch conversion driver: one decision per BatchNorm module, applied to a deep copy of the network.

fold / weight need the producer from the dataflow (``dataflow.analyze``); without one (or when tracing fails)
the BN becomes the exact per-channel affine. group / layer / instance follow the same group rules as the ONNX
path, read the spatial size from shapes propagated with example inputs, keep channels and eps, copy gamma and
beta (calibration refits them), and keep the BN's train/eval mode and any extra behaviour (drop, act).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import option
from .._math import allowed_groups, bn_affine, choose_groups, group_choice_note, nonfinite_problem
from ..errors import InvalidModelError, UsageError
from ..report import LayerRecord
from ..targets import ReplaceOptions
from .dataflow import Dataflow, analyze
from .fold import folded, output_axis, weight_normalized
from .modules import ChannelAffine, ChannelLayerNorm, WithExtras, set_submodule
from .sites import TorchSite, find_sites


@dataclass
class NewLayer:
    """A normalization module that replaced a BN in the converted network."""

    record: LayerRecord
    site: TorchSite  # the BN in the ORIGINAL network (its input gives the calibration target)
    module: nn.Module  # the GroupNorm / ChannelLayerNorm inside the converted network
    groups: int | None  # None: LayerNorm over channels
    candidates: tuple[int, ...]
    level: int


def _wrap(site: TorchSite, new: nn.Module) -> nn.Module:
    new.train(site.module.training)
    if not site.extras:
        return new
    return WithExtras(new, {k: copy.deepcopy(getattr(site.module, k)) for k in site.extras}).train(site.module.training)


def _like(site: TorchSite, values) -> torch.Tensor:
    ref = next(iter(site.module.buffers()), None)
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.as_tensor(values, dtype=dtype, device=ref.device if ref is not None else "cpu")


def _overflow(what: str, tensors: list[torch.Tensor | None]) -> str | None:
    """Why storing these float64-computed values in their module's dtype loses them (float16 tops out at
    65504), or None."""
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"{what} would exceed the largest {str(tensor.dtype).replace('torch.', '')}"
    return None


def _weight_norm_overflow(module: nn.Module) -> str | None:
    """Why the weight-norm magnitude ``g = ||v||`` (per output channel) cannot be held in the weight's dtype."""
    w = module.weight.detach()
    axis = output_axis(module)
    dims = [k for k in range(w.ndim) if k != axis]
    g = torch.linalg.vector_norm(w.to(torch.float64), dim=dims)
    return _overflow("the magnitude g", [g.to(w.dtype)])


class TorchConverter:
    def __init__(self, target: str, keep_unfoldable: bool, options: ReplaceOptions) -> None:
        self.target, self.keep_unfoldable, self.options = target, keep_unfoldable, options
        self.records: list[LayerRecord] = []
        self.new_layers: list[NewLayer] = []
        self.unchecked_range = False  # the current BN's parameters are not finite (allowed): no overflow guard

    def _record(self, site: TorchSite, action: str, reason: str, flow: Dataflow, rule: str | None = None,
                groups: int | None = None) -> LayerRecord:
        producer = flow.producers.get(site.name)
        record = LayerRecord(site.name, site.kind, action, reason, site.channels, producer,
                             flow.producer_types.get(site.name), rule, "module", [site.name], groups=groups)
        self.records.append(record)
        return record

    def _affine(self, root: nn.Module, site: TorchSite, flow: Dataflow, why: str) -> None:
        if not site.stats:
            self._record(site, "kept", f"{why}; it has no trained statistics (track_running_stats=False: it "
                         "normalizes with batch statistics even in eval mode), so there is no fixed affine", flow)
            return
        s, t = bn_affine(*site.parameters64(), site.eps)
        scale, shift = _like(site, s), _like(site, t)
        overflow = self._overflow("its scale or shift", [scale, shift])
        if overflow:
            self._record(site, "kept", f"{why}; cannot become affine: {overflow}", flow)
            return
        set_submodule(root, site.name, _wrap(site, ChannelAffine(scale, shift)))
        self._record(site, "affine", why, flow, "affine")

    def convert(self, root: nn.Module, original_sites: dict[str, TorchSite], flow: Dataflow,
                shapes: dict[str, tuple[int, ...]]) -> None:
        for name in flow.order + [s for s in original_sites if s not in flow.order]:
            site = original_sites[name]
            self.unchecked_range = bool(site.stats and self._check_finite(site))
            if site.problem:
                self._record(site, "kept", site.problem, flow)
            elif self.target in ("fold", "weight", "affine"):
                self._exact(root, site, flow)
            else:
                self._replace(root, site, flow, shapes.get(name))

    def _overflow(self, what: str, tensors: list[torch.Tensor | None]) -> str | None:
        return None if self.unchecked_range else _overflow(what, tensors)

    def _check_finite(self, site: TorchSite) -> bool:
        """Whether the BN's parameters are not finite (allowed by allow_nonfinite; else refused here)."""
        problem = nonfinite_problem(list(site.parameters64()), site.eps)
        if problem and not self.options.allow_nonfinite:
            raise InvalidModelError(f"BatchNorm '{site.name}' has {problem}; fix the module, or pass "
                                    f"{option('allow_nonfinite', True)} to rewrite it anyway")
        return problem is not None

    def _exact(self, root: nn.Module, site: TorchSite, flow: Dataflow) -> None:
        if self.target == "affine":
            return self._affine(root, site, flow, "requested")
        producer_name = flow.producers.get(site.name)
        why = flow.problem or flow.why_not.get(site.name, "no producer found")
        if producer_name is None or not site.stats:
            why = why if producer_name is None else "it has no trained statistics"
            if self.keep_unfoldable:
                self._record(site, "kept", f"not foldable: {why} (kept by keep_unfoldable)", flow)
                return
            return self._affine(root, site, flow, f"not foldable: {why}")
        s, t = bn_affine(*site.parameters64(), site.eps)
        new = folded(root.get_submodule(producer_name), s, t)
        overflow = self._overflow(f"folded, the weight or bias of '{producer_name}'",
                             [new.weight, new.bias])
        if overflow:
            return self._affine(root, site, flow, f"not foldable: {overflow}")
        rule = "fold_module"
        if self.target == "weight":
            too_large = None if self.unchecked_range else _weight_norm_overflow(new)
            if too_large is None:
                new, rule = weight_normalized(new), "weight_fold_module"
        set_submodule(root, producer_name, new)
        set_submodule(root, site.name, _wrap(site, nn.Identity()))
        action = "folded" if self.target == "fold" else "converted"
        how = {"weight_fold_module": " (weight = g * v / ||v||)", "fold_module": ""}[rule]
        if self.target == "weight" and rule == "fold_module":
            how = f" (weight norm not applied: {too_large})"
        self._record(site, action, f"{action} into '{producer_name}'{how}", flow, rule)

    def _replace(self, root: nn.Module, site: TorchSite, flow: Dataflow, shape: tuple[int, ...] | None) -> None:
        opts, kind = self.options, self.target
        if shape is None:
            return self._affine(root, site, flow, f"cannot become {kind} norm: its input shape is unknown "
                                "(it never ran on the example inputs)")
        rank, spatial = len(shape), math.prod(shape[2:])
        gamma, beta = site.affine64()
        candidates: tuple[int, ...] = ()
        if kind == "layer" and opts.layer_over == "channels":
            if site.channels < opts.min_group_elements:
                return self._affine(root, site, flow, f"cannot become layer norm: only {site.channels} channels")
            new, groups, how = ChannelLayerNorm(site.channels, site.eps), None, "over channels at each position"
        else:
            if kind == "instance" and rank < 3:
                return self._affine(root, site, flow, "cannot become instance norm: its input has no spatial "
                                    "dims, so there is nothing to normalize each channel over")
            target = {"layer": 1, "instance": site.channels}.get(kind)
            if kind == "group" and opts.group_size is not None:
                groups, how = choose_groups(site.channels, spatial, group_size=opts.group_size,
                                            min_elements=opts.min_group_elements)
            else:
                groups, how = choose_groups(site.channels, spatial, groups=target or opts.groups,
                                            min_elements=opts.min_group_elements,
                                            say_asked=not (opts.groups_by_fit and kind == "group"))
            if groups is None or (kind == "instance" and groups != site.channels):
                why = how if groups is None else f"each channel holds only {spatial} values per sample"
                return self._affine(root, site, flow, f"cannot become {kind} norm: {why}")
            if kind == "group":
                how += group_choice_note(groups, site.channels, opts.groups_by_fit and opts.group_size is None,
                                         opts.groups)
                candidates = tuple(allowed_groups(site.channels, spatial, opts.groups if opts.group_size is None
                                                  else groups, opts.min_group_elements))
            new = nn.GroupNorm(groups, site.channels, eps=site.eps, affine=True)
        ref = next(iter(site.module.buffers()), None)
        if ref is not None and ref.is_floating_point():
            new = new.to(ref.device, ref.dtype)
        with torch.no_grad():
            new.weight.copy_(_like(site, gamma))
            new.bias.copy_(_like(site, beta))
        set_submodule(root, site.name, _wrap(site, new))
        record = self._record(site, "converted", f"converted by to_{kind}norm: {how}", flow,
                              f"to_{kind}norm", groups)
        self.new_layers.append(NewLayer(record, site, new, groups, candidates, flow.levels.get(site.name, 1)))


def input_shapes(module: nn.Module, sites: list[TorchSite], example: tuple) -> dict[str, tuple[int, ...]]:
    """Shapes of every BN's input on the example, by forward hooks (works whether or not fx can trace)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:  # returning None keeps the arguments
            shapes.setdefault(name, tuple(args[0].shape))
        return record
    handles = [s.module.register_forward_pre_hook(hook(s.name)) for s in sites]
    training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(*example)
    except Exception as e:
        raise UsageError(f"the module failed on the example inputs ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass inputs the module accepts") from None
    finally:
        module.train(training)
        for h in handles:
            h.remove()
    return shapes


def convert_module(module: nn.Module, target: str, options: ReplaceOptions, keep_unfoldable: bool,
                   example: tuple | None) -> tuple[nn.Module, TorchConverter, Dataflow, list[TorchSite]]:
    """Convert a deep copy of ``module``; the input module, its parameters and buffers are never touched."""
    sites = find_sites(module)
    shapes = input_shapes(module, sites, example) if example is not None else {}
    if target in ("group", "layer", "instance") and example is None:
        raise UsageError(f"{option('to', target)} needs {option('example_inputs')} or {option('calibration')} data "
                         "to see each BN's input shape")
    converted = copy.deepcopy(module)
    flow = analyze(converted, find_sites(converted), example)
    converter = TorchConverter(target, keep_unfoldable, options)
    converter.convert(converted, {s.name: s for s in sites}, flow, shapes)
    return converted, converter, flow, sites
