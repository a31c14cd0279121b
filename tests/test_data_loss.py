"""Issue 19: the data-loss paths a hostile attack found -- nothing a command reads is ever removed or overwritten,
and a model and its data always come from one run."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.builders import conv_bn, run


def cli(*args):
    return subprocess.run([sys.executable, "-m", "normswap.cli", *map(str, args)], capture_output=True, text=True)


def _external_model(folder: Path, name="model.onnx", cin=16, cout=32) -> tuple[Path, onnx.ModelProto]:
    m = conv_bn(np.random.default_rng(0), cin=cin, cout=cout)
    path = folder / name
    copy = onnx.ModelProto()
    copy.CopyFrom(m)  # onnx.save_model turns the tensors it stores outside into references
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.data", size_threshold=0)
    return path, m


def _feeds(m):
    shape = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    return {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


def test_a_copy_that_shares_the_data_file_survives_being_converted_over_the_original(tmp_path):
    """#1: cp model.onnx backup.onnx (both read model.onnx.data); convert backup.onnx -o model.onnx."""
    model, m = _external_model(tmp_path)
    backup = tmp_path / "backup.onnx"
    shutil.copy(model, backup)
    expected = run(m, _feeds(m))[0]
    r = cli("convert", backup, "--to", "fold", "-o", model)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "model.onnx.data").exists()
    loaded = onnx.load(str(backup))  # the backup still reads its data, and computes what it did
    np.testing.assert_allclose(run(loaded, _feeds(m))[0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(onnx.load(str(model)), _feeds(m))[0], expected, rtol=1e-4, atol=1e-4)


def test_a_report_named_like_the_outputs_data_file_is_refused_before_any_work(tmp_path):
    """#2: --report out.onnx.data would replace the new model's data file."""
    model, _ = _external_model(tmp_path)
    out = tmp_path / "out.onnx"
    r = cli("convert", model, "--to", "fold", "-o", out, "--report", tmp_path / "out.onnx.data")
    assert r.returncode == 2 and "data file of the output" in r.stderr
    assert not out.exists() and not (tmp_path / "out.onnx.data").exists()


def test_the_data_files_of_a_large_model_are_found_without_loading_it(tmp_path):
    """#3: a model file over 64 MB whose weights are partly external: its data file is an input at any size."""
    from onnx import numpy_helper
    from normswap.paths import external_files
    m = conv_bn(np.random.default_rng(0))
    big = numpy_helper.from_array(np.zeros(17 << 20, np.float32), "padding")  # 68 MB inline, unused
    m.graph.initializer.append(big)
    w = next(t for t in m.graph.initializer if t.name == "W")
    data = tmp_path / "w.data"
    data.write_bytes(numpy_helper.to_array(w).tobytes())
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "w.data"), ("offset", "0"), ("length", str(data.stat().st_size))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    model = tmp_path / "big.onnx"
    model.write_bytes(m.SerializeToString())
    assert model.stat().st_size > 64 << 20
    assert external_files(model) == [data]
    before = data.read_bytes()
    for args in (("convert", model, "--to", "fold", "--report", data), ("convert", model, "--to", "fold", "-o", data),
                 ("inspect", model, "--report", data)):
        r = cli(*args)
        assert r.returncode == 2 and "reads" in r.stderr, (args, r.stderr)
    assert data.read_bytes() == before


def test_two_runs_writing_the_same_output_never_mix_a_model_with_the_others_data(tmp_path):
    """#4: fold and affine to one -o at the same moment: whichever lands, model and data belong together, and no
    orphan data file stays behind."""
    model, m = _external_model(tmp_path, cin=8, cout=16)
    expected = run(m, _feeds(m))[0]
    out = tmp_path / "out.onnx"
    for _ in range(4):
        runs = [subprocess.Popen([sys.executable, "-m", "normswap.cli", "convert", str(model), "--to", target, "-o",
                                  str(out), "--no-validate", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for target in ("fold", "affine")]
        for p in runs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        np.testing.assert_allclose(run(onnx.load(str(out)), _feeds(m))[0], expected, rtol=1e-4, atol=1e-4)
        data_files = sorted(p.name for p in tmp_path.glob("out.onnx*.data"))
        assert len(data_files) == 1, data_files


def test_a_folder_lock_serializes_saves():
    import threading
    import time
    from normswap.onnx.io import folder_lock
    import tempfile
    order = []
    with tempfile.TemporaryDirectory() as d:
        def hold(tag):
            with folder_lock(Path(d)):
                order.append(f"{tag}+")
                time.sleep(0.2)
                order.append(f"{tag}-")
        threads = [threading.Thread(target=hold, args=(t,)) for t in "ab"]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])


@pytest.mark.parametrize("location,message", [("w\0x.bin", "no file can have"), ("ok.bin/x", "not a folder"),
                                              ("data/", "ends in")])
def test_impossible_locations_are_invalid_input_not_internal_errors(tmp_path, location, message):
    """#6, #7 and a location ending in '/': exit 3 with one line, from the CLI's first look at the files on."""
    m = conv_bn(np.random.default_rng(0))
    (tmp_path / "ok.bin").write_bytes(b"\0" * 4096)
    (tmp_path / "data").write_bytes(b"\0" * 4096)
    w = next(t for t in m.graph.initializer if t.name == "W")
    w.ClearField("raw_data")
    w.data_location = onnx.TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", location
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    for args in (("convert", path, "--to", "fold"), ("inspect", path), ("validate", path, path)):
        r = cli(*args)
        assert r.returncode == 3 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_a_nul_byte_in_an_attribute_tensors_location_is_invalid_input(tmp_path):
    """#6 for a tensor that lives in a node attribute (a Constant), not among the initializers."""
    from onnx import helper, numpy_helper
    m = conv_bn(np.random.default_rng(0))
    value = numpy_helper.from_array(np.zeros(6, np.float32), "c")
    value.ClearField("raw_data")
    value.data_location = onnx.TensorProto.EXTERNAL
    entry = value.external_data.add()
    entry.key, entry.value = "location", "c\0.bin"
    m.graph.node.insert(0, helper.make_node("Constant", [], ["unused_c"], value=value))
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    for args in (("convert", path, "--to", "fold"), ("inspect", path)):
        r = cli(*args)
        assert r.returncode == 3 and "no file can have" in r.stderr and "Traceback" not in r.stderr, r.stderr
