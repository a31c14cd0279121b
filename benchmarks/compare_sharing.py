"""How much `normswap compare` saves by sharing work between targets (docs/choosing.md).

Trains the fidelity benchmark's residual digits net, then times, in one process and interleaved: the three
replacement targets converted one by one (calibrated, validated) against one `compare` of the same three
(calibrated, validated, latency off), and the original's segment runs during calibration in each case.

Usage: python benchmarks/compare_sharing.py     (needs: pip install -e .[test])
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
sys.path.insert(0, str(ROOT))

import make_fixtures  # noqa: E402

import normswap  # noqa: E402
from tests.builders import count_original_runs  # noqa: E402

TARGETS = ("group", "layer", "instance")
REPEATS = 3


def main() -> None:
    import torch
    (x_train, y_train), (x_test, _) = make_fixtures.digits()
    torch.manual_seed(0)
    net = make_fixtures.train(make_fixtures.build_model(), x_train, y_train, seed=0)
    runs = count_original_runs(setattr)  # for the whole process
    calib, held = {"x": x_train[:300]}, {"x": x_test}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        make_fixtures.export(net, path)
        separate, shared = [], []
        for _ in range(REPEATS):
            runs.clear()
            t0 = time.perf_counter()
            for target in TARGETS:
                normswap.convert(path, to=target, calibration=calib, inputs=held, provider="cpu", refine=False)
            separate.append((time.perf_counter() - t0, len(runs)))
            runs.clear()
            t0 = time.perf_counter()
            normswap.compare(path, TARGETS, calibration=calib, inputs=held, provider="cpu", latency=False)
            shared.append((time.perf_counter() - t0, len(runs)))
    a, b = min(s[0] for s in separate), min(s[0] for s in shared)
    print(f"three converts: {a:.2f} s, original's segment runs {separate[0][1]}")
    print(f"one compare:    {b:.2f} s, original's segment runs {shared[0][1]}  ({b / a:.2f}x the time)")


if __name__ == "__main__":
    main()
