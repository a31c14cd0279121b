"""End to end on real exporter output: ResNet-, MobileNet-, DenseNet- and UNet-style nets exported by
torch.onnx with optimize=False fold to zero BatchNormalization nodes within 1e-5 relative error."""
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import normswap  # noqa: E402
from tests.torch_nets import ARCHITECTURES, export, randomize_bn  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    paths = {}
    for k, (name, cls) in enumerate(ARCHITECTURES.items()):
        torch.manual_seed(k)
        paths[name] = folder / f"{name}.onnx"
        export(randomize_bn(cls(), seed=k), paths[name])
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_fold_removes_every_bn_within_1e_5(exported, name):
    path = exported[name]
    original = onnx.load(str(path))
    assert any(n.op_type == "BatchNormalization" for n in original.graph.node)
    result = normswap.convert(path, to="fold", rtol=1e-5, atol=0.0)
    ops = [n.op_type for n in result.model.graph.node]
    assert "BatchNormalization" not in ops
    assert result.report.passed
    assert all(o.max_rel <= 1e-5 for o in result.report.validation.outputs)
    actions = {layer.action for layer in result.report.layers}
    if name == "densenet":  # pre-activation BN reads a Concat / graph-level conv output: exact affine
        assert "affine" in actions
    else:
        assert actions == {"folded"}
    assert len(ops) <= len(original.graph.node) + result.report.count("affine")  # one more node per affine BN


@pytest.mark.slow
def test_onnx_commands_never_import_torch(exported, tmp_path):
    code = ("import sys, normswap; r = normswap.convert(sys.argv[1], to='fold'); r.save(sys.argv[2]); "
            "normswap.inspect(sys.argv[1]); assert r.report.passed; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(exported["resnet"]), str(tmp_path / "o.onnx")], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize("target", ["group", "layer", "instance", "weight"])
def test_every_target_converts_exported_nets(exported, name, target):
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((64, 1, 8, 8)).astype(np.float32)}
    held = {"x": rng.standard_normal((32, 1, 8, 8)).astype(np.float32)}
    kwargs = {} if target == "weight" else {"calibration": calib, "refine": False}
    result = normswap.convert(exported[name], to=target, inputs=held, **kwargs)
    onnx.checker.check_model(result.model)
    assert "BatchNormalization" not in [n.op_type for n in result.model.graph.node]
    actions = {layer.action for layer in result.report.layers}
    assert actions <= {"converted", "affine"} and "converted" in actions
    if target == "weight":
        assert result.report.passed and result.report.validation.check == "exact"
    else:
        plain = normswap.convert(exported[name], to=target, inputs=held)
        cos = result.report.validation.outputs[0].cosine
        assert cos > plain.report.validation.outputs[0].cosine  # calibration brings it closer
        assert cos > 0.9
