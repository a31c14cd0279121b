"""Calibration cost on torchvision architectures, as a multiple of one forward pass of the original over the same
samples, for both frontends: `--to group` with calibration data, random weights, BN statistics randomized.

Each row runs in a fresh process (peak memory is that process's own). The ONNX exports fix the batch to 1, as
most exports do: the forward pass runs them sample by sample in onnxruntime (default optimizations, warm
session) -- what the model allows; calibration frees the batch dimension of its internal copies. The PyTorch
forward pass runs the module in batches of 64 (eval, no_grad, warm).

Usage: python benchmarks/calibration.py [--quick] -- rewrites section 5 of docs/benchmarks.md (scale.py writes
the whole file and calls this module for that section). Needs torchvision (pip install torchvision==0.28.0
--no-deps: it matches the pinned torch 2.13.0 CPU build).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = [("resnet18", 128, 64), ("mobilenet_v2", 96, 64), ("densenet121", 96, 64), ("resnet50", 224, 256)]
QUICK = [("resnet18", 64, 16), ("mobilenet_v2", 64, 16)]
BEFORE = {  # measured 2026-11-27 with the level-by-level calibration (issue 8), seconds and x one forward pass
    ("onnx", "resnet18"): (10, 23), ("onnx", "mobilenet_v2"): (116, 366), ("onnx", "densenet121"): (683, 292),
    ("torch", "mobilenet_v2"): (468, 51)}
SECTION = "## 5. Calibration cost"
MEASURED = [
    "### What was measured on the way (2026-11-27, this machine, `--to group`, G chosen by fit)", "",
    "Each step kept the fit identical to the level-by-level one (tests compare them), and is kept in the code:", "",
    "| step | resnet18 128px / 64 | mobilenet_v2 96px / 64 | densenet121 96px / 64 | resnet50 224px / 256 |",
    "|---|---|---|---|---|",
    "| level by level, a model prefix per level (before) | 23x | 366x | 292x | - |",
    "| segments, every node once; float64 normalization of every candidate in numpy | 9.5x | 15x | 8.8x | 4.5x |",
    "| sums from five moments inside onnxruntime (all candidates from one pass) | 6.4x | 11x | - | - |",
    "| idle onnxruntime threads no longer spin between short runs | 6.0x | 8-10x | 8.1x | 4.7x |",
    "| IO binding: values stay OrtValues between segments (no numpy copies) | 5.0x | 8.3x | 6.0x | 5.5x |",
    "| segment sessions without a memory arena (peak memory halved on resnet50) | 4.2x | 8.4x | 6.7x | 5.5x |",
    "| arena back on, kept values copied out of it; constant nodes inside each segment (2026-12-01) | 4.0x | 7.9x "
    "| 4.9x | 3.5x |",
    "| one CPU arena shared by every segment session (2026-12-01 night), same process, private -> shared, "
    "seconds | - | 3.8-4.7 -> 2.9-3.6 | 10.3 / 9.9 -> 8.4 / 8.1 | 41.6 / 42.5 -> 27.6 / 28.3 (64 samples) |",
    "| fitted layers as A * x + B, next-segment values left in the shared arena (2026-12-02), same process, before -> "
    "after, seconds (section 8) | 3.82 / 3.13 -> 3.01 / 2.97 | 2.98 / 3.20 -> 2.73 / 2.82 | 7.69 / 7.17 -> "
    "6.98 / 6.67 | 24.6 / 28.1 -> 22.8 / 23.3 (64 samples) |",
    "| the original's and the converted model's segment in one session and one run (2026-12-02, later), same "
    "process, before -> after, seconds (section 8) | 2.85 / 3.09 -> 2.91 / 2.76 | 2.81 / 2.19 -> 2.30 / 2.25 | "
    "6.12 / 5.83 -> 5.98 / 5.69 | 22.8 / 23.0 -> 22.4 / 21.2 (64 samples) |",
    "",
    "Also measured and not kept: onnxruntime graph optimization level for the segment sessions (all / extended "
    "/ basic: no difference beyond noise); calibration batch 8 / 16 / 32 / 64 (no trend on mobilenet_v2 or "
    "resnet50; 64 stays the default). The original run alone, segment by segment with numpy outputs, cost 5.3 s "
    "for 32 resnet50 samples at 224px against 2.8 s for the whole model at batch 32; with IO binding 3.3 s. "
    "Not tried, with the reason: a few whole-network sweeps (fit every layer on the original's inputs, then refit "
    "on the converted upstream) cost one forward pass of each model per sweep, about 2.2-2.5x here, and each "
    "sweep makes only one more level exact, so two sweeps already exceed 4x without matching the sequential fit.",
    "",
    "What is left above one forward pass of each model (section 6 measures it per model): the fit sums, 12 "
    "memory passes over each new layer's input and target that no onnxruntime op does in fewer (even in one run "
    "of each model, with no segments, they put the PP-OCR classifier at 5.4x and densenet121 at 4.1x); keeping "
    "the original's BN outputs, which the fused Conv + BN + activation must then write; a session and a run per "
    "segment (3.3 ms to create each of the two sessions a segment had before they were fused, 0.3-1 s for "
    "53-122 segments; onnxruntime's session cost grows with the nodes, so fusing the two halved the count of "
    "sessions, not their cost); and Python (the group fits, freeing kept values, setting up). On these 2-core CPUs that is 4-6x one forward pass for the small ONNX models over 64 "
    "samples and about 3.5-4x for resnet50 over 256 samples. The PyTorch path, whose segments cost no session, "
    "stays at 2.4-3x; there, reducing the sums in float64 made resnet50 1.5x slower for no change in the fit, so "
    "they are float32 after centring.", "",
    "GPU: `benchmarks/device_check.py` (resnet50 and mobilenet_v2, 256 samples at 224x224, calibration and fold "
    "exactness on the GPU) has not run yet: the session that built it was not lent a device. Its CPU run "
    "(`--device cpu`) and the tests exercise the same plumbing: batches follow the module's device, activations "
    "and sums stay there.", ""]

CHILD = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import numpy as np
import torch
from zoo import export, randomized
import normswap
frontend, name, size, n, path = {frontend!r}, {name!r}, {size}, {n}, {path!r}
torch.manual_seed(0)
module = randomized(name)
x = torch.randn(n, 3, size, size)
if frontend == "onnx":
    import onnxruntime as ort
    export(module, size, __import__("pathlib").Path(path))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    data = x.numpy()
    session.run(None, {{"x": data[:1]}})
    start = time.perf_counter()
    for k in range(n):
        session.run(None, {{"x": data[k:k + 1]}})
    forward = time.perf_counter() - start
    result = normswap.convert(path, to="group", groups="auto", calibration={{"x": data}}, validate=False, refine=False,
                              progress=False)
else:
    with torch.no_grad():
        module(x[:2])
        start = time.perf_counter()
        for k in range(0, n, 64):
            module(x[k:k + 64])
        forward = time.perf_counter() - start
    result = normswap.convert(module, to="group", groups="auto", calibration=x, validate=False, progress=False,
                              refine=False)
c = result.report.calibration
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"forward_s": forward, "calibration_s": c.seconds, "segments": c.segments, "passes": c.passes,
                  "layers": len(result.report.layers), "activation_mib": c.peak_activation_bytes / 2**20,
                  "where": c.activations, "peak_mib": int(hwm.split()[1]) / 1024, "layout": c.batch_layout}}))
"""


def measure(frontend: str, name: str, size: int, n: int, tmp: Path) -> dict:
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), frontend=frontend, name=name, size=size, n=n,
                        path=str(tmp / f"{name}_{size}.onnx"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update(frontend=frontend, name=name, size=size, samples=n)
    return row


def calibration_rows(quick: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for frontend in ("onnx", "torch"):
            for name, size, n in (QUICK if quick else MODELS):
                rows.append(measure(frontend, name, size, n, Path(tmp)))
                print(rows[-1], file=sys.stderr)
    return rows


def render(rows: list[dict]) -> list[str]:
    lines = [SECTION, "",
             f"Generated by `python benchmarks/calibration.py` ({time.strftime('%Y-%m-%d')}). "
             "`--to group` with calibration data (group count chosen by fit, output layer refitted) on torchvision "
             "architectures with random weights and randomized BN statistics, each row in a fresh process. "
             "'x forward' divides the calibration time by one forward pass of the original over the same samples "
             "(ONNX: the export, whose batch is fixed to 1, sample by sample in onnxruntime; PyTorch: batches of "
             "64). 'before' is the level-by-level calibration this replaced, as measured on 2026-11-27 (a fixed-batch "
             "export then also needed --calibration-batch-size 1).", "",
             "| frontend | model | input | samples | BN layers | forward s | calibration s | x forward | segments | "
             "activations kept (MiB) | peak MiB | before: s (x forward) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before = BEFORE.get((r["frontend"], r["name"]))
        lines.append(f"| {'ONNX' if r['frontend'] == 'onnx' else 'PyTorch'} | {r['name']} | {r['size']}x{r['size']} "
                     f"| {r['samples']} | {r['layers']} | {r['forward_s']:.2f} | {r['calibration_s']:.2f} | "
                     f"{r['calibration_s'] / r['forward_s']:.1f} | {r['segments']} | {r['activation_mib']:.0f} "
                     f"({r['where']}) | {r['peak_mib']:.0f} | "
                     f"{f'{before[0]} ({before[1]}x)' if before else '-'} |")
    lines += ["", "Each model runs once, segment by segment between calibration levels: every node of the "
              "original and of the converted model runs once per sample (a fitted layer as `A * x + B`), the "
              "per-channel sums are computed inside onnxruntime (or in torch on the module's device) from moments "
              "that serve every candidate group count at once, and activations stay where they were computed "
              "between segments (CPU: OrtValues in one shared arena, those read beyond the next segment copied "
              "out of it; GPU: OrtValues through IO binding; torch: tensors on the device), within the memory "
              "budget. What remains above one forward pass of each model is the fit sums, the original's BN "
              "outputs written out, and per-segment cost (a session and a run per segment, the original's and the "
              "converted model's segment together in one: `normswap/onnx/fused_segments.py`); it weighs most on "
              "small models over few samples. Rows move by 10-30% between runs on this shared machine (ONNX "
              "resnet18 took 3.7x in the run before this one and 4.3x in this one, 2.8-3.0x in section 8's "
              "same-process rounds).", ""] + MEASURED
    return lines


def update_section(path: Path, lines: list[str]) -> None:
    """Replace section 5 of an existing benchmarks page (up to the next section) with ``lines``."""
    text = path.read_text().splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith(SECTION))
    end = next((i for i in range(start + 1, len(text)) if text[i].startswith("## ")), len(text))
    path.write_text("\n".join(text[:start] + lines + text[end:]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    update_section(args.out, render(calibration_rows(args.quick)))


if __name__ == "__main__":
    main()
