"""PyTorch path: every BN form, the dataflow guards, batch-1 training, data forms and inspect."""
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import normswap  # noqa: E402
from tests.torch_nets import randomize_bn  # noqa: E402


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.FrozenBatchNorm2d's shape: fixed buffers, no batch statistics."""

    def __init__(self, c, eps=1e-5):
        super().__init__()
        self.eps = eps
        for k, v in (("weight", torch.rand(c) + 0.5), ("bias", torch.rand(c) - 0.5),
                     ("running_mean", torch.rand(c) - 0.5), ("running_var", torch.rand(c) + 0.5)):
            self.register_buffer(k, v)

    def forward(self, x):
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return x * scale.view(1, -1, 1, 1) + (self.bias - self.running_mean * scale).view(1, -1, 1, 1)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: BN, then drop, then act (kept by every rewrite)."""

    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


class FancyBN(nn.BatchNorm2d):
    def forward(self, x):  # behaviour normswap cannot see
        return super().forward(x) * 2


def _conv_bn(bn):
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), bn, nn.Conv2d(8, 4, 1)))


def _same(a, b, x):
    with torch.no_grad():
        torch.testing.assert_close(b.eval()(x), a.eval()(x), rtol=1e-5, atol=1e-5)


X = torch.randn(4, 3, 6, 6)


@pytest.mark.parametrize("bn", [nn.BatchNorm2d(8), nn.SyncBatchNorm(8), nn.BatchNorm2d(8, affine=False)],
                         ids=["bn", "sync", "no-affine"])
def test_bn_forms_fold_exactly(bn):
    net = _conv_bn(bn)
    r = normswap.convert(net, to="fold", example_inputs=X, validate=False)
    assert r.report.layers[0].action == "folded"
    _same(net, r.model, X)


def test_frozen_parameters_and_frozen_batchnorm_module_fold():
    net = _conv_bn(nn.BatchNorm2d(8))
    for p in net[1].parameters():
        p.requires_grad_(False)
    assert normswap.convert(net, to="fold", example_inputs=X, validate=False).report.layers[0].action == "folded"
    frozen = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8)).eval()
    r = normswap.convert(frozen, to="fold", example_inputs=X, validate=False)
    assert r.report.layers[0].action == "folded" and r.report.layers[0].op == "FrozenBatchNorm2d"
    _same(frozen, r.model, X)


def test_bn_act_subclass_keeps_its_activation():
    net = _conv_bn(BatchNormAct2d(8))
    for target in ("fold", "affine", "group"):
        r = normswap.convert(net, to=target, calibration=X, validate=False, refine=False)
        assert r.report.layers[0].action in ("folded", "affine", "converted")
        if target != "group":
            _same(net, r.model, X)
        assert any(isinstance(m, nn.ReLU) for m in r.model.modules())


def test_custom_forward_bn_is_kept_with_the_reason():
    r = normswap.convert(_conv_bn(FancyBN(8)), to="fold", example_inputs=X, validate=False)
    assert r.report.layers[0].action == "kept" and "overrides forward" in r.report.layers[0].reason


def test_lazy_bn_never_run_is_a_clear_error():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.LazyBatchNorm2d())
    with pytest.raises(normswap.UnsupportedError, match="never run"):
        normswap.convert(net, to="fold", example_inputs=X, validate=False)


def test_bn_without_running_stats_has_nothing_to_fold():
    net = _conv_bn(nn.BatchNorm2d(8, track_running_stats=False))
    r = normswap.convert(net, to="fold", example_inputs=X, validate=False)
    assert r.report.layers[0].action == "kept" and "no trained statistics" in r.report.layers[0].reason
    g = normswap.convert(net, to="group", calibration=X, validate=False, refine=False)
    assert g.report.layers[0].action == "converted" and g.report.calibration is not None


class WrongOrder(nn.Module):
    """mmpose#606: the BN is registered next to conv_a but normalizes conv_b's output."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.conv_b = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.bn(self.conv_b(x)) + self.conv_a(x)


def test_pairs_come_from_the_dataflow_not_module_order():
    net = randomize_bn(WrongOrder())
    r = normswap.convert(net, to="fold", example_inputs=X, validate=False)
    assert r.report.layers[0].action == "folded" and r.report.layers[0].producer == "conv_b"
    assert r.report.layers[0].producer_op == "Conv2d"
    _same(net, r.model, X)


class SharedOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class ReusedConv(nn.Module):
    """pytorch#104593: one conv module called twice."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace this
            x = x * 2
        return self.bn(self.conv(x))


@pytest.mark.parametrize("cls,reason", [(SharedOutput, "other consumer"), (ReusedConv, "called more than once"),
                                        (DataDependent, "could not trace")])
def test_unsafe_or_untraceable_pairs_fall_back_to_exact_affine(cls, reason):
    net = randomize_bn(cls())
    r = normswap.convert(net, to="fold", example_inputs=X, validate=False)
    assert r.report.layers[0].action == "affine" and reason in r.report.layers[0].reason
    _same(net, r.model, X)


def test_converted_mlp_trains_at_batch_size_one_where_bn_cannot():
    torch.manual_seed(0)
    net = randomize_bn(nn.Sequential(nn.Linear(10, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 3)))
    x1, y1 = torch.randn(1, 10), torch.tensor([2])
    net.train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        net(x1)
    r = normswap.convert(net, to="group", groups=4, calibration=torch.randn(64, 10), validate=False, refine=False)
    model = r.model.train()
    norm = model.get_submodule("1")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x1), y1)
    loss.backward()
    assert torch.isfinite(loss) and norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    before = norm.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, norm.weight)


def test_calibration_data_forms():
    net = _conv_bn(nn.BatchNorm2d(8))
    data = torch.utils.data.TensorDataset(torch.randn(32, 3, 6, 6), torch.zeros(32))  # labels are dropped
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    r = normswap.convert(net, to="layer", calibration=loader, validate=False, refine=False)
    assert r.report.calibration.samples == 32 and r.report.layers[0].calibrated
    gen = (torch.randn(8, 3, 6, 6) for _ in range(3))
    g = normswap.convert(net, to="layer", calibration=gen, validate=False, refine=False)
    assert g.report.calibration.samples == 24 and any("read only once" in n for n in g.report.notes)
    with pytest.raises(normswap.UsageError):
        normswap.convert(net, to="layer", calibration="not data", validate=False, refine=False)
    with pytest.raises(normswap.UsageError, match="example_inputs= or calibration="):
        normswap.convert(net, to="group", validate=False)


def test_without_calibration_the_function_is_not_preserved():
    r = normswap.convert(_conv_bn(nn.BatchNorm2d(8)), to="group", example_inputs=X, validate=False)
    assert r.report.function_preserved is False and any("NOT preserved" in n for n in r.report.notes)


def test_inspect_lists_every_coupling_layer():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.BatchNorm2d(8),
                        FrozenBatchNorm2d(8), nn.BatchNorm2d(8, track_running_stats=False))
    for p in net[2].parameters():
        p.requires_grad_(False)
    rows = normswap.inspect(net).sites
    assert [r["name"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["couples_samples"] for r in rows] == [True, True, False, True]
    assert rows[0]["affine"] is False and rows[1]["frozen"] is True and not rows[3]["running_stats"]
    assert "train AND eval" in rows[3]["reason"]


def test_ambiguous_channel_strides_are_normalized_before_distillation():
    # torch.from_numpy(images[:, None]) has strides (64, 1, 8, 1): "contiguous" and "channels-last" at once;
    # torch 2.13's CPU GroupNorm backward segfaults on channels-last inputs that need no grad
    import numpy as np
    from normswap.torch.data import standard_layout
    images = np.random.default_rng(0).standard_normal((32, 8, 8)).astype(np.float32)
    x = torch.from_numpy(images[:, None])
    assert x.stride()[1] != 64 and x.is_contiguous()
    assert standard_layout(x).stride() == (64, 64, 8, 1) and torch.equal(standard_layout(x), x)
    y = torch.randn(4, 3, 2, 2)
    assert standard_layout(y) is y
    net = randomize_bn(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 4, 3, padding=1), nn.BatchNorm2d(4)))
    r = normswap.convert(net, to="layer", calibration=x, refine_steps=3, validate=False)
    assert any("refine" in n for n in r.report.notes)


def _half_conv_bn(scale: float, weight: float) -> nn.Module:
    net = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-7)).eval()
    with torch.no_grad():
        net[0].weight.fill_(weight)
        net[1].running_var.fill_(1.0)
        net[1].weight[0] = min(scale, 6e4)  # gamma / sqrt(var) = scale, each representable in float16
        net[1].running_var[0] = (float(net[1].weight[0]) / scale) ** 2
    return net.half()


def test_torch_fold_that_would_overflow_fp16_becomes_affine_or_stays_bn_with_the_reason():
    affine = normswap.convert(_half_conv_bn(1000.0, 100.0), to="fold", validate=False)
    layer = affine.report.layers[0]
    assert layer.action == "affine" and "would exceed the largest float16" in layer.reason
    assert all(torch.isfinite(p).all() for p in affine.model.parameters())
    kept = normswap.convert(_half_conv_bn(1e5, 1.0), to="fold", validate=False)
    assert kept.report.layers[0].action == "kept" and "cannot become affine" in kept.report.layers[0].reason
    assert isinstance(kept.model[1], nn.BatchNorm2d)
    folded = normswap.convert(_half_conv_bn(100.0, 100.0), to="fold", validate=False)  # peak 1e4 fits
    assert folded.report.layers[0].action == "folded"


def test_torch_weight_norm_magnitude_beyond_fp16_stays_folded():
    r = normswap.convert(_half_conv_bn(100.0, 200.0), to="weight", validate=False)  # ||v|| = 2e4 * sqrt(18)
    assert "weight norm not applied" in r.report.layers[0].reason
    assert not hasattr(r.model[0], "parametrizations")
    ok = normswap.convert(_half_conv_bn(2.0, 1.0), to="weight", validate=False)
    assert hasattr(ok.model[0], "parametrizations")


def test_torch_nonfinite_bn_statistics_are_refused_unless_allowed():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        net[1].running_var[2] = float("nan")
    with pytest.raises(normswap.InvalidModelError, match="BatchNorm '1' has 1 NaN or infinite value"):
        normswap.convert(net, to="fold", validate=False)
    r = normswap.convert(net, to="fold", validate=False, allow_nonfinite=True)
    assert r.report.layers[0].action == "folded"
    fine = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)).eval()
    assert normswap.convert(fine, to="fold", validate=False).report.layers[0].action == "folded"


def test_torch_asked_groups_are_honoured_with_calibration_and_auto_may_choose_others():
    data = torch.randn(32, 3, 6, 6)
    asked = normswap.convert(_conv_bn(nn.BatchNorm2d(8)), to="group", groups=4, calibration=data, validate=False,
                             refine=False)
    assert [layer.groups for layer in asked.report.layers] == [4]
    assert asked.model[1].num_groups == 4 and asked.report.layers[0].calibrated
    auto = normswap.convert(_conv_bn(nn.BatchNorm2d(8)), to="group", groups="auto", calibration=data,
                            validate=False, refine=False)
    assert auto.report.layers[0].groups in (1, 2, 4, 8) and "chose" in auto.report.layers[0].reason
    no_data = normswap.convert(_conv_bn(nn.BatchNorm2d(8)), to="group", groups="auto", example_inputs=X,
                               validate=False)
    assert any("groups='auto' chooses group counts by fit" in n for n in no_data.report.notes)


def test_an_export_onnxruntime_cannot_run_is_retried_with_the_other_exporter(monkeypatch):
    import normswap.torch.validate as tv
    real = tv._export_once

    def broken_dynamo(module, args, path, exporter, names, outputs):
        real(module, args, path, exporter, names, outputs)
        if exporter == "dynamo":  # what r3d_18's dynamo export does: a model onnxruntime refuses to load
            m = onnx.load(path)
            conv = next(n for n in m.graph.node if n.op_type == "Conv")
            conv.attribute.append(onnx.helper.make_attribute("no_such_attribute", 1))
            onnx.save_model(m, path)
    import onnx
    monkeypatch.setattr(tv, "_export_once", broken_dynamo)
    r = normswap.convert(_conv_bn(nn.BatchNorm2d(8)), to="fold", example_inputs=X)
    assert r.report.passed and "TorchScript" in r.report.validation.exported_with
    assert r.report.deployable.exported_with == "TorchScript"


def test_when_no_export_runs_the_conversion_is_kept_and_validation_says_why(monkeypatch, tmp_path):
    import normswap.torch.validate as tv
    monkeypatch.setattr(tv, "_runtime_problem", lambda path, args, ran=None: "Conv: bias must be a 1D tensor")
    r = normswap.convert(_conv_bn(nn.BatchNorm2d(8)), to="fold", example_inputs=X)
    assert r.report.validation is None and r.report.passed is None
    assert "validation could not run" in r.report.validation_error and "bias must be a 1D tensor" in \
        r.report.validation_error
    assert "data" not in r.report.validation_error  # never blamed on the data
    assert isinstance(r.model[1], nn.Identity)  # the conversion stands
    assert r.save(tmp_path / "kept.safetensors").exists()
