"""--report FILE.html: one self-contained, well-formed page with the plots (one mark per layer / target)."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import normswap
from normswap.html_report import render, svg_plot
from normswap.report import LayerRecord

FIXTURES = Path(__file__).parent.parent / "fixtures"
MODEL = FIXTURES / "digits_resnet.onnx"
SVG = "{http://www.w3.org/2000/svg}"
XHTML = "{http://www.w3.org/1999/xhtml}"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "normswap.cli", *map(str, args)], capture_output=True, text=True)


def parse(text: str) -> ET.Element:
    """Well-formed (raises otherwise) and self-contained: no script, nothing fetched from elsewhere."""
    root = ET.fromstring(text.split("\n", 1)[1] if text.startswith("<!DOCTYPE") else text)
    assert not root.findall(f".//{XHTML}script") and not root.findall(f".//{XHTML}link")
    for element in root.iter():
        for name, value in element.attrib.items():
            assert name not in ("src", "href") and "http" not in value.replace("http://www.w3.org", ""), value
    return root


def marks(root: ET.Element, plot_id: str) -> list[ET.Element]:
    (svg,) = [s for s in root.iter(f"{SVG}svg") if s.get("id") == plot_id]
    return [c for c in svg.iter(f"{SVG}circle") if "mark" in (c.get("class") or "").split()]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    x = np.load(FIXTURES / "digits_heldout.npz")["x"]
    np.savez(d / "calib.npz", x=x[:160])
    np.savez(d / "held.npz", x=x[160:])
    return d / "calib.npz", d / "held.npz"


def test_convert_page_plots_one_drift_mark_per_layer(npz, tmp_path):
    calib, held = npz
    page = tmp_path / "convert.html"
    r = cli("convert", MODEL, "--to", "layer", "--calibrate", calib, "--inputs", held, "-o", tmp_path / "m.onnx",
            "--report", page, "-q", "--no-refine")
    assert r.returncode == 0, r.stderr
    root = parse(page.read_text())
    layers = normswap.convert(MODEL, to="layer", calibration=str(calib), inputs=str(held), refine=False).report.layers
    got = marks(root, "drift")
    assert [m.get("data-label") for m in got] == [layer.name for layer in layers]
    for m, layer in zip(got, layers):
        assert float(m.get("data-y")) == pytest.approx(layer.drift_cosine, abs=1e-5)
    assert "function preserved" in page.read_text()


def test_compare_page_plots_one_mark_per_target(npz, tmp_path):
    calib, held = npz
    page = tmp_path / "compare.html"
    r = cli("compare", MODEL, "--targets", "fold,group,layer", "--groups", "auto", "--calibrate", calib,
            "--inputs", held, "--report", page, "-q")
    assert r.returncode == 0, r.stderr
    assert "recommended for finetune:" in r.stdout
    root = parse(page.read_text())
    assert sorted(m.get("data-label") for m in marks(root, "tradeoff")) == ["fold", "group", "layer"]
    recommended = [tr for tr in root.iter(f"{XHTML}tr") if tr.get("class") == "recommended"]
    assert len(recommended) == 1
    ringed = [m.get("data-label") for m in marks(root, "tradeoff") if "highlight" in m.get("class")]
    assert len(ringed) == 1 and ringed[0] in r.stdout.split("recommended for finetune:")[1]
    (svg,) = [s for s in root.iter(f"{SVG}svg") if s.get("id") == "tradeoff"]
    assert [line for line in svg.iter(f"{SVG}line") if line.get("class") == "reference"]  # the original's latency


def test_plot_labels_and_ticks_never_overlap():
    from normswap.html_report import _box, _overlaps, svg_plot
    root = ET.fromstring(svg_plot([("t", [(82.75, 0.99, "fold"), (87.56, 0.99, "affine"), (84.0, 0.991, "group"),
                                          (85.1, 0.9905, "layer"), (83.3, 0.9902, "instance")])],
                                  x_label="ms", y_label="agreement", title="t", lines=False, highlight="group",
                                  reference_x=(80.0, "original")))
    texts = [t for t in root.iter(f"{SVG}text") if t.get("class") in ("label", "tick")]
    boxes = [_box(float(t.get("x")), float(t.get("y")), t.text, t.get("text-anchor") or "start",
                  t.get("font-weight") == "bold") for t in texts]
    assert len([t for t in texts if t.get("class") == "tick"]) >= 2
    assert not any(_overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert any(t.text == "group (recommended)" for t in texts)


def test_inspect_page_plots_one_mark_per_layer_and_batch_size(npz, tmp_path):
    _, held = npz
    page = tmp_path / "inspect.html"
    r = cli("inspect", MODEL, "--batch-sensitivity", held, "--batch-sizes", "1,4,16", "--report", page)
    assert r.returncode == 0, r.stderr
    assert "batch-size sensitivity" in r.stdout
    root = parse(page.read_text())
    got = marks(root, "sensitivity")
    assert len(got) == 6 * 3
    series = [g.get("data-series") for g in root.iter(f"{SVG}g") if g.get("class") == "series"]
    assert series == ["batch 1", "batch 4", "batch 16"]


def test_validate_page(tmp_path):
    folded = tmp_path / "f.onnx"
    normswap.convert(MODEL, to="fold").save(folded)
    page = tmp_path / "v.html"
    r = cli("validate", MODEL, folded, "--report", page)
    assert r.returncode == 0, r.stderr
    root = parse(page.read_text())
    assert len(marks(root, "outputs")) == 1 and "passed" in page.read_text()


def test_json_is_still_written_for_other_names(npz, tmp_path):
    _, held = npz
    r = cli("inspect", MODEL, "--batch-sensitivity", held, "--batch-sizes", "2", "--report", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["batch_sensitivity"]["batch_sizes"] == [2]


def test_names_are_escaped():
    report = normswap.ConversionReport("layer", False, "<model & co>", [
        LayerRecord("bn</td><script>x", "BatchNormalization", "converted", "a & b", 4, drift_cosine=0.5)], 1, 1)
    root = parse(render(report))
    assert [m.get("data-label") for m in marks(root, "drift")] == ["bn</td><script>x"]


def test_plot_leaves_out_non_finite_values():
    svg = svg_plot([("s", [(0, 1.0, "a"), (1, float("nan"), "b"), (2, 0.5, "c")])], x_label="x", y_label="y",
                   title="t")
    root = ET.fromstring(svg)
    assert [c.get("data-label") for c in root.iter(f"{SVG}circle")] == ["a", "c"]


@pytest.mark.parametrize("bold", [False, True])
def test_label_widths_are_the_pinned_face_advances(bold):
    """The width table is DejaVu Sans' own (read from the copy matplotlib ships): a label's box is the face's
    advance sum times the margin, so a wrong or shifted table entry breaks it."""
    import matplotlib
    from fontTools.ttLib import TTFont

    from normswap.text_metrics import MARGIN, OTHER, text_width
    font = TTFont(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"DejaVuSans{'-Bold' if bold else ''}.ttf")
    cmap, advances, per_em = font.getBestCmap(), font["hmtx"], font["head"].unitsPerEm
    for code in range(32, 127):
        face = advances[cmap[code]][0] * 11.0 / per_em
        assert text_width(chr(code), 11.0, bold) == pytest.approx(face * MARGIN, abs=0.01), chr(code)
    assert text_width("group (recommended)", 11.0, True) > text_width("group (recommended)", 11.0, False)
    assert text_width("批", 11.0, bold) == pytest.approx(OTHER * 11.0 / 1000 * MARGIN)
