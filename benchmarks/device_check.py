"""Device check: the PyTorch path calibrates on the module's device, and folds stay exact there.

On a machine with torch and CUDA (no network needed): torchvision resnet50 and mobilenet_v2 with random weights and
randomized BN statistics, on the GPU, converted to group with 256 samples at 224x224 (calibration on the GPU:
activations kept in device memory between segments, sums reduced there), printing calibration time against one
forward pass over the same samples; then folded, and the folded module compared with the original on the GPU.
Exits 1 when a fold is not exact, a parameter left the device, or calibration did not run on it. Meant to finish
in well under 5 minutes on one H100.

Usage: PYTHONPATH=. python benchmarks/device_check.py [--device cuda] [--samples 256] [--size 224]
(needs torch and torchvision: pip install torchvision --no-deps matching the torch build).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FOLD_RTOL = 1e-4  # of the largest output magnitude: float32 rounding of a deep net, not a wrong fold


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check(name: str, device, samples: int, size: int) -> bool:
    import torch
    import normswap
    from zoo import randomized
    module = randomized(name).to(device)
    x = torch.randn(samples, 3, size, size, device=device)
    with torch.no_grad():
        module(x[:8])
        _sync(device)
        start = time.perf_counter()
        for k in range(0, samples, 64):
            module(x[k:k + 64])
        _sync(device)
        forward = time.perf_counter() - start
    start = time.perf_counter()
    result = normswap.convert(module, to="group", calibration=x, validate=False, progress=False, refine=False)
    _sync(device)
    total = time.perf_counter() - start
    c = result.report.calibration
    on_device = all(p.device == device for p in result.model.parameters())
    print(f"{name}: {len(result.report.layers)} BN layers, {samples} samples at {size}x{size} on {device}: "
          f"forward {forward:.2f} s, calibration {c.seconds:.2f} s ({c.seconds / forward:.1f}x forward; "
          f"convert {total:.2f} s), {c.segments} segments, activations in {c.activations} "
          f"(peak {c.peak_activation_bytes / 2**20:.0f} MiB)")
    folded = normswap.convert(module, to="fold", example_inputs=x[:8], validate=False, progress=False).model
    with torch.no_grad():
        ref, got = module(x[:64]), folded.to(device)(x[:64])
    error = float((ref - got).abs().max() / ref.abs().max())
    exact = error <= FOLD_RTOL
    print(f"{name}: fold max |diff| / max |ref| = {error:.2e} on {device} ({'exact' if exact else 'NOT EXACT'})")
    ok = exact and on_device and (device.type != "cuda" or c.activations.startswith("cuda"))
    if not on_device:
        print(f"{name}: a calibrated parameter is not on {device}")
    return ok


def main() -> None:
    import torch
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    start = time.perf_counter()
    ok = all([check(name, device, args.samples, args.size) for name in args.models.split(",")])
    print(f"device check {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.0f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
