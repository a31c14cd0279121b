"""Device check for issue 13 (PyTorch path on CUDA): compare and batch sensitivity of a module on the GPU agree
with the same module on the CPU. Usage: PYTHONPATH=. python benchmarks/device_issue13.py"""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import normswap  # noqa: E402
from tests.torch_nets import ResNetStyle, randomize_bn  # noqa: E402

assert torch.cuda.is_available(), "no CUDA"
g = torch.Generator().manual_seed(0)
calib, held = torch.randn(96, 1, 8, 8, generator=g), torch.randn(64, 1, 8, 8, generator=g)
cpu = randomize_bn(ResNetStyle(), seed=1)
gpu = copy.deepcopy(cpu).cuda()  # the same weights (a second ResNetStyle() would draw new ones)
a = normswap.batch_sensitivity(cpu, held, batch_sizes=[2, 16])
b = normswap.batch_sensitivity(gpu, held, batch_sizes=[2, 16])
worst = max(abs(x.model_error[s] - y.model_error[s]) / max(x.model_error[s], 1e-9)
            for x, y in zip(a.layers, b.layers) for s in (2, 16))
print("sensitivity: largest relative difference cpu/cuda", worst)
for x, y in zip(a.layers, b.layers):
    print(x.name, [round(x.model_error[s], 5) for s in (2, 16)], [round(y.model_error[s], 5) for s in (2, 16)])
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False
b = normswap.batch_sensitivity(gpu, held, batch_sizes=[2, 16])
worst = max(abs(x.model_error[s] - y.model_error[s]) / max(x.model_error[s], 1e-9)
            for x, y in zip(a.layers, b.layers) for s in (2, 16))
print("sensitivity without TF32: largest relative difference cpu/cuda", worst)
assert worst < 1e-2
rc = normswap.compare(cpu, ["fold", "layer"], calibration=calib, inputs=held)
rg = normswap.compare(gpu, ["fold", "layer"], calibration=calib.cuda(), inputs=held)
for x, y in zip(rc.rows, rg.rows):
    print(x.target, "cpu", x.top1_agreement, x.latency_ms, "cuda", y.top1_agreement, y.latency_ms, y.passed)
    assert abs(x.top1_agreement - y.top1_agreement) <= 2 / 64
print("OK on", torch.cuda.get_device_name())
