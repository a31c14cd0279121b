"""fixtures/make_fixtures.py regenerates the shipped fixtures, and the shipped ones are what it describes."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import normswap

FIXTURES = Path(__file__).parent.parent / "fixtures"


def test_shipped_fixture_is_a_bn_model_that_folds_exactly():
    m = onnx.load(str(FIXTURES / "digits_resnet.onnx"))
    assert m.ir_version <= 13 and sum(n.op_type == "BatchNormalization" for n in m.graph.node) == 6
    r = normswap.convert(FIXTURES / "digits_resnet.onnx", to="fold", inputs=FIXTURES / "digits_heldout.npz")
    assert r.report.passed and r.report.count("folded") == 6
    assert r.report.validation.outputs[0].top1_agreement == 1.0
    assert r.report.validation.outputs[0].shape == [360, 10]


@pytest.mark.slow
def test_fixture_script_regenerates_them(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    accuracy = float(r.stdout.strip().rsplit(" ", 1)[1])
    assert accuracy > 0.9  # it learned the digits
    fresh = onnx.load(str(tmp_path / "digits_resnet.onnx"))
    shipped = onnx.load(str(FIXTURES / "digits_resnet.onnx"))
    assert [n.op_type for n in fresh.graph.node] == [n.op_type for n in shipped.graph.node]
    assert np.load(tmp_path / "digits_heldout.npz")["x"].shape == (360, 1, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_heldout.npz", "digits_resnet.onnx"]
