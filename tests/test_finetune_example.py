"""examples/finetune_small_batch.py runs (at a reduced size) and measures what it says it measures."""
import re
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import finetune_small_batch as example  # noqa: E402


def test_the_example_writes_a_table_and_a_plot(tmp_path):
    out = tmp_path / "results.md"
    example.main(["--quick", "--out", str(out)])
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == len(example.DOMAINS) * len(example.VARIANTS)
    for row in rows:
        values = [float(v) / 100 for v in re.findall(r"(\d+\.\d)%", row)]
        assert len(values) == 3 and all(0 <= v <= 1 for v in values)
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_calibration_keeps_the_original_domain_where_fresh_groupnorm_forgets():
    import numpy as np
    (x_train, y_train), (x_test, y_test) = example.make_fixtures.digits()
    original = example.make_fixtures.train(example.make_fixtures.build_model(), x_train[:900], y_train[:900])
    unlabeled = x_train[900:1200]
    accuracy = {v: example.accuracy(example.prepare(v, original, unlabeled, x_train[:40], example.QUICK),
                                    x_test, y_test) for v in ("bn-frozen", "gn-fresh", "gn-calibrated")}
    assert accuracy["gn-calibrated"] > accuracy["gn-fresh"] + 0.3
    assert accuracy["gn-calibrated"] > accuracy["bn-frozen"] - 0.05
    assert np.isclose(example.shift(x_test[:2], "inverted", 0), 1 - x_test[:2]).all()
