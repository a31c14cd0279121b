"""The HTML reports rendered in a real headless browser (Debian's chromium, where it is installed): no two texts
of a plot overlap, and a 400 px wide window needs no horizontal scrolling of the page."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import normswap

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium installed (apt-get install chromium)")
FIXTURES = Path(__file__).parent.parent / "fixtures"

PROBE = """<script>
const r = {overlaps: [], pageWidth: document.documentElement.scrollWidth, window: window.innerWidth};
for (const svg of document.querySelectorAll('svg')) {
  const boxes = [...svg.querySelectorAll('text')].map(t => [t.textContent, t.getBoundingClientRect()]);
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const [a, p] = boxes[i], [b, q] = boxes[j];
    const w = Math.min(p.right, q.right) - Math.max(p.left, q.left);
    const h = Math.min(p.bottom, q.bottom) - Math.max(p.top, q.top);
    if (w > 0.5 && h > 0.5) r.overlaps.push(a + ' / ' + b);
  }
}
document.body.setAttribute('data-probe', JSON.stringify(r));
</script>"""


def _render(page: str, tmp_path: Path, width: int) -> dict:
    path = tmp_path / f"page-{width}.html"
    path.write_text(page.replace("</body>", PROBE + "</body>"))
    out = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                          "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"data-probe=\"([^\"]*)\"", out.stdout)
    assert found, out.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def compare_page():
    x = np.load(FIXTURES / "digits_heldout.npz")["x"]
    report = normswap.compare(str(FIXTURES / "digits_resnet.onnx"), ("fold", "affine", "group", "layer", "instance"),
                              groups="auto", calibration={"x": x[:96]}, inputs={"x": x[96:160]}, progress=False)
    return report.to_html()


@pytest.mark.parametrize("width", [1200, 400])
def test_compare_page_texts_never_overlap_and_fit_a_narrow_window(compare_page, tmp_path, width):
    probe = _render(compare_page, tmp_path, width)
    assert probe["overlaps"] == []
    assert probe["pageWidth"] <= probe["window"] + 1  # tables scroll inside their box, plots shrink


def test_plot_labels_never_overlap_whatever_the_points_and_labels(tmp_path):
    """Crowded points (the compare page's five targets within a few pixels, as CI's timings once placed them:
    a bold recommended label against its neighbour's), wide letters and non-ASCII labels: every placed label clears
    every other text as the browser draws it."""
    from normswap.html_report import _page, svg_plot
    rng = np.random.default_rng(20261202)
    words = ["fold", "affine", "group", "layer", "instance", "WWWWMM", "mmmm.wwww", "Conv_0/BN", "ÄÖÜ", "批归一化",
             "J?_J?_"]
    plots = []
    for k in range(120):
        count = int(rng.integers(3, 9))
        labels = [str(w) for w in rng.choice(words, count, replace=False)]
        x = rng.uniform(1.0, 1.0 + rng.choice([0.05, 0.5, 5.0]), count)
        y = 1 - rng.uniform(0, rng.choice([0.005, 0.05, 0.5]), count)
        y[rng.random(count) < 0.3] = 1.0
        plots.append(svg_plot([("targets", list(zip(x.tolist(), y.tolist(), labels)))], x_label="latency (ms)",
                              y_label="agreement", title=f"plot {k}", lines=False, plot_id=f"p{k}",
                              highlight=labels[int(rng.integers(count))],
                              reference_x=(float(rng.uniform(0.9, 1.2)), "original")))
    probe = _render(_page("crowded plots", plots), tmp_path, 1200)
    assert probe["overlaps"] == []


def test_the_probe_sees_an_overlap_when_there_is_one(tmp_path):
    page = ('<!DOCTYPE html><html xmlns="http://www.w3.org/1999/xhtml"><body><svg xmlns="http://www.w3.org/2000/svg" '
            'width="200" height="50"><text x="10" y="20">82.75</text><text x="14" y="20">87.56</text></svg>'
            "</body></html>")
    assert _render(page, tmp_path, 800)["overlaps"] == ["82.75 / 87.56"]
