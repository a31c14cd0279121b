"""Fidelity benchmark: how much of what a trained BN network learned survives each replacement.

Trains two small BN CNNs on scikit-learn's digits (a residual net, and a depthwise-separable net whose channel
counts are not multiples of 32), exports them with BN kept, converts them to group (G = 32), layer and instance,
with and without calibration, and measures held-out top-1 agreement with the original (and cosine of the
logits) plus the time calibration takes, as a multiple of one forward pass of the original over the calibration
data. Writes docs/fidelity.md.

Usage: python benchmarks/fidelity.py [--out docs/fidelity.md]   (needs: pip install -e .[test])
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))

import make_fixtures  # noqa: E402  (digits split, training loop, export)

import normswap  # noqa: E402
from normswap.options import RefinementOptions  # noqa: E402

CALIBRATION_SAMPLES = 300
SEEDS = (0, 1, 2)  # each network is trained three times: agreement on 360 images moves by 0.28% a sample


def depthwise_separable_net():
    from torch import nn

    def sep(c_in, c_out, stride):
        return nn.Sequential(nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False), nn.BatchNorm2d(c_in),
                             nn.ReLU(), nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

    class DigitsSeparable(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
            self.body = nn.Sequential(sep(12, 20, 1), sep(20, 36, 2), sep(36, 44, 1))
            self.fc = nn.Linear(44, 10)

        def forward(self, x):
            return self.fc(self.body(self.stem(x)).mean((2, 3)))

    return DigitsSeparable()


def forward_seconds(path: Path, x: np.ndarray, repeats: int = 5) -> float:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for k in range(0, len(x), 64):
            session.run(None, {"x": x[k:k + 64]})
        times.append(time.perf_counter() - start)
    return min(times)


REFINE_STEPS = 300  # a step budget, so rows do not depend on the machine's speed
TORCH_CONFIGS = [  # (label, kwargs, calibrated, opacus-style reset)
    ("fresh GroupNorm, gamma=1 beta=0 (what Opacus does)", {}, False, True),
    ("group G=32, gamma/beta copied", {}, False, False),
    ("group G=32, calibrated", {}, True, False),
    ("group auto (G chosen by fit), calibrated", {"groups": "auto"}, True, False),
]

CONFIGS = [  # (label, target, kwargs, calibrated)
    ("group G=32, gamma/beta copied", "group", {"groups": 32}, False),
    ("group G=32, calibrated (G as asked)", "group", {"groups": 32}, True),
    ("group G=32, calibrated, norms only", "group", {"groups": 32, "refit_output_layer": False}, True),
    ("group auto, calibrated (G chosen by fit)", "group", {"groups": "auto"}, True),
    ("layer, gamma/beta copied", "layer", {}, False),
    ("layer, calibrated, norms only", "layer", {"refit_output_layer": False}, True),
    ("layer, calibrated", "layer", {}, True),
    ("instance, gamma/beta copied", "instance", {}, False),
    ("instance, calibrated", "instance", {}, True),
]


REFERENCE_CONFIGS = [  # (label, target, options, choose_groups): norms-only fits, segmented vs level by level
    ("group auto, G chosen by fit", "group", {"groups": 32}, True),
    ("group G=32, G as asked", "group", {"groups": 32}, False),
    ("layer", "layer", {}, True),
    ("instance", "instance", {}, True),
]


def reference_agreement(path: Path, target: str, options: dict, choose_groups: bool, calib, held) -> float:
    """Held-out agreement of the plain level-by-level fit (the test oracle, whole-model runs per level, float64
    normalization in numpy) of the new layers: what calibration computed before it ran segment by segment."""
    import onnx
    sys.path.insert(0, str(ROOT))
    from normswap.onnx.convert import convert_in_place
    from normswap.targets import ReplaceOptions
    from tests.onnx.sequential_calibration import sequential_fit
    original = onnx.load(str(path))
    converted = onnx.load(str(path))
    norms = convert_in_place(converted, target, options=ReplaceOptions(**options)).new_norms
    sequential_fit(original, converted, norms, calib, choose_groups=choose_groups)
    report = normswap.validate(path, converted, inputs=held, check="fidelity", provider="cpu")
    return report.outputs[0].top1_agreement


def run(out: Path) -> None:
    import torch
    (x_train, y_train), (x_test, y_test) = make_fixtures.digits()
    calib, held = {"x": x_train[:CALIBRATION_SAMPLES]}, {"x": x_test}
    nets = {"residual (16/24 channels)": make_fixtures.build_model,
            "depthwise-separable (12/20/36/44 channels)": depthwise_separable_net}
    results: dict[tuple[str, str], list] = {}
    accuracies: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for net_name, build in nets.items():
            for seed in SEEDS:
                torch.manual_seed(seed)
                net = make_fixtures.train(build(), x_train, y_train, seed=seed)
                path = Path(tmp) / "net.onnx"
                make_fixtures.export(net, path)
                with torch.no_grad():
                    accuracy = float((net(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
                accuracies.setdefault(net_name, []).append(accuracy)
                forward = forward_seconds(path, calib["x"])
                for label, target, kwargs, calibrated in CONFIGS:
                    result = normswap.convert(path, to=target, inputs=held, provider="cpu", refine=False,
                                              calibration=calib if calibrated else None, **kwargs)
                    output = result.report.validation.outputs[0]
                    c = result.report.calibration
                    groups = {layer.groups for layer in result.report.layers if layer.groups}
                    results.setdefault((net_name, label), []).append(
                        (output.top1_agreement, output.cosine, groups, c and c.seconds, c and c.seconds / forward,
                         c and c.passes))
                    print(f"{net_name:44s} seed {seed} {label:45s} agreement {output.top1_agreement:.4f}",
                          flush=True)
                for label, target, options, choose in REFERENCE_CONFIGS:
                    segmented = normswap.convert(path, to=target, inputs=held, provider="cpu", calibration=calib,
                                                 refit_output_layer=False, refine=False,
                                                 **({"groups": "auto"} if choose and target == "group" else options))
                    results.setdefault(("reference", net_name, label), []).append(
                        (segmented.report.validation.outputs[0].top1_agreement,
                         reference_agreement(path, target, options, choose, calib, held)))
                for label, kwargs, calibrated, reset in TORCH_CONFIGS:
                    result = normswap.convert(net, to="group", validate=False, refine=False,
                                              calibration=torch.from_numpy(calib["x"].copy()) if calibrated else None,
                                              example_inputs=torch.from_numpy(calib["x"][:8].copy()),
                                              **{"groups": 32, **kwargs})
                    if reset:
                        for layer in result.report.layers:
                            norm = result.model.get_submodule(layer.name)
                            with torch.no_grad():
                                norm.weight.fill_(1.0)
                                norm.bias.zero_()
                    with torch.no_grad():
                        x = torch.from_numpy(x_test)
                        a, b = net.eval()(x), result.model.eval()(x)
                    agree = float((a.argmax(1) == b.argmax(1)).float().mean())
                    cos = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
                    c = result.report.calibration
                    groups = {layer.groups for layer in result.report.layers if layer.groups}
                    results.setdefault((net_name, f"PyTorch: {label}"), []).append(
                        (agree, cos, groups, c and c.seconds, None, c and c.passes))
                    print(f"{net_name:44s} seed {seed} PyTorch {label:45s} agreement {agree:.4f}", flush=True)
                refine_rows(net, net_name, seed, calib, x_test, results)
    write(out, results, accuracies)


REFINE_CONFIGS = [("group G=32", "group", {"groups": 32}), ("group auto", "group", {"groups": "auto"}),
                   ("layer", "layer", {}), ("instance", "instance", {})]


def _torch_agreement(net, model, x_test) -> float:
    import torch
    with torch.no_grad():
        x = torch.from_numpy(x_test)
        return float((net.eval()(x).argmax(1) == model.eval()(x).argmax(1)).float().mean())


def refine_rows(net, net_name: str, seed: int, calib, x_test, results) -> None:
    """Calibrated, then refined (at most REFINE_STEPS steps) with each scope: held-out agreement and seconds per
    step."""
    import torch
    data = torch.from_numpy(calib["x"].copy())
    for label, target, options in REFINE_CONFIGS:
        row = []
        for scope in (None, "all", "norms"):
            extra = ({"refine_steps": REFINE_STEPS, "refine_seconds": 600, "refine_scope": scope} if scope
                     else {"refine": False})
            result = normswap.convert(net, to=target, calibration=data, validate=False, **options, **extra)
            d = result.report.calibration.refinement
            row.append((_torch_agreement(net, result.model, x_test), d and d.seconds / max(d.steps, 1),
                        d and d.kept))
        results.setdefault(("refine", net_name, label), []).append(row)
        print(f"{net_name:44s} seed {seed} refine {label:12s} " +
              " ".join(f"{a:.4f}" for a, _, _ in row), flush=True)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def refine_table(refined) -> list[str]:
    """Calibrated against calibrated + refined (both scopes): the issue-12 target per row."""
    lines = [
        "",
        f"## Refinement after calibration (PyTorch, at most {REFINE_STEPS} steps, mean over seeds)",
        "",
        "Every parameter (`refine_scope='all'`) or only the new layers' scale and shift (`'norms'`) trained towards "
        "the original's outputs on the calibration images with normswap's refinement (docs/refinement.md: a loss "
        "per output kind, one Adam rate probed from 3e-3 down, warm-up and cosine decay), "
        f"{RefinementOptions().holdout:.0%} of them held aside: "
        "the best state on them is kept only when it beats the calibrated one by two standard errors without "
        "lowering their agreement, else the calibrated state is restored. Target (issue 12): rows calibrated "
        "below 99% gain at least 1 point on average, no row loses more than 0.5 point. The recipes measured "
        "before this one (RMS-scaled steps, EMA, shifts...) are in the git history of this file (2026-11-28).",
        "",
        "| network | conversion | calibrated | + all | + norms | s/step all | s/step norms | best from 99.5% | target |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (net, label), runs in refined.items():
        calibrated = _mean(r[0][0] for r in runs)
        every, norms = _mean(r[1][0] for r in runs), _mean(r[2][0] for r in runs)
        step_all, step_norms = _mean(r[1][1] for r in runs), _mean(r[2][1] for r in runs)
        best = max(calibrated, every, norms)
        met = every - calibrated >= (0.01 if calibrated < 0.99 else -0.005)
        lines.append(f"| {net} | {label} | {calibrated:.1%} | {every:.1%} ({every - calibrated:+.1%}) | "
                     f"{norms:.1%} ({norms - calibrated:+.1%}) | {step_all * 1000:.1f} ms | "
                     f"{step_norms * 1000:.1f} ms | {best - 0.995:+.1%} | {'met' if met else 'not met'} |")
    return lines + ["", *REFINE_FINDINGS]


REFINE_FINDINGS = (
    "Why the group auto / layer rows miss (measured 2026-12-01 evening, same nets and seeds, scope `all`, 300 "
    "steps, test agreement on the 360 test images): the guard restored the calibrated state in every one of the "
    "12 runs -- its 42 held-out images already agree 1.000 (or 0.952) with the original and the held-out loss "
    "moves by less than one standard error of its per-sample differences (seed 0 separable: 0.0301 -> 0.0286, "
    "standard error 0.0024). With the guard off (the last state kept), the same training moves the test "
    "agreement by +1.4 / -0.3 / +0.6 points (separable, group auto, seeds 0 / 1 / 2), +1.4 / -0.6 / +1.1 "
    "(separable, layer), 0.0 / +1.1 / +0.8 (residual, both): +0.6 on average, and the held-out loss tells the "
    "losing seed (it rose, 0.0303 -> 0.0314) from the others (it fell). Function matching on mixed inputs "
    "(each training batch mixed with a shuffled copy of itself, Beta(1, 1), the original labelling the mixture) "
    "gave +0.6 (separable) and +1.0 / +1.1 (residual) with the guard off, and raised the held-out loss on clean "
    "images (0.030 -> 0.045) while raising their agreement, so the guard's loss cannot select it; not kept. "
    "Fixed learning rates, guard off, 300 / 1000 steps: 1e-3 +1.4 / +1.1, 3e-3 +1.7 / +1.4, 1e-2 +2.2 / +0.6 "
    "points on seed 0 and -0.3 to -1.1 on seed 1 (every parameter trained on 258 images overfits some seeds). "
    "The gain is there on average; a 42-image slice cannot say on which seed it is, and the guard is built to "
    "keep the calibrated state when it cannot tell (on the real detector a lower loss came with worse "
    "detections). Even a selector that kept exactly the seeds that gain would average +0.65 (separable, "
    "group auto) here, short of the +1 point of issue 12.",
)


def write(out: Path, results, accuracies) -> None:
    lines = [
        "# Fidelity benchmark: does the swapped network keep what it learned?",
        "",
        f"Generated by `python benchmarks/fidelity.py` on {platform.machine()}, Python {platform.python_version()} "
        f"({time.strftime('%Y-%m-%d')}), ONNX Runtime CPU.",
        "",
        "Two BN CNNs trained on scikit-learn's digits (8x8 images, 1077 training images), exported by torch.onnx "
        f"with BN kept; each is trained with seeds {', '.join(map(str, SEEDS))}. Every conversion is compared with "
        "its original on the 360 **held-out** images (never the calibration data): top-1 agreement as the mean "
        "over seeds with the range, and the cosine of the logits. Calibration uses "
        f"{CALIBRATION_SAMPLES} unlabeled training images. 'gamma/beta copied' is what other tools do (Opacus "
        "even resets them to 1/0); 'norms only' fits the new layers' scale and shift without refitting the output "
        "layer. Calibration time is also given as a multiple of one forward pass of the original model over the "
        "calibration data (onnxruntime, optimizations off); 'passes' counts runs of each model over the data.",
        "",
        "Original held-out accuracy: " + "; ".join(f"{k} {_mean(v):.3f}" for k, v in accuracies.items()) + ". "
        "Training is not bit-reproducible across machines and library builds, so the networks (and every row) "
        "move a little between runs of this benchmark: compare rows within one table.",
        "",
        "| network | conversion | top-1 agreement (min-max) | logit cosine | groups used | calibration s "
        "| x forward | passes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    references = {k[1:]: v for k, v in results.items() if k[0] == "reference"}
    refined = {k[1:]: v for k, v in results.items() if k[0] == "refine"}
    results = {k: v for k, v in results.items() if k[0] not in ("reference", "refine")}
    for (net, label), runs in results.items():
        agree = [r[0] for r in runs]
        groups = sorted(set().union(*(r[2] for r in runs)))
        secs, ratio, passes = _mean(r[3] for r in runs), _mean(r[4] for r in runs), _mean(r[5] for r in runs)
        lines.append(f"| {net} | {label} | {_mean(agree):.1%} ({min(agree):.1%}-{max(agree):.1%}) | "
                     f"{_mean(r[1] for r in runs):.4f} | {', '.join(map(str, groups))} | "
                     f"{'-' if secs is None else f'{secs:.2f}'} | {'-' if ratio is None else f'{ratio:.0f}'} | "
                     f"{'-' if passes is None else f'{passes:.0f}'} |")
    lines += refine_table(refined)
    lines += [
        "",
        "## Segmented calibration against the level-by-level fit it replaced",
        "",
        "Calibration now runs each model once, segment by segment, and computes its sums inside onnxruntime from "
        "float32 moments (docs/benchmarks.md, section 5). On the same trained networks and seeds, the new layers "
        "fitted that way (norms only, so the output-layer refit does not hide a difference) against the plain "
        "level-by-level fit with whole-model runs and float64 normalization in numpy "
        "(tests/onnx/sequential_calibration.py, the oracle the tests compare with):",
        "",
        "| network | conversion (norms only) | segmented | level by level | largest difference of a seed |",
        "|---|---|---|---|---|",
    ]
    for (net, label), runs in references.items():
        lines.append(f"| {net} | {label} | {_mean(r[0] for r in runs):.1%} | {_mean(r[1] for r in runs):.1%} | "
                     f"{max(abs(r[0] - r[1]) for r in runs):.1%} |")
    lines += [
        "",
        "Targets: ONNX path (issue 3) calibrated GroupNorm >= 97% and calibrated LayerNorm >= 99%; PyTorch path "
        "(issue 4) calibrated GroupNorm >= 97% and calibrated + refined >= 99.5% held-out agreement. 'PyTorch:' "
        "rows convert the trained torch module directly (calibration alone, refinement off; "
        "agreement measured in eager PyTorch). Both frontends calibrate with the same math and give the same "
        "figures.",
        "",
        "Reading the table:",
        "- Copying gamma/beta keeps 12-25% agreement: the network forgets what it learned. Calibration brings "
        "GroupNorm and LayerNorm to ~98%.",
        "- `--groups 32` is honoured as far as the channels allow: on these nets (12-44 channels) that is the "
        "largest divisor of C up to 32, i.e. one channel per group in most layers -- InstanceNorm, which throws "
        "away each channel's spatial mean, information no per-channel affine can restore (the 'G=32' and "
        "'instance' rows). `--groups auto` lets calibration choose each layer's "
        "count by measured fit; here it picks one or two groups (as LayerNorm). Layers of 64 channels or more keep "
        "at least two channels per group at G=32 (not measured here); the report lists the count of every layer "
        "either way.",
        "- LayerNorm normalizes each sample by its own statistics: the per-sample scale and offset that BN kept are "
        "gone, and the closed-form fit can only match them on average. The output-layer refit recovers about one "
        "point; the remaining gap to 99% is what such a per-channel fit cannot express on these tiny nets.",
        "",
        "## Where the remaining gap comes from (measured 2026-11-26, depthwise-separable net, LayerNorm)",
        "",
        "- Calibrating on the 360 held-out images themselves (in-sample) reaches only 96.9-98.1% on them, while "
        "calibrating on 300 training images gives 98.8-99.1% agreement on the *other* training images: the held-out "
        "digits are the ones the network decides with small margins, and those flip first.",
        "- Tried and not kept (each moved the mean by less than +-0.5 points): a second, ReLU-aware fitting round "
        "(least squares only where the BN output or the fit is positive); closed-form reconstruction of every Conv "
        "(im2col least squares against the original conv outputs); scale-invariant targets; a Gauss-Newton "
        "refinement of all scale/shift parameters against the original logits with a finite-difference Jacobian "
        "(+0.5 points for 2*sum(C) extra forward passes per step).",
        "- Gradient-based training of the new layers' scale and shift alone (the distillation of 2026-11, PyTorch "
        "path) added 0-1 point; with the rest of the network frozen it cannot reach 99.5% here either (also measured: "
        "200 / 300 / 1000 steps, learning rates 1e-3 / 1e-2, a softened-KL loss instead of MSE -- all within "
        "+-0.5 points of each other).",
        "",
    ]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "fidelity.md")
    run(parser.parse_args().out)
