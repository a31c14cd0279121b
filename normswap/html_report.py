"""``--report FILE.html``: one self-contained page (no network, no scripts) per report, plots as inline SVG.

The page is well-formed XML (XHTML served as HTML) so that it can be checked by a parser. Every plotted value
is a mark carrying ``data-label`` (the layer or target) and ``data-x`` / ``data-y``; the JSON report stays the
machine-readable form.
"""
from __future__ import annotations

import math
from html import escape

from .report import CompareReport, ConversionReport, InspectReport, SensitivityReport, ValidationReport
from .text_metrics import ASCENT, DESCENT, text_width

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
svg text{font-family:"DejaVu Sans","Bitstream Vera Sans",sans-serif;font-size:11px;fill:#333}
svg.plot{max-width:100%;height:auto}
.scroll{overflow-x:auto;max-width:100%}h1{overflow-wrap:anywhere}
@media (max-width:500px){body{margin:1em auto;font-size:15px}h1{font-size:1.2em}
dl{grid-template-columns:auto}dd{margin:0 0 .4em 0}table{font-size:.75em}}
"""
FONT_SIZE = 11.0  # px, the CSS of ``svg text``; widths come from text_metrics (its face is pinned there)
MIN_TICK_GAP = 12.0  # px between two x tick labels


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
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


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


def _box(x: float, y: float, text: str, anchor: str = "start", bold: bool = False) -> tuple[float, ...]:
    """The box (x0, y0, x1, y1) a label at (x, y) covers (y is its baseline), bounding what a browser draws."""
    width = text_width(text, FONT_SIZE, bold)
    left = x - width / 2 if anchor == "middle" else (x - width if anchor == "end" else x)
    return left, y - ASCENT * FONT_SIZE, left + width, y + DESCENT * FONT_SIZE


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _thin_ticks(positions: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Tick labels left to right, each kept only when it clears the last kept one by ``MIN_TICK_GAP``."""
    kept: list[tuple[float, str]] = []
    for x, text in sorted(positions):
        half = text_width(text, FONT_SIZE) / 2
        if not kept or x - half >= kept[-1][0] + text_width(kept[-1][1], FONT_SIZE) / 2 + MIN_TICK_GAP:
            kept.append((x, text))
    return kept


def _place_label(x: float, y: float, text: str, taken: list, area: tuple[float, float, float, float],
                 bold: bool = False):
    """A position for a point's label near (x, y) whose box overlaps no box in ``taken`` and stays in ``area``:
    above right first, then below, left, further away; None when nothing fits (the mark's tooltip remains)."""
    for dy in (-6, 14, -20, 28, -34, 42):
        for dx, anchor in ((6, "start"), (-6, "end")):
            box = _box(x + dx, y + dy, text, anchor, bold)
            inside = box[0] >= area[0] and box[2] <= area[2] and box[1] >= area[1] and box[3] <= area[3]
            if inside and not any(_overlaps(box, t) for t in taken):
                taken.append(box)
                return x + dx, y + dy, anchor
    return None


def svg_plot(series: list[tuple[str, list[tuple[float, float, str]]]], *, x_label: str, y_label: str,
             title: str, lines: bool = True, log_x: bool = False, plot_id: str = "plot",
             highlight: str | None = None, reference_x: tuple[float, str] | None = None) -> str:
    """Points (x, y, label) per named series; lines join a series' points when ``lines``, else each point is
    labelled where the label overlaps no other text. ``highlight``: the label of a point drawn larger, ringed and
    marked; ``reference_x``: (x, label) drawn as a dashed vertical line. Non-finite values are left out (their
    count is said in the caption by the caller)."""
    points = [(x, y) for _, pts in series for x, y, _ in pts if math.isfinite(x) and math.isfinite(y)]
    if reference_x is not None and math.isfinite(reference_x[0]):
        points.append((reference_x[0], points[0][1] if points else 0.0))
    if not points:
        return f'<p class="note">{escape(title)}: nothing to plot.</p>'
    tx = (lambda v: math.log10(v)) if log_x else (lambda v: v)
    xs, ys = [tx(x) for x, _ in points], [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    x0, x1 = x0 - (x1 - x0) * 0.03, x1 + (x1 - x0) * 0.03  # marks at the extremes clear of the frame
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
    distinct = sorted({x for x, _ in points})
    xticks = distinct if len(distinct) <= 12 else [10 ** v if log_x else v for v in _ticks(x0, x1)]
    for x, text in _thin_ticks([(px(t), f"{t:.4g}") for t in xticks]):
        parts.append(f'<text class="tick" x="{x:.1f}" y="{TOP + h + 18}" text-anchor="middle">{text}</text>')
    if reference_x is not None and math.isfinite(reference_x[0]):
        rx = px(reference_x[0])
        parts.append(f'<line class="reference" x1="{rx:.1f}" x2="{rx:.1f}" y1="{TOP}" y2="{TOP + h}" stroke="#777" '
                     f'stroke-dasharray="4 3"/><text x="{rx + 4:.1f}" y="{TOP + 12}">{escape(reference_x[1])}</text>')
    taken = [_box(rx + 4, TOP + 12, reference_x[1])] if reference_x is not None and math.isfinite(reference_x[0]) \
        else []
    taken += [(px(x) - 4, py(y) - 4, px(x) + 4, py(y) + 4) for _, pts in series for x, y, _ in pts
              if math.isfinite(x) and math.isfinite(y)]  # labels never cover a mark
    area = (LEFT, TOP, LEFT + w, TOP + h)
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
            chosen = label == highlight
            if chosen:
                parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="8" fill="none" stroke="#1a7f37" '
                             'stroke-width="2"/>')
            parts.append(f'<circle class="mark{" highlight" if chosen else ""}" cx="{px(x):.1f}" cy="{py(y):.1f}" '
                         f'r="{5 if chosen else 3.5}" fill="{"#1a7f37" if chosen else color}" '
                         f'data-label="{escape(label)}" data-x="{x:.6g}" data-y="{y:.6g}">'
                         f"<title>{escape(label)}: {escape(x_label)} {x:.4g}, {escape(y_label)} {y:.4g}</title>"
                         "</circle>")
            if not lines:
                text = f"{label} (recommended)" if chosen else label
                spot = _place_label(px(x), py(y), text, taken, area, bold=chosen)
                if spot is not None:
                    weight = ' font-weight="bold"' if chosen else ""
                    parts.append(f'<text class="label" x="{spot[0]:.1f}" y="{spot[1]:.1f}" text-anchor="{spot[2]}"'
                                 f"{weight}>{escape(text)}</text>")
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
        measure = next((row.agreement_measure for row in r.rows if row.agreement_measure), None)
        caption = (f"Agreement with the original ({measure or 'cosine: no output has an agreement measure'}) "
                   "against latency per batch; one mark per target, the recommended one ringed"
                   + (f"; the dashed line is the original ({original:.3g} ms)." if original else "."))
        body.append("<h2>Agreement against latency</h2>" + _figure(
            svg_plot([("targets", marks)], x_label="latency per batch (ms)", y_label="agreement with the original",
                     title="agreement against latency per target", lines=False, plot_id="tradeoff",
                     highlight=r.recommended, reference_x=(original, "original") if original else None), caption))
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
