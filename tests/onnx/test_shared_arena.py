"""Calibration's segment sessions share one CPU arena (normswap/onnx/shared_arena.py): same fit, private arenas
when the shared one cannot be had."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from normswap.onnx import shared_arena
from normswap.onnx.calibrate import calibrate
from normswap.validate.providers import CPU
from tests.onnx.test_calibrate import MODEL, _converted


@pytest.fixture
def fresh_arena_state(monkeypatch):
    """Each test decides registration anew (the process-wide registration itself cannot be undone)."""
    monkeypatch.setattr(shared_arena, "_STATE", {})


def _calibrated(x):
    ref, conv, norms = _converted("group")
    calibrate(ref, conv, norms, {"x": x}, (CPU,), refit_output_layer=False)
    return {t.name: onnx.numpy_helper.to_array(t) for t in conv.graph.initializer}


def test_sessions_ask_for_the_shared_arena_when_it_is_registered(monkeypatch, fresh_arena_state):
    calls = []
    monkeypatch.setattr(ort, "create_and_register_allocator", lambda *a: calls.append(a))
    options = ort.SessionOptions()
    shared_arena.use(options)
    assert calls and options.get_session_config_entry("session.use_env_allocators") == "1"
    shared_arena.use(ort.SessionOptions())
    assert len(calls) == 1  # registered once per process


def test_without_the_shared_arena_sessions_keep_private_ones(monkeypatch, fresh_arena_state):
    def refuse(*args):
        raise RuntimeError("an allocator for this device is already registered")
    monkeypatch.setattr(ort, "create_and_register_allocator", refuse)
    options = ort.SessionOptions()
    shared_arena.use(options)
    assert not shared_arena.available()
    with pytest.raises(Exception):  # the entry was never set
        options.get_session_config_entry("session.use_env_allocators")
    shared_arena.release()  # nothing to release: no error


def test_the_shared_arena_does_not_change_the_fit(monkeypatch):
    x = np.load(MODEL.parent / "digits_heldout.npz")["x"][:120]
    shared = _calibrated(x)
    assert shared_arena.available()  # this process registered it (or the test proves nothing)
    monkeypatch.setattr(shared_arena, "_STATE", {"registered": False})
    private = _calibrated(x)
    assert shared.keys() == private.keys()
    for name in shared:
        np.testing.assert_array_equal(shared[name], private[name], err_msg=name)
    unfitted = {t.name: onnx.numpy_helper.to_array(t) for t in _converted("group")[1].graph.initializer}
    assert any(not np.array_equal(unfitted[n], shared[n]) for n in shared)  # calibration did change something


@pytest.mark.parametrize("providers,shared", [(("CPUExecutionProvider",), True),
                                              (("CUDAExecutionProvider", "CPUExecutionProvider"), False)])
def test_only_cpu_calibration_sessions_use_the_shared_arena(monkeypatch, providers, shared):
    import normswap.onnx.calibrate as calibration
    from normswap.validate import runner
    asked = {}
    monkeypatch.setattr(runner, "make_session", lambda *a, **k: asked.update(k))
    calibration._Runner(onnx.ModelProto(), None, "c0", None, providers, "/tmp", False, None).session(None, 0)
    assert asked["shared_arena"] is shared and asked["optimize"] is True


@pytest.mark.parametrize("registered", [True, False])
def test_kept_values_stay_in_the_shared_arena_unless_they_would_pin_or_fragment_it(monkeypatch, registered):
    """A value the next segment reads last stays the OrtValue the session wrote -- with private arenas only
    while it is small (a large one would pin its dead session's arena); one read beyond the next segment is
    copied out either way (it would fragment the arena for as long as it lives)."""
    import normswap.onnx.calibrate as calibration
    from normswap.activation_store import ActivationStore
    from normswap.onnx.segments import Plan, Segment
    monkeypatch.setattr(shared_arena, "_STATE", {"registered": registered})
    monkeypatch.setattr(calibration, "COPY_BYTES", 64)
    store = ActivationStore(1 << 30, "/tmp", calibration.host_array, None, calibration._ort_nbytes)
    plan = Plan([], {}, {"next": 1, "large": 1, "far": 3})
    runner = calibration._Runner(onnx.ModelProto(), plan, "c0", store, (CPU,), "/tmp", False, None)
    sizes = {"next": 4, "large": 32, "far": 4}  # float32: 16, 128 and 16 bytes
    values = {n: ort.OrtValue.ortvalue_from_numpy(np.full(k, i, np.float32)) for i, (n, k) in enumerate(sizes.items())}
    runner.keep(Segment(0, [], [], list(values)), 0, values)
    kept = {n: store.get(runner.key(n), 0) for n in values}
    assert isinstance(kept["next"], ort.OrtValue)
    assert isinstance(kept["large"], ort.OrtValue) is registered
    assert isinstance(kept["far"], np.ndarray)
    np.testing.assert_array_equal(calibration.host_array(kept["far"]), np.full(4, 2, np.float32))
