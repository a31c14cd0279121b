"""Progress: the API draws the CLI's bar when stderr is a terminal, never in a pipe, and passes callbacks on."""
import io
from pathlib import Path

import numpy as np

import normswap
from normswap.progress import progress_for, terminal_progress

FIXTURES = Path(__file__).parent.parent / "fixtures"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_is_drawn_on_a_terminal_with_an_eta(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    with terminal_progress() as update:
        assert update is not None
        for done in range(1, 41):
            update(done, 40, "calibrating: segment 1/2, 100 samples/s")
    text = term.getvalue()
    assert "calibrating: segment 1/2, 100 samples/s" in text and "100%" in text


def test_nothing_is_drawn_in_a_pipe_or_when_asked_not_to(monkeypatch):
    pipe = io.StringIO()
    monkeypatch.setattr("sys.stderr", pipe)
    with progress_for(None) as update:
        assert update is None
    monkeypatch.setattr("sys.stderr", _Terminal())
    with progress_for(False) as update:
        assert update is None
    calls = []
    with progress_for(lambda *a: calls.append(a)) as update:
        update(1, 2, "x")
    assert calls == [(1, 2, "x")] and pipe.getvalue() == ""


def test_the_api_draws_the_bar_by_default_on_a_terminal(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    x = np.load(FIXTURES / "digits_heldout.npz")["x"][:40]
    normswap.convert(FIXTURES / "digits_resnet.onnx", to="layer", calibration={"x": x}, validate=False, refine=False)
    assert "samples/s" in term.getvalue()
    quiet = _Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    normswap.convert(FIXTURES / "digits_resnet.onnx", to="layer", calibration={"x": x}, validate=False,
                     progress=False, refine=False)
    assert quiet.getvalue() == ""
