"""The CLI with --torch-model: factory, weights (safetensors / state_dict, never pickled objects), outputs."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
""")


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "factory_net.py").write_text(FACTORY)
    sys.path.insert(0, str(tmp_path))
    import factory_net
    net = factory_net.build()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    sys.path.remove(str(tmp_path))
    sys.modules.pop("factory_net")
    torch.save(net.state_dict(), tmp_path / "w.pt")
    from safetensors.torch import save_model
    save_model(net, str(tmp_path / "w.safetensors"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input=rng.standard_normal((64, 1, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "held.npz", input=rng.standard_normal((32, 1, 8, 8)).astype(np.float32))
    return tmp_path


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "normswap.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_convert_torch_module_to_group_with_export(workdir):
    r = cli("convert", "--torch-model", "factory_net:build", "--weights", "w.safetensors", "--to", "group",
            "--calibrate", "calib.npz", "--inputs", "held.npz", "--export-onnx", "g.onnx", "--report", "r.json",
            "--refine-seconds", "5", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert (workdir / "w.group.safetensors").exists() and (workdir / "g.onnx").exists()
    report = json.loads((workdir / "r.json").read_text())
    assert report["frontend"] == "torch" and report["deployable"]["passed"] is True
    assert [layer["action"] for layer in report["layers"]] == ["converted", "converted"]
    import onnx
    ops = {n.op_type for n in onnx.load(str(workdir / "g.onnx")).graph.node}
    assert "BatchNormalization" not in ops


def test_fold_from_a_state_dict_is_exact(workdir):
    r = cli("convert", "--torch-model", "factory_net:build", "--weights", "w.pt", "--to", "fold",
            "--input-shape", "input:2,1,8,8", "-o", "f.safetensors", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "2 folded" in r.stdout and (workdir / "f.safetensors").exists()


def test_pickled_objects_are_never_loaded(workdir):
    torch.save({"model": torch.nn.Linear(2, 2)}, workdir / "evil.pt")  # a pickled module, not a state_dict
    r = cli("convert", "--torch-model", "factory_net:build", "--weights", "evil.pt", "--to", "fold",
            "--input-shape", "input:2,1,8,8", cwd=workdir)
    assert r.returncode == 3 and "never unpickles" in r.stderr


def test_inspect_torch_and_usage_errors(workdir):
    r = cli("inspect", "--torch-model", "factory_net:build", cwd=workdir)
    assert r.returncode == 0 and "2 couple the samples" in r.stdout
    assert cli("inspect", cwd=workdir).returncode == 2
    assert cli("convert", "--torch-model", "nope:build", "--to", "fold", cwd=workdir).returncode == 2
    r = cli("convert", "--torch-model", "factory_net:build", "--to", "fold", cwd=workdir)
    assert r.returncode == 2 and "example inputs" in r.stderr


def test_validation_that_cannot_run_exits_4_and_keeps_the_converted_module(workdir, monkeypatch):
    from click.testing import CliRunner

    import normswap.torch.validate as tv
    from normswap.cli import main
    monkeypatch.setattr(tv, "_runtime_problem", lambda path, args, ran=None: "Conv: bias must be a 1D tensor")
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    r = CliRunner().invoke(main, ["convert", "--torch-model", "factory_net:build", "--weights", "w.safetensors",
                                  "--to", "fold", "--input-shape", "input:2,1,8,8", "-o", "f.safetensors"])
    assert r.exit_code == 4, r.output
    assert (workdir / "f.safetensors").exists()
    assert "validation could not run" in r.output and "written unchecked" in r.output
