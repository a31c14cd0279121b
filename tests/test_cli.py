"""The CLI through a real subprocess: exit codes, one-line errors, reports and the files left behind."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.builders import conv_bn

FIXTURES = Path(__file__).parent.parent / "fixtures"


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "normswap.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save_model(conv_bn(np.random.default_rng(0)), str(p))
    return p


def test_convert_writes_default_output_and_json_report(model_path, tmp_path):
    r = cli("convert", model_path, "--to", "fold", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "1 folded" in r.stdout and "CPUExecutionProvider" in r.stdout
    out = tmp_path / "m.fold.onnx"
    assert out.exists() and "BatchNormalization" not in [n.op_type for n in onnx.load(str(out)).graph.node]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"] == "fold" and report["passed"] is True
    layer = report["layers"][0]
    assert {"name", "action", "reason", "channels"} <= set(layer) and layer["action"] == "folded"
    assert layer["channels"] == 6
    v = report["validation"]
    assert v["providers"] == ["CPUExecutionProvider"]
    assert {"name", "max_abs", "max_rel", "mean_abs", "cosine", "top1_agreement", "passed"} <= set(v["outputs"][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.fold.onnx", "m.onnx", "r.json"]


def test_report_to_stdout_is_pure_json(model_path):
    r = cli("convert", model_path, "--to", "affine", "--report", "-")
    assert r.returncode == 0 and json.loads(r.stdout)["layers"][0]["action"] == "affine"


def test_output_equal_to_input_is_refused_unless_in_place(model_path, tmp_path):
    before = model_path.read_bytes()
    r = cli("convert", model_path, "--to", "fold", "-o", model_path)
    assert r.returncode == 2 and "--in-place" in r.stderr and model_path.read_bytes() == before
    link = tmp_path / "link.onnx"
    os.symlink(model_path, link)
    assert cli("convert", model_path, "--to", "fold", "-o", link).returncode == 2
    r = cli("convert", model_path, "--to", "fold", "--in-place")
    assert r.returncode == 0 and model_path.read_bytes() != before
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(model_path)).graph.node]


@pytest.mark.parametrize("content", [b"", b"\x80\x04K\x01.", b"just text\n"])
def test_invalid_input_exits_3_with_one_line(tmp_path, content):
    p = tmp_path / "bad.onnx"
    p.write_bytes(content)
    r = cli("convert", p, "--to", "fold")
    assert r.returncode == 3
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("normswap: error:") and "Traceback" not in r.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.onnx"]


def test_debug_shows_the_traceback(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"")
    r = cli("--debug", "convert", p, "--to", "fold")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_usage_errors_exit_2(model_path):
    for args in (["--to", "nonsense"], ["--to", "fold", "-o", str(model_path.parent)]):
        r = cli("convert", model_path, *args)  # click's own errors are one line too
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--help" in r.stderr, r.stderr
    assert cli("convert", model_path).returncode == 2  # --to is required
    r = cli("convert", model_path, "--to", "fold", "--input-shape", "x:a,b")
    assert r.returncode == 2 and "--input-shape" in r.stderr
    assert cli("convert", model_path.parent / "missing.onnx", "--to", "fold").returncode == 2


def test_cuda_required_but_unusable_exits_4(model_path):
    import onnxruntime as ort
    from normswap.validate.providers import cuda_status
    if cuda_status(ort)[0]:
        pytest.skip("CUDA is usable on this machine")
    r = cli("convert", model_path, "--to", "fold", "--provider", "cuda")
    assert r.returncode == 4 and "CUDA was requested" in r.stderr
    assert not (model_path.parent / "m.fold.onnx").exists()


def test_unwritable_output_exits_5(model_path, tmp_path):
    r = cli("convert", model_path, "--to", "fold", "-o", tmp_path / "no" / "such" / "dir.onnx")
    assert r.returncode == 5 and "does not exist" in r.stderr


def test_validation_failure_exits_1_and_publishes_nothing(model_path, tmp_path):
    # --atol 0 --rtol 0 demands bit-exactness, which a fold in float32 cannot give
    out = tmp_path / "o.onnx"
    r = cli("convert", model_path, "--to", "fold", "--atol", "0", "--rtol", "0", "-o", out,
            "--report", tmp_path / "r.json")
    assert r.returncode == 1 and not out.exists() and "nothing written" in r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    r = cli("convert", model_path, "--to", "fold", "--atol", "0", "--rtol", "0", "-o", out, "--keep-invalid")
    assert r.returncode == 1 and out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_validate_command(model_path, tmp_path):
    cli("convert", model_path, "--to", "fold", "--no-validate")
    folded = tmp_path / "m.fold.onnx"
    r = cli("validate", model_path, folded, "--report", tmp_path / "v.json")
    assert r.returncode == 0 and "passed" in r.stdout
    assert json.loads((tmp_path / "v.json").read_text())["passed"] is True
    other = tmp_path / "other.onnx"
    onnx.save_model(conv_bn(np.random.default_rng(99)), str(other))
    r = cli("validate", model_path, other)
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_inspect_lists_sites_as_table_and_json(model_path):
    r = cli("inspect", model_path)
    assert r.returncode == 0 and "BatchNormalization" in r.stdout and "1 foldable" in r.stdout
    sites = json.loads(cli("inspect", model_path, "--json").stdout)["sites"]
    assert sites[0]["producer_op"] == "Conv" and sites[0]["foldable"] is True and sites[0]["channels"] == 6


def test_quick_start_fixture(tmp_path):
    for name in ("digits_resnet.onnx", "digits_heldout.npz"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    r = cli("convert", "digits_resnet.onnx", "--to", "fold", "--inputs", "digits_heldout.npz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "6 folded" in r.stdout and (tmp_path / "digits_resnet.fold.onnx").exists()


def test_group_with_calibration_and_gates(tmp_path):
    for name in ("digits_resnet.onnx", "digits_heldout.npz"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    x = np.load(tmp_path / "digits_heldout.npz")["x"]
    np.savez(tmp_path / "calib.npz", x=x[:200])
    np.savez(tmp_path / "held.npz", x=x[200:])
    r = cli("convert", "digits_resnet.onnx", "--to", "group", "--groups", "auto", "--calibrate", "calib.npz",
            "--inputs", "held.npz", "--min-agreement", "0.97", "--report", "r.json", "--calibration-memory", "1M",
            "--refine-seconds", "10", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "calibration: 200 samples, 7 segments, each model run once" in r.stdout and "fidelity" in r.stdout
    assert "activations kept in memory and disk" in r.stdout and "budget 1.0 MiB" in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"] == "group" and report["exact"] is False and report["function_preserved"] is True
    assert all(layer["groups"] and layer["calibrated"] and layer["drift_cosine"] for layer in report["layers"])
    assert report["calibration"]["layers_changed"] and report["validation"]["check"] == "fidelity"
    calibration = report["calibration"]
    assert calibration["segments"] == 7 and calibration["passes"] == 1 and calibration["memory_budget"] == 1 << 20
    assert calibration["spilled_bytes"] > 0 and calibration["batch_layout"] == "batches of 64"
    refinement = calibration["refinement"]  # on by default, within the budget given
    assert refinement["budget_seconds"] == 10 and refinement["steps"] > 0 and refinement["heldout_samples"] > 0
    assert "refine" in r.stdout
    assert (tmp_path / "digits_resnet.group.onnx").exists()
    r = cli("convert", "digits_resnet.onnx", "--to", "instance", "--inputs", "held.npz", "--min-cosine", "0.99",
            cwd=tmp_path)
    assert r.returncode == 1 and "NOT" in r.stderr and not (tmp_path / "digits_resnet.instance.onnx").exists()


def test_replacement_option_errors_exit_2(model_path):
    assert cli("convert", model_path, "--to", "group", "--groups", "0").returncode == 2
    assert cli("convert", model_path, "--to", "layer", "--layer-over", "rows").returncode == 2
    assert cli("convert", model_path, "--to", "group", "--min-cosine", "2").returncode == 2
    r = cli("convert", model_path, "--to", "group", "--opset", "9")
    assert r.returncode == 2 and "only upgrades" in r.stderr


def test_validate_fidelity_check_and_gate(model_path, tmp_path):
    other = tmp_path / "other.onnx"
    onnx.save_model(conv_bn(np.random.default_rng(99)), str(other))
    r = cli("validate", model_path, other, "--check", "fidelity")
    assert r.returncode == 0 and "fidelity, no gate" in r.stdout
    r = cli("validate", model_path, other, "--check", "fidelity", "--min-cosine", "0.9999")
    assert r.returncode == 1 and "FAIL" in r.stdout


@pytest.mark.parametrize("size", ["lots", "-1G", "G"])
def test_a_calibration_memory_that_is_not_a_size_exits_2(model_path, size):
    r = cli("convert", model_path, "--to", "group", "--calibration-memory", size)
    assert r.returncode == 2 and f"--calibration-memory '{size}'" in r.stderr and len(r.stderr.splitlines()) == 1


# --- nothing normswap writes is, or overwrites, what it reads ------------------------------------------------

def _external_model(tmp_path) -> tuple[Path, Path]:
    m = conv_bn(np.random.default_rng(0))
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.bin",
                    size_threshold=0)
    return path, tmp_path / "ext.bin"


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("args", [
    ["convert", "m.onnx", "--to", "fold", "--report", "m.onnx"],          # the report would replace the input
    ["validate", "m.onnx", "m.onnx", "--report", "m.onnx"],
    ["convert", "m.onnx", "--to", "fold", "-o", "out.onnx", "--report", "out.onnx"],  # report = model output
    ["convert", "m.onnx", "--to", "fold", "-o", "m.onnx"],                # without --in-place
    ["convert", "m.onnx", "--to", "fold", "-o", ""],
])
def test_an_output_that_collides_exits_2_and_writes_nothing(model_path, args):
    before = _snapshot(model_path.parent)
    r = cli(*args, cwd=model_path.parent)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert _snapshot(model_path.parent) == before


def test_an_output_naming_the_inputs_external_data_is_refused(tmp_path):
    path, data = _external_model(tmp_path)
    before = _snapshot(tmp_path)
    for args in (["-o", data.name], ["--report", data.name], ["--in-place", "-o", data.name]):
        r = cli("convert", path.name, "--to", "fold", *args, cwd=tmp_path)
        assert r.returncode == 2 and "reads" in r.stderr, (args, r.stderr)
        assert _snapshot(tmp_path) == before
    ok = cli("convert", path.name, "--to", "fold", "-o", "fine.onnx", cwd=tmp_path)  # the positive case
    assert ok.returncode == 0, ok.stderr and (tmp_path / "fine.onnx").exists()


def test_a_report_in_a_missing_folder_exits_5_before_the_model_is_written(model_path):
    r = cli("convert", model_path, "--to", "fold", "--report", model_path.parent / "no" / "r.json")
    assert r.returncode == 5 and "does not exist" in r.stderr
    assert not (model_path.parent / "m.fold.onnx").exists()


def test_in_place_through_a_symlink_updates_the_real_model_and_keeps_the_link(model_path):
    link = model_path.parent / "link.onnx"
    link.symlink_to(model_path.name)
    r = cli("convert", link, "--to", "fold", "--in-place")
    assert r.returncode == 0, r.stderr
    assert link.is_symlink() and os.readlink(link) == model_path.name
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(str(model_path)).graph.node]


def test_the_api_refuses_to_save_over_the_external_data_it_reads(tmp_path):
    import normswap
    path, data = _external_model(tmp_path)
    before = data.read_bytes()
    result = normswap.convert(path, to="fold", validate=False)
    with pytest.raises(normswap.UsageError, match="reads"):
        result.save(data)
    assert data.read_bytes() == before
    result.save(tmp_path / "other.onnx")  # anywhere else is fine
    assert (tmp_path / "other.onnx").exists()


@pytest.mark.parametrize("sig,code", [(2, 130), (15, 143)])  # SIGINT, SIGTERM
def test_an_interrupted_run_exits_with_the_signal_code_and_leaves_no_temporary_file(model_path, sig, code):
    import signal
    import time
    slow = ("import sys, time, normswap.api as api, normswap.cli as cli\n"
            "def convert(*args, **kwargs):\n"
            "    open('started', 'w').close()\n"
            "    time.sleep(60)\n"
            "api.convert = convert\n"
            "sys.argv = ['normswap', 'convert', 'm.onnx', '--to', 'fold']\n"
            "cli.main()\n")
    proc = subprocess.Popen([sys.executable, "-c", slow], cwd=model_path.parent, stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if (model_path.parent / "started").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.Signals(sig))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in model_path.parent.iterdir()) == ["m.onnx", "started"]


def test_a_closed_stdout_pipe_does_not_stop_the_job(model_path):
    proc = subprocess.Popen([sys.executable, "-m", "normswap.cli", "convert", str(model_path), "--to", "fold"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # like `| head` that has read enough
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert (model_path.parent / "m.fold.onnx").exists() and "Traceback" not in err and "error" not in err


def test_messages_name_flags_on_the_command_line_and_keywords_in_python(tmp_path):
    import normswap
    from normswap.errors import option
    m = conv_bn(np.random.default_rng(0))
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    p = tmp_path / "sym.onnx"
    onnx.save_model(m, str(p))
    r = cli("convert", p, "--to", "fold")
    assert r.returncode == 2 and "--input-shape x:D0,D1,..." in r.stderr and "input_shapes=" not in r.stderr
    with pytest.raises(normswap.UsageError) as info:
        normswap.convert(m, to="fold")
    assert "input_shapes={'x': (D0, D1, ...)}" in str(info.value) and "--input-shape" not in str(info.value)
    assert option("groups", 7) == "groups=7" and option("calibration") == "calibration="


def test_groups_as_asked_are_summarized_and_an_ungated_fidelity_check_is_measured_not_passed(model_path, tmp_path):
    r = cli("convert", model_path, "--to", "group", "--groups", "3", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "1 converted (G=3 x1)" in r.stdout and "measured" in r.stdout
    assert "\nfunction_preserved: false\n" in r.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is None and report["validation"]["passed"] is None
    assert report["layers"][0]["groups"] == 3 and report["function_preserved"] is False
    gated = cli("convert", model_path, "--to", "group", "--groups", "3", "--min-cosine", "-1", "-o",
                tmp_path / "g.onnx", "--report", tmp_path / "g.json")
    assert gated.returncode == 0 and json.loads((tmp_path / "g.json").read_text())["passed"] is True


@pytest.mark.parametrize("args,message", [
    (["--to", "group", "--groups", "8", "--group-size", "2"], "pass --groups 8 or --group-size 2, not both"),
    (["--to", "layer", "--groups", "8"], "--groups 8 applies to --to group only, not --to layer"),
    (["--to", "fold", "--group-size", "4"], "--group-size 4 applies to --to group only"),
    (["--to", "group", "--groups", "many"], "--groups many must be a positive integer or 'auto'"),
    (["--to", "group", "--groups", "0"], "--groups 0 must be a positive integer"),
])
def test_conflicting_or_ignored_group_options_exit_2_quoting_what_was_typed(model_path, tmp_path, args, message):
    r = cli("convert", model_path, *args, "-o", tmp_path / "never.onnx")
    assert r.returncode == 2 and message in r.stderr and not (tmp_path / "never.onnx").exists()


def test_a_model_without_batchnorm_is_nothing_to_convert_and_nothing_is_written(tmp_path):
    from onnx import helper
    from tests.builders import model, out, vi
    p = tmp_path / "relu.onnx"
    onnx.save_model(model([helper.make_node("Relu", ["x"], ["y"])], [vi("x", [2, 3])], [out("y", 2)]), str(p))
    r = cli("convert", p, "--to", "fold", "--report", tmp_path / "r.json")
    assert r.returncode == 0 and "nothing to convert" in r.stdout
    assert not (tmp_path / "relu.fold.onnx").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layers"] == [] and any("nothing to convert" in n for n in report["notes"])


def test_a_conversion_that_grows_the_model_a_lot_says_so(tmp_path):
    """A Caffe2-era 'light' model computes its weights with ConstantFill: folding stores them."""
    import onnx.backend.test
    light = Path(onnx.backend.test.__file__).parent / "data" / "light" / "light_resnet50.onnx"
    if not light.exists():
        pytest.skip("this onnx build ships no light models")
    shutil.copy(light, tmp_path / "light.onnx")
    r = cli("convert", tmp_path / "light.onnx", "--to", "fold", "--no-validate", "--report", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    assert "note: the written model is" in r.stdout and "x the size of the input" in r.stdout
    assert any("the written model is" in n for n in json.loads((tmp_path / "r.json").read_text())["notes"])
    small = cli("convert", tmp_path / "light.onnx", "--to", "affine", "--no-validate", "-o", tmp_path / "a.onnx")
    assert small.returncode == 0 and "the written model is" not in small.stdout


def test_inspect_ends_with_totals_by_action_and_by_reason(tmp_path):
    from onnx import helper
    from tests.builders import bn_node, bn_params, model, out, vi
    names, params = bn_params(6, np.random.default_rng(0))
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=1, name="cat"), bn_node("c", "y", names)]
    p = tmp_path / "cat.onnx"
    onnx.save_model(model(nodes, [vi("a", [2, 2, 4, 4]), vi("b", [2, 4, 4, 4])], [out("y", 4)], params), str(p))
    r = cli("inspect", p)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[-2] == "by action: affine 1"
    assert lines[-1].startswith("  1 x not foldable: its input is produced by Concat '…'")


@pytest.mark.parametrize("args, words", [
    (("compare", FIXTURES / "digits_resnet.onnx", "--targets", "fold,bogus"), "--targets"),
    (("compare", FIXTURES / "digits_resnet.onnx", "--groups", "many"), "--groups"),
    (("inspect", FIXTURES / "digits_resnet.onnx", "--batch-sensitivity", FIXTURES / "digits_heldout.npz",
      "--batch-sizes", "0,2"), "--batch-sizes"),
    (("inspect", FIXTURES / "digits_resnet.onnx", "--batch-sensitivity", FIXTURES / "digits_heldout.npz",
      "--batches", "0"), "--batches")])
def test_compare_and_sensitivity_usage_errors(args, words):
    r = cli(*args)
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_compare_json_on_stdout():
    r = cli("compare", FIXTURES / "digits_resnet.onnx", "--targets", "fold,affine", "--purpose", "deploy",
            "--inputs", FIXTURES / "digits_heldout.npz", "--report", "-")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [row["target"] for row in data["rows"]] == ["fold", "affine"] and data["recommended"] in ("fold", "affine")
