"""The option groups (normswap/options.py): each stage's settings in one typed group, or as keywords, never both;
the refinement defaults and switches as convert and the CLI see them."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import normswap
from normswap.errors import UsageError
from normswap.options import (CalibrationOptions, DEFAULT_REFINE_SECONDS, RefinementOptions, ValidationOptions,
                              stage_options)

FIXTURES = Path(__file__).parent.parent / "fixtures"
MODEL = str(FIXTURES / "digits_resnet.onnx")
X = np.load(FIXTURES / "digits_heldout.npz")["x"]


def test_keywords_build_the_groups_and_defaults_fill_the_rest():
    cal, ref, val = stage_options(None, None, None, {"calibration_batch_size": 8, "refine_seconds": 30,
                                                     "provider": "cpu", "min_agreement": 0.9})
    assert cal == CalibrationOptions(batch_size=8)
    assert ref == RefinementOptions(seconds=30) and ref.enabled and ref.steps == 2000
    assert val == ValidationOptions(provider="cpu", min_agreement=0.9)
    assert stage_options(None, False, None, {})[1].enabled is False
    assert stage_options(None, True, None, {})[1] == RefinementOptions()
    assert RefinementOptions().seconds == DEFAULT_REFINE_SECONDS


def test_a_group_and_its_keywords_together_are_refused_and_unknown_keywords_are_a_type_error():
    with pytest.raises(UsageError, match="refine= and the keyword"):
        stage_options(None, RefinementOptions(), None, {"refine_seconds": 5})
    with pytest.raises(UsageError, match="validation= takes a normswap.ValidationOptions"):
        stage_options(None, None, {"provider": "cpu"}, {})
    with pytest.raises(TypeError, match="unexpected keyword argument 'colour'"):
        normswap.convert(MODEL, to="fold", colour="red")
    with pytest.raises(UsageError, match="calibration_options= and the keyword"):
        normswap.convert(MODEL, to="layer", calibration_options=CalibrationOptions(), calibration_batch_size=4)


@pytest.mark.parametrize("bad, match", [({"batch_size": 0}, "batch size must be positive"),
                                        ({"memory": -1}, "must not be negative")])
def test_calibration_options_are_checked(bad, match):
    with pytest.raises(UsageError, match=match):
        CalibrationOptions(**bad).check()
    assert CalibrationOptions().check() == CalibrationOptions()


@pytest.mark.parametrize("bad, match", [({"seconds": 0}, "refine_seconds=0"), ({"steps": 0}, "refine_steps=0"),
                                        ({"holdout": 1.0}, "refine_holdout=1.0"), ({"scope": "x"}, "refine_scope"),
                                        ({"batch_size": 0}, "refine_batch_size=0"),
                                        ({"learning_rate": -1.0}, "learning rate must be positive")])
def test_refinement_options_are_checked(bad, match):
    with pytest.raises(UsageError, match=match):
        RefinementOptions(**bad).check()


@pytest.mark.parametrize("bad, match", [({"atol": -1}, "non-negative"), ({"min_cosine": 2}, "between -1 and 1"),
                                        ({"map_threshold": 1.0}, "strictly between"),
                                        ({"task_metric": 3}, "must be a callable")])
def test_validation_options_are_checked(bad, match):
    with pytest.raises(UsageError, match=match):
        ValidationOptions(**bad).check()


def test_onnx_refinement_is_on_by_default_and_honours_the_step_limit():
    r = normswap.convert(MODEL, to="layer", calibration={"x": X[:120]}, refine_steps=4, validate=False,
                         progress=False)
    refinement = r.report.calibration.refinement
    assert refinement is not None and refinement.steps == 4 and refinement.stopped in ("step limit",
                                                                                      "time budget")
    off = normswap.convert(MODEL, to="layer", calibration={"x": X[:120]}, refine=False, validate=False,
                           progress=False)
    assert off.report.calibration.refinement is None


def test_without_torch_calibration_alone_runs_and_says_so_once(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    r = normswap.convert(MODEL, to="layer", calibration={"x": X[:120]}, validate=False, progress=False)
    assert r.report.calibration.refinement is None
    assert sum("refinement skipped" in n and "not installed" in n for n in r.report.notes) == 1


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "normswap", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_the_cli_honours_no_refine_and_the_deprecated_distill_flags(tmp_path):
    np.savez(tmp_path / "c.npz", x=X[:120])
    r = _cli("convert", MODEL, "--to", "layer", "--calibrate", "c.npz", "--no-refine", "--no-validate", "-o",
             "a.onnx", "--report", "a.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert '"refinement": null' in (tmp_path / "a.json").read_text()
    r = _cli("convert", MODEL, "--to", "layer", "--calibrate", "c.npz", "--distill-steps", "3", "--no-validate",
             "-o", "b.onnx", "--report", "b.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--distill-steps is deprecated; use --refine-steps" in r.stderr
    assert '"steps": 3' in (tmp_path / "b.json").read_text()
    r = _cli("convert", MODEL, "--to", "layer", "--calibrate", "c.npz", "--refine-seconds", "0", cwd=tmp_path)
    assert r.returncode == 2 and "--refine-seconds 0" in r.stderr and "--no-refine" in r.stderr
