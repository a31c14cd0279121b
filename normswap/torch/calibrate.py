"""Calibration and distillation of a converted torch module: it keeps what the original learned.

Same method as the ONNX path (``normswap.onnx.calibrate``): for each new layer, the closed-form per-channel
least squares ``y ~ a * z + b`` between its normalized input ``z`` (computed in float64 from the input the
converted network actually gives it) and the original BN's output ``y`` (the BN's inference formula applied, in
float64, to the input the ORIGINAL network gives it); levels in dataflow order, one pass over the data each,
every upstream layer already fitted; the group count chosen by fit; then the output Linear refitted in closed
form. ``distill_steps`` then trains only the new layers' scale and shift with Adam to match the original outputs
(mean squared error) on the same unlabeled data.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch import fx

from .._math import AffineFit, CandidateSums, LinearRefit, fit_choice_note, solve_candidates
from ..calibration_checks import InputScale, input_scale, range_note, sample_note
from ..activation_store import DEFAULT_MEMORY_BUDGET, ActivationStore, peak_rss
from ..report import CalibrationReport
from .convert import NewLayer
from .data import Batches
from .segments import SegmentRunner, moments, plan
from .sites import TorchSite
from .tracing import trace

Progress = Callable[[int, int, str], None]
HEAD_RIDGE = 1e-3


def bn_reference(site: TorchSite, x: torch.Tensor, dtype: torch.dtype = torch.float64, with_beta: bool = True
                 ) -> torch.Tensor:
    """What the original BN outputs for ``x`` in eval mode, in ``dtype`` (before any extra drop / act).
    ``with_beta=False`` leaves out the BN's beta (calibration's y centre): without that offset the variation of a
    near-constant channel is not lost to float32 rounding."""
    m, xd = site.module, x.detach().to(dtype)
    w = m.weight.detach().to(dtype) if getattr(m, "weight", None) is not None else None
    b = m.bias.detach().to(dtype) if with_beta and getattr(m, "bias", None) is not None else None
    if not site.stats:
        return F.batch_norm(xd, None, None, w, b, True, 0.0, site.eps)
    return F.batch_norm(xd, m.running_mean.to(dtype), m.running_var.to(dtype), w, b, False, 0.0, site.eps)


def normalized(layer: NewLayer, groups: int | None, x: torch.Tensor) -> torch.Tensor:
    x64 = x.detach().double()
    if groups is None:
        return F.layer_norm(x64.movedim(1, -1), (x64.shape[1],), eps=layer.site.eps).movedim(-1, 1)
    return F.group_norm(x64, groups, eps=layer.site.eps)


@contextlib.contextmanager
def _capturing(pairs: list[tuple[nn.Module, str]]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the first input of each module under its key while the block runs."""
    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, k=k: seen.__setitem__(k, args[0])) for m, k in pairs]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _eval(*modules: nn.Module) -> Iterator[None]:
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def _output(result) -> torch.Tensor:
    return result if isinstance(result, torch.Tensor) else result[0]


def module_device(module: nn.Module) -> torch.device:
    """Where the module's parameters are (CPU for a module without any): calibration runs there."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _centres(layer: NewLayer, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x centre, y centre): the BN's running mean and beta, where it has them (``bn_reference`` without beta
    gives the target already centred)."""
    m, c = layer.site.module, layer.site.channels
    mean = m.running_mean if layer.site.stats and getattr(m, "running_mean", None) is not None else None
    beta = getattr(m, "bias", None)
    as32 = lambda t: (t.detach().float().to(device) if t is not None else torch.zeros(c, device=device))  # noqa: E731
    return as32(mean), as32(beta)


def _first_node(value):
    if isinstance(value, fx.Node):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in map(_first_node, value) if v is not None), None)
    return None


def calibrate(original: nn.Module, converted: nn.Module, layers: list[NewLayer], data: Batches, *,
              head: str | None, choose_groups: bool = True, memory_budget: int = DEFAULT_MEMORY_BUDGET,
              progress: Progress | None = None) -> CalibrationReport:
    """Fit every new layer (module parameters edited in place). Both modules are traced (``tracing``: torch.fx,
    else with the first batch's values) and run segment by segment (``segments``): every node once per sample,
    on the module's device. A module no tracer follows, one that calls a BN more than once, or one whose trace
    fixed shape values the batches do not share, is fitted level by level instead (one pass of both modules per
    level), with a note saying why."""
    names = {layer.site.name for layer in layers}
    example = data.first()
    with _eval(original, converted):
        ogm, cgm = trace(original, names, example), trace(converted, names, example)
    why = None
    if not (ogm.ok and cgm.ok):
        why = "no tracer could follow the module"
    elif not (_called_once(ogm.graph_module, names) and _called_once(cgm.graph_module, names)):
        why = "a BN module is called more than once"
    elif (ogm.fixed or cgm.fixed) and not _same_shapes(data, example):
        why = ("its trace fixed values of the first batch's shape and the batches differ in shape beyond the "
               "batch dimension")
    if why is None:
        return _calibrate_in_segments(original, converted, ogm.graph_module, cgm.graph_module, layers, data,
                                      head=head, choose_groups=choose_groups, memory_budget=memory_budget,
                                      progress=progress)
    report = _calibrate_by_levels(original, converted, layers, data, head=head, choose_groups=choose_groups,
                                  progress=progress)
    report.notes.append(f"calibrated level by level ({report.passes} passes of each model): {why}")
    return report


def _same_shapes(data: Batches, example: tuple) -> bool:
    """Every batch's tensors have the example's shape beyond the batch dimension."""
    def tail(batch) -> list:
        return [tuple(a.shape[1:]) if isinstance(a, torch.Tensor) else None for a in batch]
    want = tail(example)
    return all(tail(batch) == want for batch in data)


def _called_once(gm: fx.GraphModule, names: set[str]) -> bool:
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in names]
    return len(calls) == len(set(calls)) == len(names)


def _record_scale(layer: NewLayer, targets: AffineFit, scales: list[InputScale]) -> None:
    """Add the BN's standardized input on the data (from the target sums of ``targets``) to ``scales``; refuses
    sums that are not finite (``calibration_checks.input_scale``)."""
    gamma, beta = layer.site.affine64()
    scale = input_scale(layer.site.name, targets, gamma, beta)
    if scale is not None:
        scales.append(scale)


def _apply_fit(layer: NewLayer, fits: dict) -> None:
    chosen, a, b, sse = solve_candidates(fits)
    if chosen != layer.groups:
        layer.module.num_groups = layer.groups = layer.record.groups = chosen
        layer.record.reason += fit_choice_note(chosen, sse)
    weight, bias = layer.module.weight, layer.module.bias
    weight.copy_(torch.as_tensor(a, dtype=weight.dtype, device=weight.device))
    bias.copy_(torch.as_tensor(b, dtype=bias.dtype, device=bias.device))
    layer.record.calibrated = True


def _add_data_notes(report: CalibrationReport, samples: int, scales: list[InputScale]) -> None:
    """What the data's size and the BNs' standardized inputs say (``calibration_checks``)."""
    report.notes.extend(note for note in (samples and sample_note(samples), range_note(scales)) if note)


def _calibrate_in_segments(original: nn.Module, converted: nn.Module, ogm: fx.GraphModule, cgm: fx.GraphModule,
                           layers: list[NewLayer], data: Batches, *, head: str | None, choose_groups: bool,
                           memory_budget: int, progress: Progress | None) -> CalibrationReport:
    start = time.perf_counter()
    device = module_device(converted)
    batches = list(data)
    samples = sum(len(b[0]) for b in batches)
    report = CalibrationReport(samples, data.batch_size, 1, 0.0, "all" if head else "norms")
    if data.note:
        report.notes.append(data.note)
    names = {layer.site.name for layer in layers}
    scales: list[InputScale] = []
    head_node = next((n for n in cgm.graph.nodes if n.op == "call_module" and n.target == head), None)
    out_node = _first_node(next(n for n in ogm.graph.nodes if n.op == "output").args[0])
    if head_node is None or out_node is None:
        head = None
    cplan = plan(cgm, names, True, [head_node.args[0]] if head else [])
    oplan = plan(ogm, names, False, [out_node] if head else [], len(cplan.segments))
    count = max(len(cplan.segments), len(oplan.segments))
    with tempfile.TemporaryDirectory(prefix="normswap-calib-") as workdir:
        store = ActivationStore(memory_budget, workdir, lambda t: t.detach().cpu().numpy(),
                                lambda a: torch.from_numpy(a).to(device))
        ref, cand = SegmentRunner(ogm, oplan, "r", store), SegmentRunner(cgm, cplan, "c", store)
        total, done = count * len(batches), 0
        with _eval(original, converted), torch.no_grad():
            for s in range(count):
                here = []
                for layer in layers:
                    if cplan.fit_after(layer.site.name) == s:
                        xc, yc = _centres(layer, device)
                        cands = layer.candidates if choose_groups and len(layer.candidates) > 1 else (layer.groups,)
                        here.append((layer, xc, yc, CandidateSums(layer, cands, yc.double().cpu().numpy(),
                                                                  xc.double().cpu().numpy(),
                                                                  layer.site.channels, layer.site.eps)))
                for b, args in enumerate(batches):
                    renv = ref.run(s, b, args)
                    cenv = cand.run(s, b, args)
                    for layer, xc, yc, sums in here:
                        name = layer.site.name
                        x_orig = _lookup(renv, ref, oplan.sites[name].args[0], b)
                        x_conv = _lookup(cenv, cand, cplan.sites[name].args[0], b)
                        positions, got = moments(x_conv, bn_reference(layer.site, x_orig, torch.float32, False), xc,
                                                 None in sums.candidates, layer.site.eps)
                        sums.add(len(x_conv), positions, got)
                    done += 1
                    if progress:
                        rate = samples * done / total / max(time.perf_counter() - start, 1e-9)
                        progress(done, total, f"calibrating: segment {s + 1}/{count}, {rate:,.0f} samples/s")
                ref.release(s, len(batches))
                cand.release(s, len(batches))
                for layer, _, _, sums in here:
                    _record_scale(layer, sums.target_fit(), scales)
                    _apply_fit(layer, sums.fits())
                    report.layers_changed.append(layer.record.name)
            _add_data_notes(report, samples, scales)
            if head is not None:
                pairs = ((cand.get(head_node.args[0], b), _output(ref.get(out_node, b)))
                         for b in range(len(batches)))
                note = _refit_head_from(converted, head, pairs)
                report.notes.append(note)
                if note.startswith("refitted"):
                    report.head = head
                    report.layers_changed.append(head)
        report.segments = count
        report.memory_budget = memory_budget
        report.peak_activation_bytes = store.peak_memory
        report.spilled_bytes = store.peak_disk
        where = store.where()
        report.activations = where.replace("memory", f"{device.type} memory", 1) if device.type != "cpu" else where
    report.peak_rss_bytes = peak_rss()
    report.seconds = time.perf_counter() - start
    return report


def _lookup(env: dict, runner: SegmentRunner, node: fx.Node, batch: int):
    return env[node] if node in env else runner.get(node, batch)


def _calibrate_by_levels(original: nn.Module, converted: nn.Module, layers: list[NewLayer], data: Batches, *,
                         head: str | None, choose_groups: bool = True, progress: Progress | None = None
                         ) -> CalibrationReport:
    start = time.perf_counter()
    batches = data.count()
    levels = sorted({layer.level for layer in layers})
    order = {layer.site.name: k for k, layer in enumerate(layers)}  # model order, for the data notes
    total = (len(levels) + (head is not None)) * batches
    report = CalibrationReport(data.samples(), data.batch_size, 0, 0.0, "all" if head else "norms")
    if data.note:
        report.notes.append(data.note)
    done = 0
    scales: list[InputScale] = []
    with _eval(original, converted), torch.no_grad():
        for level in levels:
            group = [layer for layer in layers if layer.level == level]
            fits = {id(g): {c: AffineFit(g.site.channels) for c in ((g.candidates if choose_groups and
                                                                     len(g.candidates) > 1 else (g.groups,)))}
                    for g in group}
            for batch in data:
                with _capturing([(g.site.module, str(id(g))) for g in group]) as orig_in:
                    original(*batch)
                with _capturing([(g.module, str(id(g))) for g in group]) as cand_in:
                    converted(*batch)
                for g in group:
                    y = bn_reference(g.site, orig_in[str(id(g))]).cpu().numpy()
                    for c, fit in fits[id(g)].items():
                        fit.add(normalized(g, c, cand_in[str(id(g))]).cpu().numpy(), y)
                done += 1
                if progress:
                    progress(done, total, f"calibrating level {level}/{len(levels)}")
            for g in group:
                _record_scale(g, next(iter(fits[id(g)].values())), scales)
                _apply_fit(g, fits[id(g)])
                report.layers_changed.append(g.record.name)
            report.passes += 1
        _add_data_notes(report, report.samples, sorted(scales, key=lambda sc: order[sc.layer]))
        if head is not None:
            def tick() -> None:
                nonlocal done
                done += 1
                if progress:
                    progress(done, total, "refitting the output layer")
            note = _refit_head(original, converted, head, data, tick)
            report.passes += 1
            report.notes.append(note)
            if note.startswith("refitted"):
                report.head = head
                report.layers_changed.append(head)
    report.seconds = time.perf_counter() - start
    return report


def _refit_head(original: nn.Module, converted: nn.Module, head: str, data: Batches, tick) -> str:
    """Ridge least squares of the output Linear on the converted features against the original outputs."""
    linear = converted.get_submodule(head)

    def pairs():
        for batch in data:
            with _capturing([(linear, "h")]) as seen:
                converted(*batch)
            yield seen["h"], _output(original(*batch))
            tick()
    return _refit_head_from(converted, head, pairs())


def _refit_head_from(converted: nn.Module, head: str, pairs) -> str:
    """Refit the output Linear ``head`` from (its input, the original output) batches."""
    linear = converted.get_submodule(head)
    fit = LinearRefit(bias=True)
    for h, o in pairs:
        h, o = h.detach().double().cpu().numpy(), o.detach().double().cpu().numpy()
        if h.ndim != 2 or o.ndim != 2:
            return f"output layer {head} not refitted: its input or output is not 2-D"
        fit.add(h, o)
    w = linear.weight.detach().double().cpu().numpy().T
    b = linear.bias.detach().double().cpu().numpy() if linear.bias is not None else np.zeros(w.shape[1])
    outcome = fit.refit(np.vstack([w, b[None]]), HEAD_RIDGE)
    new = outcome.new
    if new is None:
        return fit.note(outcome, f"output layer {head}")
    device = linear.weight.device
    linear.weight.copy_(torch.as_tensor(new[:-1].T, dtype=linear.weight.dtype, device=device))
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.as_tensor(new[-1], dtype=linear.weight.dtype, device=device))
    else:
        linear.bias.copy_(torch.as_tensor(new[-1], dtype=linear.bias.dtype, device=device))
    return fit.note(outcome, f"output layer {head}")


def layer_drift(original: nn.Module, converted: nn.Module, layers: list[NewLayer],
                args: tuple[torch.Tensor, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each new layer's output against the original BN's output on ``args``: cosine into its record. Returns
    both modules' outputs on ``args`` (validation compares them and does not run the modules again)."""
    outputs: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            outputs[key] = out
        return hook
    hooks = [layer.module.register_forward_hook(keep(str(id(layer)))) for layer in layers]
    try:
        with _eval(original, converted), torch.no_grad():
            with _capturing([(layer.site.module, str(id(layer))) for layer in layers]) as inputs:
                ours = original(*args)
            theirs = converted(*args)
    finally:
        for h in hooks:
            h.remove()
    for layer in layers:
        key = str(id(layer))
        if key in outputs and key in inputs:
            a = bn_reference(layer.site, inputs[key]).flatten()
            b = outputs[key].detach().double().flatten()
            denom = float(a.norm() * b.norm())
            layer.record.drift_cosine = float(a @ b) / denom if denom > 0 else (1.0 if a.norm() == b.norm() else 0.0)
    return tuple([out] if isinstance(out, torch.Tensor) else list(out) for out in (ours, theirs))
