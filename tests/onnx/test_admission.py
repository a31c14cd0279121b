"""A model onnx.checker and onnxruntime both refuse is refused before converting; one only the checker objects
to is converted with a note; inspect says so too."""
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper

import normswap
from tests.builders import conv_bn, init


def _duplicate_definition() -> onnx.ModelProto:
    m = conv_bn(np.random.default_rng(0))
    m.graph.node[1].output[0] = "z"
    m.graph.node.append(helper.make_node("Identity", ["z"], ["c"]))  # 'c' is also the Conv's output
    m.graph.node.append(helper.make_node("Identity", ["c"], ["y"]))
    return m


def _type_clash() -> onnx.ModelProto:
    m = conv_bn(np.random.default_rng(0))
    m.graph.node[1].output[0] = "z"
    m.graph.node.append(helper.make_node("Add", ["z", "k"], ["y"]))
    m.graph.initializer.append(init("k", np.ones(1, np.int64)))  # float + int64
    return m


@pytest.mark.parametrize("broken,what", [(_duplicate_definition, "Duplicate definition"),
                                         (_type_clash, "inconsistent type")])
def test_a_model_both_refuse_is_refused_before_converting(broken, what):
    with pytest.raises(normswap.InvalidModelError, match="onnxruntime refuses it") as info:
        normswap.convert(broken(), to="fold", validate=False)
    assert what in str(info.value) and "\n" not in str(info.value)


def test_cli_no_validate_writes_nothing_for_a_refused_model_and_inspect_warns(tmp_path):
    src, dst = tmp_path / "bad.onnx", tmp_path / "out.onnx"
    onnx.save_model(_duplicate_definition(), str(src))
    r = subprocess.run([sys.executable, "-m", "normswap.cli", "convert", str(src), "--to", "fold", "--no-validate",
                        "-o", str(dst)], capture_output=True, text=True)
    assert r.returncode == 3 and not dst.exists()
    assert r.stderr.count("\n") == 1 and "Duplicate definition" in r.stderr
    r = subprocess.run([sys.executable, "-m", "normswap.cli", "inspect", str(src)], capture_output=True, text=True)
    assert r.returncode == 0 and "warning: the input model is invalid and onnxruntime refuses it" in r.stderr


def test_a_model_only_the_checker_objects_to_is_converted_with_a_note():
    m = conv_bn(np.random.default_rng(0))
    m.graph.name = ""  # the checker requires a graph name; onnxruntime does not
    r = normswap.convert(m, to="fold")
    assert r.report.passed and any("onnx.checker objects" in n and "onnxruntime loads it" in n
                                   for n in r.report.notes)
    assert "onnx.checker objects" in normswap.inspect(m).problem


def test_a_valid_model_has_no_admission_note():
    m = conv_bn(np.random.default_rng(0))
    assert not any("onnx.checker" in n for n in normswap.convert(m, to="fold").report.notes)
    assert normswap.inspect(m).problem is None
