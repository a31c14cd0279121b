"""Every conversion reports the seconds of each stage, in the order they ran, on both frontends and in the CLI."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import normswap
from normswap.cli import main
from normswap.stages import Stages

FIXTURES = Path(__file__).parent.parent / "fixtures"
MODEL = FIXTURES / "digits_resnet.onnx"


def test_a_stage_named_twice_adds_up_and_order_is_kept():
    clock = Stages()
    clock.done("a")
    clock.done("b")
    clock.done("a")
    assert list(clock.seconds) == ["a", "b"] and all(v >= 0 for v in clock.seconds.values())


def test_onnx_stages_in_order_and_within_the_whole_call():
    x = np.load(FIXTURES / "digits_heldout.npz")["x"]
    import time
    start = time.perf_counter()
    r = normswap.convert(str(MODEL), "group", calibration={"x": x[:96]}, inputs={"x": x[96:160]}, refine=False)
    total = time.perf_counter() - start
    stages = r.report.stage_seconds
    assert list(stages) == ["load", "convert", "calibration", "validation"]
    assert stages["calibration"] >= r.report.calibration.seconds * 0.9
    assert 0 < sum(stages.values()) <= total


def test_fold_has_no_calibration_stage_and_the_cli_prints_the_times(tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(main, ["convert", str(MODEL), "--to", "fold", "-o", str(out),
                                       "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    assert "time: load" in result.output and "validation" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert list(report["stage_seconds"]) == ["load", "convert", "validation"] and report["dataflow"] is None


def test_torch_stages():
    torch = pytest.importorskip("torch")
    from tests.torch_nets import randomize_bn
    torch.manual_seed(0)
    net = randomize_bn(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                           torch.nn.Flatten(), torch.nn.Linear(8 * 36, 4))).eval()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    r = normswap.convert(net, "group", groups=2, calibration=x, refine=False, validate=False)
    assert list(r.report.stage_seconds) == ["convert (trace and rewrite)", "calibration"]
    assert r.report.dataflow == "torch.fx"
