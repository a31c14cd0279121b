"""A converted module saved as safetensors is rebuilt from a fresh instance of the original architecture."""
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import normswap  # noqa: E402
from tests.torch_nets import randomize_bn  # noqa: E402


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class Net(nn.Module):
    """Conv (no bias) -> BN, a BN after a concat (affine), a BN with an extra activation, a linear head + BN1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.side = nn.Conv2d(3, 8, 1)
        self.cat_bn = nn.BatchNorm2d(16)
        self.act_bn = BatchNormAct2d(16)
        self.fc = nn.Linear(16, 32)
        self.fc_bn = nn.BatchNorm1d(32)

    def forward(self, x):
        h = torch.cat([self.bn(self.conv(x)), self.side(x)], 1)
        h = self.act_bn(self.cat_bn(h))
        return self.fc_bn(self.fc(h.mean((2, 3))))


def _fresh(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(Net()).eval()


@pytest.mark.parametrize("to,options", [("fold", {}), ("weight", {}), ("affine", {}),
                                        ("group", {"groups": "auto"}), ("layer", {"layer_over": "channels"}),
                                        ("instance", {})])
def test_restore_rebuilds_exactly_what_convert_wrote(tmp_path, to, options):
    x = torch.randn(6, 3, 8, 8)
    calib = {"calibration": torch.randn(32, 3, 8, 8), "refine": False} if to in ("group", "layer", "instance") else {}
    result = normswap.convert(_fresh(), to=to, example_inputs=x, validate=False, **options, **calib)
    path = result.save(tmp_path / "net.safetensors")
    rebuilt = normswap.restore(_fresh(seed=1), path)  # other initial weights: everything comes from the file
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), result.model.eval()(x))
    assert {k for k, _ in rebuilt.state_dict().items()} == set(result.model.state_dict())


def test_restore_refuses_other_files_and_other_architectures(tmp_path):
    from safetensors.torch import save_model
    plain = tmp_path / "plain.safetensors"
    save_model(_fresh(), str(plain))
    with pytest.raises(normswap.InvalidModelError, match="holds no normswap recipe"):
        normswap.restore(_fresh(), plain)
    result = normswap.convert(_fresh(), to="fold", example_inputs=torch.randn(2, 3, 8, 8), validate=False)
    path = result.save(tmp_path / "net.safetensors")
    with pytest.raises(normswap.UsageError, match="fresh instance"):
        normswap.restore(nn.Sequential(nn.Conv2d(3, 8, 3)), path)
    with pytest.raises(normswap.UsageError, match="takes a torch.nn.Module"):
        normswap.restore("not a module", path)
