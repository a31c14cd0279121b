"""Safe loading (nothing unsafe read, nothing unpickled) and atomic saving, external data included."""
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest

import normswap
from normswap.errors import InvalidModelError, OutputError, UsageError
from normswap.onnx import io as nio
from tests.builders import conv_bn


def _external_model(tmp_path, rng=None):
    """A conv_bn model saved with its weights in model.onnx.data."""
    m = conv_bn(rng or np.random.default_rng(0), cin=16, cout=16)
    path = tmp_path / "model.onnx"
    scratch = onnx.ModelProto()
    scratch.CopyFrom(m)  # onnx.save_model moves the data out of the proto it is given
    onnx.save_model(scratch, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=0)
    return m, path


@pytest.mark.parametrize("content,expected", [
    (b"", "is empty"),
    (pickle.dumps({"a": 1}), "pickle"),
    (b"hello, I am text\n", "text file"),
    (b"\x08\x07\x12\xff\xff\xff", "not a valid ONNX model"),
])
def test_bad_files_are_refused_clearly(tmp_path, content, expected):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    with pytest.raises(InvalidModelError, match=expected):
        nio.load_model(p)


def test_zip_and_truncated_models_are_refused(tmp_path):
    z = tmp_path / "ckpt.onnx"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("data.pkl", b"x")
    with pytest.raises(InvalidModelError, match="zip"):
        nio.load_model(z)
    good = conv_bn(np.random.default_rng(0)).SerializeToString()
    t = tmp_path / "trunc.onnx"
    t.write_bytes(good[: len(good) // 2])
    with pytest.raises(InvalidModelError):
        nio.load_model(t)


def test_external_data_loads_when_safe(tmp_path):
    m, path = _external_model(tmp_path)
    loaded = nio.load_model(path)
    assert loaded.had_external_data
    w = next(t for t in loaded.model.graph.initializer if t.name == "W")
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(w),
                                  onnx.numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "W")))


def _set_location(path, **fields):
    m = onnx.load(path, load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == "W")
    for entry in t.external_data:
        if entry.key in fields:
            entry.value = str(fields.pop(entry.key))
    for key, value in fields.items():
        e = t.external_data.add()
        e.key, e.value = key, str(value)
    path.write_bytes(m.SerializeToString())


@pytest.mark.parametrize("fields,message", [
    ({"location": "/etc/passwd"}, "absolute"),
    ({"location": "../model.onnx.data"}, "escapes"),
    ({"location": "sub/../../x.data"}, "escapes"),
    ({"location": "missing.data"}, "missing"),
    ({"offset": 10**9}, "truncated"),
    ({"length": 12}, "does not belong"),
])
def test_unsafe_external_data_is_refused_before_reading(tmp_path, fields, message):
    _, path = _external_model(tmp_path)
    _set_location(path, **fields)
    with pytest.raises(InvalidModelError, match=message):
        nio.load_model(path)


def test_external_data_through_a_symlink_or_hardlink_is_refused(tmp_path):
    _, path = _external_model(tmp_path)
    (tmp_path / "model.onnx.data").rename(tmp_path / "real.data")
    os.symlink(tmp_path / "real.data", tmp_path / "model.onnx.data")
    with pytest.raises(InvalidModelError, match="link"):
        nio.load_model(path)
    os.unlink(tmp_path / "model.onnx.data")
    os.link(tmp_path / "real.data", tmp_path / "model.onnx.data")
    with pytest.raises(InvalidModelError, match="hard-linked"):
        nio.load_model(path)


def test_convert_never_modifies_input_or_its_external_data(tmp_path):
    _, path = _external_model(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = normswap.convert(path, to="fold")
    written = r.save(tmp_path / "out.onnx")
    assert {p.name for p in written} == {"out.onnx", "out.onnx.data"}  # input had external data: so does output
    for name, data in before.items():
        assert (tmp_path / name).read_bytes() == data
    assert normswap.validate(path, tmp_path / "out.onnx").passed


def test_large_models_are_saved_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(nio, "EXTERNAL_DATA_THRESHOLD", 1000)  # stand-in for the 2 GB protobuf limit
    m = conv_bn(np.random.default_rng(1), cin=16, cout=16)
    written = nio.save_model(m, tmp_path / "big.onnx")
    assert len(written) == 2 and written[1].stat().st_size > 0
    assert (tmp_path / "big.onnx").stat().st_size < m.ByteSize()
    back = nio.load_model(tmp_path / "big.onnx").model
    assert back.graph.initializer[0].raw_data == m.graph.initializer[0].raw_data
    assert m.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT  # the in-memory model is untouched


def test_save_errors_leave_no_temp_files(tmp_path):
    m = conv_bn(np.random.default_rng(2))
    with pytest.raises(OutputError, match="does not exist"):
        nio.save_model(m, tmp_path / "nope" / "m.onnx")

    class Boom(Exception):
        pass

    def failing(f):
        f.write(b"partial")
        raise Boom()

    (tmp_path / "m.onnx").write_bytes(b"old")
    with pytest.raises(Boom):
        nio.write_atomically(tmp_path / "m.onnx", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"old"


def test_killed_during_write_leaves_old_or_complete_new(tmp_path):
    dest = tmp_path / "m.onnx"
    old = conv_bn(np.random.default_rng(3), cin=8, cout=8)
    new = conv_bn(np.random.default_rng(4), cin=64, cout=64)
    dest.write_bytes(old.SerializeToString())
    new_path = tmp_path / "new.bin"
    new_path.write_bytes(new.SerializeToString())
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from normswap.onnx.io import write_atomically
        data = Path({str(new_path)!r}).read_bytes()
        def slow(f):
            for k in range(0, len(data), 4096):
                f.write(data[k:k + 4096]); f.flush()
                if k == 8192:
                    print("writing", flush=True); time.sleep(30)
        write_atomically(Path({str(dest)!r}), slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert dest.read_bytes() == old.SerializeToString()  # the old file, intact
    nio.write_atomically(dest, lambda f: f.write(new_path.read_bytes()))
    assert nio.load_model(dest).model == new  # the complete new one


def test_missing_input_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError):
        normswap.convert(tmp_path / "none.onnx")


def test_written_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    m = conv_bn(np.random.default_rng(5))
    old = os.umask(0o022)
    try:
        nio.save_model(m, tmp_path / "a.onnx")
        assert (tmp_path / "a.onnx").stat().st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "a.onnx", 0o600)
        nio.save_model(m, tmp_path / "a.onnx")  # replacing keeps the replaced file's mode
        assert (tmp_path / "a.onnx").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_external_data_is_converted_lazily_and_written_without_absolute_paths(tmp_path):
    m, path = _external_model(tmp_path)
    loaded = nio.load_model(path, lazy_external=True)
    w = next(t for t in loaded.model.graph.initializer if t.name == "W")
    assert w.data_location == onnx.TensorProto.EXTERNAL  # still in its file
    r = normswap.convert(path, to="fold")
    assert r.report.passed
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    r.save(out)
    saved = onnx.load(str(out), load_external_data=False)
    for t in saved.graph.initializer:
        for e in t.external_data:
            assert not (e.key == "location" and os.path.isabs(e.value))
    eager = normswap.convert(m, to="fold", validate=False).model
    back = nio.load_model(out).model
    for a, b in zip(sorted(back.graph.initializer, key=lambda t: t.name),
                    sorted(eager.graph.initializer, key=lambda t: t.name)):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    inline = tmp_path / "inline.onnx"
    r.save(inline, external_data=False)  # bound tensors are streamed into one file too
    assert normswap.validate(m, inline).passed


@pytest.mark.parametrize("location", ["bad\0name.bin", "x" * 300 + ".bin", "d/" * 2100 + "x.bin"])
def test_an_impossible_external_location_is_invalid_input(tmp_path, location):
    from normswap.errors import InvalidModelError
    from normswap.onnx.io import load_model
    m = conv_bn(np.random.default_rng(0))
    t = m.graph.initializer[0]
    t.data_location = onnx.TensorProto.EXTERNAL
    del t.external_data[:]
    t.external_data.add(key="location", value=location)
    t.ClearField("raw_data")
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(InvalidModelError, match="location no file can have"):
        load_model(path)


def test_external_data_entries_on_an_internal_tensor_are_invalid(tmp_path):
    from normswap.errors import InvalidModelError
    from normswap.onnx.io import load_model
    m = conv_bn(np.random.default_rng(0))
    m.graph.initializer[0].external_data.add(key="location", value="w.bin")  # data_location stays DEFAULT
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    with pytest.raises(InvalidModelError, match="not marked EXTERNAL"):
        load_model(path)


@pytest.mark.parametrize("target", ["fold", "group"])
def test_the_same_conversion_writes_the_same_bytes(tmp_path, target):
    import normswap
    fixtures = Path(__file__).parent.parent / "fixtures"
    x = np.load(fixtures / "digits_heldout.npz")["x"][:64]
    calibration = {"x": x} if target == "group" else None
    outputs = []
    for k in range(2):
        result = normswap.convert(fixtures / "digits_resnet.onnx", to=target, calibration=calibration,
                                  validate=False, progress=False, refine=False)
        result.save(tmp_path / f"run{k}.onnx")
        outputs.append((tmp_path / f"run{k}.onnx").read_bytes())
    assert outputs[0] == outputs[1]
    other = normswap.convert(fixtures / "digits_resnet.onnx", to="affine", validate=False, progress=False)
    other.save(tmp_path / "other.onnx")
    assert (tmp_path / "other.onnx").read_bytes() != outputs[0]  # the comparison can tell files apart


def test_stale_temporary_files_of_killed_runs_are_removed_on_the_next_write(tmp_path):
    import normswap
    from normswap.onnx.io import TEMP_TAG
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    stale = tmp_path / f".old.onnx.{TEMP_TAG}{gone.pid}-abc_1234.tmp"
    live = tmp_path / f".old.onnx.{TEMP_TAG}{os.getpid()}-def_5678.tmp"  # a run still writing
    foreign = tmp_path / ".notes.tmp"  # not normswap's
    lookalike = tmp_path / f".old.onnx.{TEMP_TAG}{gone.pid}-keep.tmp"  # not mkstemp's 8 characters
    for p in (stale, live, foreign, lookalike):
        p.write_bytes(b"partial")
    m = tmp_path / "m.onnx"
    onnx.save_model(conv_bn(np.random.default_rng(0)), str(m))
    normswap.convert(m, to="fold", validate=False, progress=False).save(tmp_path / "out.onnx")
    assert not stale.exists() and live.exists() and foreign.exists() and lookalike.exists()


def test_a_file_named_like_a_stale_temporary_is_never_removed_while_the_command_reads_it(tmp_path):
    """Issue 19 #5: an input (model, --inputs) whose name has the exact form of a dead run's temporary."""
    from normswap.onnx.io import TEMP_TAG
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    model = tmp_path / f".m.onnx.{TEMP_TAG}{gone.pid}-abcd_123.tmp"
    onnx.save_model(conv_bn(np.random.default_rng(0)), str(model))
    data = tmp_path / f".data.{TEMP_TAG}{gone.pid}-a.tmp.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32))
    r = subprocess.run([sys.executable, "-m", "normswap.cli", "convert", str(model), "--to", "fold", "--inputs",
                        str(data), "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert model.exists() and data.exists() and (tmp_path / "out.onnx").exists()


def _external(tensor: onnx.TensorProto, location: str) -> None:
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
    tensor.ClearField("raw_data")


@pytest.mark.parametrize("where", ["sparse_initializer", "sparse_attribute", "function_body", "subgraph"])
@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd"])
def test_every_tensor_of_the_model_gets_the_external_data_checks(tmp_path, where, location):
    from onnx import helper
    from normswap.errors import InvalidModelError
    from normswap.onnx.io import load_model
    m = conv_bn(np.random.default_rng(0))
    values = onnx.numpy_helper.from_array(np.ones(2, np.float32), "v")
    indices = onnx.numpy_helper.from_array(np.array([0, 3], np.int64), "i")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    if where == "sparse_initializer":
        m.graph.sparse_initializer.append(sparse)
        _external(m.graph.sparse_initializer[0].values, location)
    elif where == "sparse_attribute":
        node = helper.make_node("Constant", [], ["c"], sparse_value=sparse)
        _external(node.attribute[0].sparse_tensor.values, location)
        m.graph.node.append(node)
    elif where == "function_body":
        node = helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.ones(3, np.float32)))
        _external(node.attribute[0].t, location)
        m.functions.append(helper.make_function("local", "F", [], ["c"], [node], [helper.make_opsetid("", 17)]))
    else:
        body_const = helper.make_node("Constant", [], ["k"], value=onnx.numpy_helper.from_array(np.ones(1, np.float32)))
        _external(body_const.attribute[0].t, location)
        body = helper.make_graph([body_const], "body", [], [helper.make_tensor_value_info("k", 1, [1])])
        m.graph.node.append(helper.make_node("If", ["cond"], ["z"], then_branch=body, else_branch=body))
        m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(True), "cond"))
    path = tmp_path / "sub" / "m.onnx"
    path.parent.mkdir()
    path.write_bytes(m.SerializeToString())
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    with pytest.raises(InvalidModelError, match="absolute location|escapes the model's folder"):
        load_model(path)


def test_rewriting_an_external_data_model_keeps_one_data_file_beside_it(tmp_path):
    from normswap.onnx.io import load_model, save_model
    m = conv_bn(np.random.default_rng(0), cin=16, cout=32)  # a weight large enough to go to the data file
    out = tmp_path / "out.onnx"
    for _ in range(3):
        save_model(m, out, external_data=True)
        data = sorted(p.name for p in tmp_path.glob("out.onnx*.data"))
        assert len(data) == 1, data  # the data file of the replaced model went with it
        loaded = load_model(out).model
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]),
                                      onnx.numpy_helper.to_array(m.graph.initializer[0]))
    keep = tmp_path / "out.onnx.notes.txt.data"  # not a name normswap gives: never removed
    keep.write_bytes(b"x")
    save_model(m, out, external_data=True)
    assert keep.exists()


def test_a_failed_model_write_leaves_no_orphan_data_file(tmp_path, monkeypatch):
    import normswap.onnx.io as io
    m = conv_bn(np.random.default_rng(0), cin=16, cout=32)
    out = tmp_path / "out.onnx"
    io.save_model(m, out, external_data=True)
    before = sorted(p.name for p in tmp_path.iterdir())
    real = io.write_atomically

    def full_disk(dest, write, protected=()):
        if dest.suffix == ".onnx":
            raise normswap_errors().OutputError(f"cannot write '{dest}': No space left on device")
        return real(dest, write, protected)
    monkeypatch.setattr(io, "write_atomically", full_disk)
    with pytest.raises(normswap_errors().OutputError):
        io.save_model(m, out, external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # old model and its data untouched, nothing new


def normswap_errors():
    import normswap.errors
    return normswap.errors


def test_a_model_with_only_small_tensors_gets_no_empty_data_file(tmp_path):
    from normswap.onnx.io import save_model
    written = save_model(conv_bn(np.random.default_rng(0)), tmp_path / "small.onnx", external_data=True)
    assert written == [tmp_path / "small.onnx"] and not list(tmp_path.glob("*.data"))
