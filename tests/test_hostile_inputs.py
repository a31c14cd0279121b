"""Issue 19: what a hostile attack fed normswap -- huge declared shapes, wrong data files, invalid UTF-8, sparse
initializers, terminal escapes in names -- ends in one line with a documented exit code, never exit 70."""
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import normswap
from normswap.errors import InvalidModelError, UnsupportedError
from tests.builders import conv_bn, model, out, run, vi


def cli(*args):
    return subprocess.run([sys.executable, "-m", "normswap.cli", *map(str, args)], capture_output=True, text=True)


def _one_line(r):
    return len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_huge_declared_input_is_refused_before_allocating(tmp_path):
    """#8: an input declared [1,3,100000,100000] (random validation inputs of 112 GiB)."""
    m = conv_bn(np.random.default_rng(0))
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 100000
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 100000
    path = tmp_path / "huge.onnx"
    onnx.save_model(m, str(path))
    r = cli("convert", path, "--to", "fold", "-o", tmp_path / "out.onnx")
    assert r.returncode == 4 and "GiB of memory" in r.stderr and "100000" in r.stderr and _one_line(r)
    assert not (tmp_path / "out.onnx").exists()
    small = conv_bn(np.random.default_rng(0))
    small.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"  # a free batch: 1e12 samples asked
    with pytest.raises(UnsupportedError, match="memory"):
        normswap.validate(small, small, input_shapes={"x": (10**12, 4, 5, 5)})


def _cli_patched(tmp_path, patch: str, *args) -> subprocess.CompletedProcess:
    """The CLI run in a fresh interpreter after ``patch`` (Python source) on a small model (``{model}`` in args)."""
    path = tmp_path / "m.onnx"
    onnx.save_model(conv_bn(np.random.default_rng(0)), str(path))
    argv = [str(path) if a == "{model}" else str(a) for a in args]
    code = f"{patch}\nfrom normswap.cli import main\nmain({argv!r})\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("error", ["MemoryError()", "RuntimeError('Non-zero status code: std::bad_alloc')"])
def test_running_out_of_memory_anyway_is_one_line_with_exit_4(tmp_path, error):
    """Python's MemoryError, and a native library's failed allocation (onnxruntime under ulimit -v)."""
    p = _cli_patched(tmp_path, "import importlib; r = importlib.import_module('normswap.validate.runner')\n"
                     f"def boom(*a, **k): raise {error}\nr.validate_many = boom",
                     "convert", "{model}", "--to", "fold", "-o", tmp_path / "o.onnx")
    assert p.returncode == 4 and "ran out of memory" in p.stderr and _one_line(p)


@pytest.mark.parametrize("kind", ["npy", "text", "pickle"])
def test_a_data_file_that_is_not_an_npz_says_what_it_is(tmp_path, kind):
    """#9 and #14: a .npy, a text file and a pickle given as --inputs / --calibrate / --batch-sensitivity."""
    import pickle
    path = tmp_path / "data.npz"
    if kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros((2, 4, 5, 5), np.float32))
    elif kind == "text":
        path.write_text("x,y\n1,2\n")
    else:
        path.write_bytes(pickle.dumps({"x": [1, 2]}))
    m = tmp_path / "m.onnx"
    onnx.save_model(conv_bn(np.random.default_rng(0)), str(m))
    expected = {"npy": "single .npy array", "text": "a text file", "pickle": "never unpickles"}[kind]
    for args in (("convert", m, "--to", "fold", "--inputs", path), ("convert", m, "--to", "group", "--calibrate", path),
                 ("inspect", m, "--batch-sensitivity", path)):
        r = cli(*args)
        assert r.returncode == 3 and expected in r.stderr and _one_line(r), (args, r.stderr)


def test_an_npz_whose_header_declares_more_than_it_holds_is_refused_before_allocating(tmp_path):
    """#10: a member header promising a 256 GB array."""
    path = tmp_path / "bomb.npz"
    header = {"descr": "<f4", "fortran_order": False, "shape": (64 * 2**30, 1)}
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", buf.getvalue() + b"\0" * 64)
    from normswap.validate.inputs import load_npz_arrays
    with pytest.raises(InvalidModelError, match="declares"):
        load_npz_arrays(path)
    np.savez(tmp_path / "ok.npz", x=np.ones((2, 3), np.float32))
    assert load_npz_arrays(tmp_path / "ok.npz")["x"].shape == (2, 3)


def test_an_npz_of_python_objects_is_refused():
    import tempfile
    from normswap.validate.inputs import load_npz_arrays
    with tempfile.TemporaryDirectory() as d:
        np.savez(f"{d}/o.npz", x=np.array([{"a": 1}], dtype=object), allow_pickle=True)
        with pytest.raises(InvalidModelError, match="Python objects"):
            load_npz_arrays(f"{d}/o.npz")


@pytest.mark.parametrize("field", ["node name", "graph name", "doc_string", "initializer name", "producer_name"])
def test_names_that_are_not_utf8_are_invalid_input(tmp_path, field):
    """#11: invalid UTF-8 wherever a model carries text."""
    m = conv_bn(np.random.default_rng(0))
    marker = "ZQZQZQ"
    if field == "node name":
        m.graph.node[0].name = marker
    elif field == "graph name":
        m.graph.name = marker
    elif field == "doc_string":
        m.graph.node[1].doc_string = marker
    elif field == "initializer name":
        m.graph.initializer[2].name = marker  # bn.gamma's name (the node still reads the old one: refused anyway)
    else:
        m.producer_name = marker
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString().replace(marker.encode(), b"Z\xff\xfeQZQ"))
    for args in (("convert", path, "--to", "fold"), ("inspect", path)):
        r = cli(*args)
        assert r.returncode == 3 and _one_line(r), (args, r.stderr)
    assert "UTF-8" in cli("inspect", path).stderr


def test_a_sparse_initializer_defines_a_value():
    """#12: a node reading a sparse initializer is not "out of topological order"."""
    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "s")
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "s_idx")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    m = model([helper.make_node("Add", ["x", "s"], ["y"])], [vi("x", [4])], [out("y", 1)], opset=17)
    m.graph.sparse_initializer.append(sparse)
    x = {"x": np.zeros(4, np.float32)}
    np.testing.assert_allclose(run(m, x)[0], [1, 0, 0, 2])  # onnxruntime runs it
    from normswap.onnx.structure import check_structure
    check_structure(m)
    broken = model([helper.make_node("Add", ["x", "t"], ["y"])], [vi("x", [4])], [out("y", 1)], opset=17)
    with pytest.raises(InvalidModelError, match="topological"):
        check_structure(broken)


def test_control_characters_in_names_never_reach_the_terminal_raw(tmp_path):
    """#13: OSC title escapes, BEL, CR/LF and NUL in a node name are printed escaped; the JSON keeps them."""
    import json
    m = conv_bn(np.random.default_rng(0))
    evil = "bn\x1b]0;pwned\x07\r\nFORGED LINE\x00"
    m.graph.node[1].name = evil
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path))
    for args in (("inspect", path), ("convert", path, "--to", "fold", "--report", tmp_path / "r.json")):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        for raw in ("\x1b", "\x07", "\r", "\x00"):
            assert raw not in r.stdout and raw not in r.stderr
        assert not any(line.startswith("FORGED") for line in r.stdout.splitlines())
        assert "\\x1b]0;pwned" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["layers"][0]["name"] == evil


def test_printable_escapes_controls_and_bidi_overrides():
    from normswap.terminal import printable
    assert printable("a\x1b[2Jb\u202ec") == "a\\x1b[2Jb\\u202ec"
    assert printable("line\nnext", keep="\n") == "line\nnext"
    assert printable("plain name.0") == "plain name.0"


def test_python_dash_m_normswap_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "normswap", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "Usage: normswap" in r.stdout


def test_ctrl_c_landing_as_a_run_finishes_still_exits_130(tmp_path):
    """#14: a SIGINT after the command's work, while click closes the context (outside invoke)."""
    p = _cli_patched(tmp_path, "import click\ndef late(self, *a, **k): raise KeyboardInterrupt()\n"
                     "click.Context.__exit__ = late", "inspect", "{model}")
    assert p.returncode == 130 and "interrupted" in p.stderr and "Traceback" not in p.stderr


def test_numpy_runtime_warnings_never_reach_stderr(tmp_path):
    """#14: values near 3e38 make numpy warn with a source line; the CLI prints its own lines only."""
    p = _cli_patched(tmp_path, "import numpy as np\nimport normswap.onnx.convert as c\nreal = c.convert_in_place\n"
                     "def noisy(*a, **k):\n    np.float32(3e38) * np.float32(10)\n    return real(*a, **k)\n"
                     "c.convert_in_place = noisy", "convert", "{model}", "--to", "fold", "-o", tmp_path / "o.onnx")
    assert p.returncode == 0, p.stderr
    assert "RuntimeWarning" not in p.stderr and "overflow" not in p.stderr


def test_a_torch_export_without_batchnorm_says_the_exporter_folded_it(tmp_path):
    from onnx import helper
    m = model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [out("y", 2)], opset=17,
              producer_name="pytorch")
    path = tmp_path / "m.onnx"
    onnx.save_model(m, str(path))
    r = cli("convert", path, "--to", "fold")
    assert r.returncode == 0 and "optimize=False" in r.stdout
    m.producer_name = "other"
    onnx.save_model(m, str(path))
    assert "optimize=False" not in cli("convert", path, "--to", "fold").stdout


def test_inspect_prints_the_table_before_measuring_batch_sensitivity(tmp_path):
    from pathlib import Path as P
    fixtures = P(__file__).parent.parent / "fixtures"
    r = cli("inspect", fixtures / "digits_resnet.onnx", "--batch-sensitivity", fixtures / "digits_heldout.npz",
            "--batch-sizes", "1,8", "--batches", "2")
    assert r.returncode == 0, r.stderr
    assert 0 <= r.stdout.index("normalization site(s)") < r.stdout.index("batch-size sensitivity")


@pytest.mark.parametrize("where", ["If branch node name", "Constant tensor name", "external data value", "none"])
def test_the_fast_text_walk_finds_what_the_naming_walk_finds(where):
    """check_text walks the model once without naming fields, and names the field only when that walk found one:
    both walks must agree wherever text can hide (subgraphs, tensor attributes, external-data entries)."""
    from onnx import helper
    from normswap.onnx.structure import _holds_bytes, _text_fields
    marker = "ZQZQZQ"
    branch = helper.make_graph([helper.make_node("Neg", ["a"], ["b"], name=marker if "If" in where else "neg")],
                               "then", [], [helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, None)])
    value = numpy_helper.from_array(np.ones(2, np.float32), marker if "Constant" in where else "t")
    m = onnx.helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], ["a"], value=value),
         helper.make_node("If", ["c"], ["o"], then_branch=branch, else_branch=branch)], "g",
        [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("o", onnx.TensorProto.FLOAT, None)]))
    init = numpy_helper.from_array(np.ones(2, np.float32), "w")
    init.data_location = onnx.TensorProto.EXTERNAL
    init.external_data.add(key="location", value=marker if "external" in where else "w.bin")
    m.graph.initializer.append(init)
    parsed = onnx.ModelProto()
    parsed.ParseFromString(m.SerializeToString().replace(marker.encode(), b"Z\xff\xfeQZQ"))
    slow = any(isinstance(v, bytes) for _, v in _text_fields(parsed, ""))
    assert _holds_bytes(parsed) == slow == (where != "none")
