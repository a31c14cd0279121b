"""``--report FILE.html``: one self-contained page (no network, no scripts) per report, plots as inline SVG.

The page is well-formed XML (XHTML served as HTML) so that it can be checked by a parser. Every plotted value
is a mark carrying ``data-label`` (the layer or target) and ``data-x`` / ``data-y``; the JSON report stays the
machine-readable form.
"""
from __future__ import annotations

import math
from html import escape

from .report import CompareReport, ConversionReport, InspectReport, SensitivityReport, ValidationReport

WIDTH, HEIGHT = 720, 320
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 24, 48
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.recommended td{background:#eaf6ea}.fail{color:#b00020;font-weight:600}.ok{color:#1a7f37}
dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}dt{font-weight:600}dd{margin:0}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}.note{color:#555;font-size:.9em}
svg text{font-size:11px;fill:#333}
"""


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _table(header: list[str], rows: list[list], row_class: list[str] | None = None, numeric=()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = []
    for k, row in enumerate(rows):
        cls = f' class="{row_class[k]}"' if row_class and row_class[k] else ""
        cells = "".join(f'<td class="num">{escape(_fmt(v))}</td>' if j in numeric else f"<td>{escape(_fmt(v))}</td>"
                        for j, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary(items: list[tuple[str, object]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(_fmt(v))}</dd>" for k, v in items) + "</dl>"


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / count))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= count:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


def svg_plot(series: list[tuple[str, list[tuple[float, float, str]]]], *, x_label: str, y_label: str,
             title: str, lines: bool = True, log_x: bool = False, plot_id: str = "plot") -> str:
    """Points (x, y, label) per named series; lines join a series' points when ``lines``. Non-finite values are
    left out (their count is said in the caption by the caller)."""
    points = [(x, y) for _, pts in series for x, y, _ in pts if math.isfinite(x) and math.isfinite(y)]
    if not points:
        return f'<p class="note">{escape(title)}: nothing to plot.</p>'
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs, ys = [tx(x) for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or max(abs(y1) * 0.05, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x):
        return LEFT + (tx(x) - x0) / (x1 - x0) * w

    def py(y):
        return TOP + h - (y - y0) / (y1 - y0) * h

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" id="{escape(plot_id)}" class="plot" width="{WIDTH}" '
             f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>",
             f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="#fff" stroke="#999"/>']
    for t in _ticks(y0, y1):
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                     f'<text x="{LEFT - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.4g}</text>')
    xticks = sorted({x for x, _ in points}) if len({x for x, _ in points}) <= 12 else None
    for t in xticks or [10 ** v if log_x else v for v in _ticks(x0, x1)]:
        parts.append(f'<text x="{px(t):.1f}" y="{TOP + h + 16}" text-anchor="middle">{t:.4g}</text>')
    parts.append(f'<text x="{LEFT + w / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {TOP + h / 2:.1f}) rotate(-90)" text-anchor="middle">'
                 f"{escape(y_label)}</text>")
    for k, (name, pts) in enumerate(series):
        color = PALETTE[k % len(PALETTE)]
        finite = [(x, y, label) for x, y, label in pts if math.isfinite(x) and math.isfinite(y)]
        parts.append(f'<g class="series" data-series="{escape(name)}">')
        if lines and len(finite) > 1:
            path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y, _ in finite)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y, label in finite:
            parts.append(f'<circle class="mark" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}" '
                         f'data-label="{escape(label)}" data-x="{x:.6g}" data-y="{y:.6g}">'
                         f"<title>{escape(label)}: {escape(x_label)} {x:.4g}, {escape(y_label)} {y:.4g}</title>"
                         "</circle>")
            if not lines:
                parts.append(f'<text x="{px(x) + 6:.1f}" y="{py(y) - 6:.1f}">{escape(label)}</text>')
        parts.append("</g>")
        if len(series) > 1:
            ly = TOP + 14 + 16 * k
            parts.append(f'<rect x="{LEFT + w + 12}" y="{ly - 9}" width="10" height="10" fill="{color}"/>'
                         f'<text x="{LEFT + w + 28}" y="{ly}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _page(title: str, body: list[str]) -> str:
    return ('<!DOCTYPE html>\n<html xmlns="http://www.w3.org/1999/xhtml" lang="en"><head><meta charset="utf-8"/>'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            + "".join(body) + "</body></html>\n")


def _notes(notes: list[str]) -> str:
    if not notes:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"


def _validation_section(v: ValidationReport | None, heading: str = "Validation") -> str:
    if v is None:
        return ""
    verdict = {True: "passed", False: "FAILED", None: "measured (no gate)"}[v.passed]
    rows = [[o.name, o.max_abs, o.max_rel, o.mean_abs, o.cosine, o.agreement, o.original_error,
             o.converted_error, {True: "ok", False: "FAIL", None: "measured"}[o.passed]] for o in v.outputs]
    return (f"<h2>{escape(heading)}</h2>" + _summary([
        ("check", v.check + (f" ({v.rule})" if v.check == "exact" else "")), ("result", verdict),
        ("ran on", ", ".join(v.providers)), ("inputs", v.inputs), ("float64 reference", v.float64_reference)])
        + _table(["output", "max abs", "max rel", "mean abs", "cosine", "agreement", "original error",
                  "converted error", "result"], rows, numeric=range(1, 8)))


def conversion_html(r: ConversionReport) -> str:
    summary = [("source", r.source), ("target", r.target), ("exact", r.exact), ("frontend", r.frontend),
               ("layers", len(r.layers)), ("nodes" if r.frontend == "onnx" else "modules",
                                           f"{r.nodes_before} -> {r.nodes_after}"),
               ("function preserved", "unknown" if r.function_preserved is None else r.function_preserved),
               ("passed", "not judged" if r.passed is None else r.passed), ("output", r.output)]
    if r.calibration is not None:
        summary += [("calibration", f"{r.calibration.samples} samples, {r.calibration.seconds:.2f} s, "
                                    f"{len(r.calibration.layers_changed)} layer(s) changed")]
    body = [_summary(summary)]
    drift = [(k, layer) for k, layer in enumerate(r.layers) if layer.drift_cosine is not None]
    if drift:
        body.append("<h2>Per-layer drift</h2>" + _figure(
            svg_plot([("cosine", [(k, layer.drift_cosine, layer.name) for k, layer in drift])],
                     x_label="layer (model order)", y_label="cosine to the original BN output",
                     title="per-layer drift cosine by depth", plot_id="drift"),
            "Cosine similarity between each new layer's output and the original BatchNorm's output on the "
            "validation inputs, in model order; one mark per layer."))
    elif not r.exact:
        body.append('<p class="note">No per-layer drift was measured (validation did not run).</p>')
    body.append("<h2>Layers</h2>" + _table(
        ["layer", "action", "C", "G", "calibrated", "drift cosine", "producer", "reason"],
        [[layer.name, layer.action, layer.channels, layer.groups, layer.calibrated, layer.drift_cosine,
          f"{layer.producer_op or '-'} {layer.producer or ''}".strip(), layer.reason] for layer in r.layers],
        numeric=(2, 3, 5)))
    body.append(_validation_section(r.validation))
    body.append(_validation_section(r.deployable, "Export check (converted module against its ONNX export)"))
    body.append(_notes(r.notes))
    return _page(f"normswap convert: {r.source} -> {r.target}", body)


def validation_html(v: ValidationReport, reference: str = "", candidate: str = "") -> str:
    body = [_summary([("reference", reference), ("candidate", candidate)]), _validation_section(v)]
    finite = [o for o in v.outputs if o.cosine is not None]
    if finite:
        body.append(_figure(svg_plot([("cosine", [(k, o.cosine, o.name) for k, o in enumerate(finite)])],
                                     x_label="output", y_label="cosine", title="cosine per output", lines=False,
                                     plot_id="outputs"), "Cosine similarity of each output; one mark per output."))
    body.append(_notes(v.cautions + ([v.rule_note] if v.rule_note else [])))
    return _page("normswap validate", body)


def compare_html(r: CompareReport) -> str:
    rows = [[row.target, row.exact, row.agreement, row.cosine, row.groups, row.batch_independent,
             row.parameters, row.nodes, row.latency_ms, row.calibration_seconds,
             {True: "ok", False: "FAIL", None: "measured"}[row.passed]] for row in r.rows]
    marks = [(row.latency_ms, row.agreement if row.agreement is not None else row.cosine, row.target)
             for row in r.rows if row.latency_ms is not None and (row.agreement is not None or
                                                                 row.cosine is not None)]
    body = [_summary([("source", r.source), ("purpose", r.purpose), ("recommended", r.recommended),
                      ("why", r.reason), ("latency", f"per batch of {r.latency_batch}, {r.latency_source}")
                      if r.latency_source else ("latency", "not measured")]),
            _table(["target", "exact", "agreement", "cosine", "groups", "batch independent", "parameters",
                    "nodes", "latency ms", "calibration s", "result"], rows,
                   ["recommended" if row.target == r.recommended else "" for row in r.rows],
                   numeric=(2, 3, 6, 7, 8, 9))]
    if marks:
        original = next((row.original_latency_ms for row in r.rows if row.original_latency_ms is not None), None)
        caption = ("Top-1 agreement with the original (cosine where there is no class output) against latency per "
                   "batch; one mark per target" + (f"; the original takes {original:.3g} ms." if original else "."))
        body.append("<h2>Agreement against latency</h2>" + _figure(
            svg_plot([("targets", marks)], x_label="latency per batch (ms)", y_label="agreement with the original",
                     title="agreement against latency per target", lines=False, plot_id="tradeoff"), caption))
    body.append(_notes(r.notes))
    return _page(f"normswap compare: {r.source}", body)


def sensitivity_section(s: SensitivityReport) -> str:
    series = [(f"batch {b}", [(layer.depth, layer.model_error[b], layer.name) for layer in s.layers
                              if b in layer.model_error]) for b in s.batch_sizes]
    ranked = [[layer.name, layer.op, layer.channels] + [layer.model_error.get(b) for b in s.batch_sizes] +
              [layer.unreliable_up_to] for layer in s.ranked()]
    unreliable = s.unreliable()
    verdict = ("no layer makes training unreliable at the measured batch sizes" if not unreliable else
               f"{len(unreliable)} of {len(s.layers)} layer(s) make training unreliable at small batch sizes")
    return ("<h2>Batch-size sensitivity</h2>" + _summary([
        ("batch sizes", ", ".join(map(str, s.batch_sizes))), ("batches per size", s.batches),
        ("samples", s.samples), ("unreliable when", f"top-1 agreement < {s.unreliable_agreement:.0%} (class scores), "
                                                   f"else model output moves >= {s.unreliable_error:.0%}"),
        ("verdict", verdict)])
        + _figure(svg_plot(series, x_label="BatchNorm layer (model order)",
                           y_label="relative error of the model output", title="batch sensitivity by layer",
                           plot_id="sensitivity"),
                  "How far the model output moves when one layer normalizes with the statistics of a batch of "
                  "each size instead of its running statistics (mean over batches); one mark per layer and size.")
        + _table(["layer", "op", "C"] + [f"model error @{b}" for b in s.batch_sizes] + ["unreliable up to batch"],
                 ranked, numeric=tuple(range(2, 4 + len(s.batch_sizes))))
        + _notes(s.notes))


def inspect_html(r: InspectReport) -> str:
    body = [_summary([("source", r.source), ("opset", r.opset or "-"), ("IR version", r.ir_version or "-"),
                      ("sites", len(r.sites)), ("problem", r.problem)])]
    if r.sites and "action_under_fold" in r.sites[0]:
        body.append("<h2>Normalization sites</h2>" + _table(
            ["layer", "op", "C", "producer", "under --to fold", "reason"],
            [[s["name"], s["op"], s["channels"], f"{s['producer_op'] or '-'} {s['producer'] or ''}".strip(),
              s["action_under_fold"], s["reason"]] for s in r.sites], numeric=(2,)))
    elif r.sites:
        body.append("<h2>Normalization layers</h2>" + _table(
            ["layer", "type", "C", "couples samples", "affine", "running stats", "frozen", "why"],
            [[s["name"], s["type"], s["channels"], s["couples_samples"], s["affine"], s["running_stats"],
              s["frozen"], s["reason"]] for s in r.sites], numeric=(2,)))
    if r.batch_sensitivity is not None:
        body.append(sensitivity_section(r.batch_sensitivity))
    return _page(f"normswap inspect: {r.source}", body)


def render(report, **context) -> str:
    """The page for any report type."""
    if isinstance(report, ConversionReport):
        return conversion_html(report)
    if isinstance(report, CompareReport):
        return compare_html(report)
    if isinstance(report, InspectReport):
        return inspect_html(report)
    if isinstance(report, ValidationReport):
        return validation_html(report, **context)
    raise TypeError(f"no HTML page for {type(report).__name__}")
