"""Which onnxruntime ops could compute calibration's per-sample, per-channel fit sums in fewer passes (issue 21):
each op alone on float32 tensors of the shapes calibration reduces, warm, fastest of 5 rounds of 10 runs.

Calibration needs sum x, sum x^2, sum x*y per (sample, channel) after centring (``onnx/fit_stats.py``:
Sub, ReduceSum, ReduceSumSquare, Mul then ReduceSum). Candidates measured here: the global pools
(GlobalAveragePool for a sum, GlobalLpPool with p=2 for a sum of squares), the product's sum as a batched MatMul
or an Einsum, and LayerNormalization over each (sample, channel) row, whose Mean and InvStdDev outputs (opset 17)
give the mean and variance in one op.

Usage: python benchmarks/reduction_ops.py -- prints a table (recorded in docs/benchmarks.md section 6).
"""
from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SHAPES = [(64, 16, 24, 96), (64, 48, 6, 24), (64, 96, 12, 12), (16, 256, 56, 56)]


def _session(nodes, inputs, initializers=()):
    graph = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in inputs],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _cases(c: int) -> dict:
    rows = numpy_helper.from_array(np.array([0, c, -1], np.int64), "rows")
    last = numpy_helper.from_array(np.array([2], np.int64), "last")
    column = numpy_helper.from_array(np.array([3], np.int64), "column")
    flat = [helper.make_node("Reshape", ["x", "rows"], ["xr"])]
    return {
        "ReduceSum": (flat + [helper.make_node("ReduceSum", ["xr", "last"], ["o"], keepdims=0)], ["x"], [rows, last]),
        "ReduceSumSquare": (flat + [helper.make_node("ReduceSumSquare", ["xr", "last"], ["o"], keepdims=0)], ["x"],
                            [rows, last]),
        "GlobalAveragePool": ([helper.make_node("GlobalAveragePool", ["x"], ["o"])], ["x"], []),
        "GlobalLpPool p=2": ([helper.make_node("GlobalLpPool", ["x"], ["o"], p=2)], ["x"], []),
        "Mul, ReduceSum (x*y)": ([helper.make_node("Mul", ["x", "y"], ["m"]),
                                  helper.make_node("Reshape", ["m", "rows"], ["mr"]),
                                  helper.make_node("ReduceSum", ["mr", "last"], ["o"], keepdims=0)], ["x", "y"],
                                 [rows, last]),
        "MatMul (x*y)": (flat + [helper.make_node("Reshape", ["y", "rows"], ["yr"]),
                                 helper.make_node("Unsqueeze", ["xr", "last"], ["xu"]),
                                 helper.make_node("Unsqueeze", ["yr", "column"], ["yu"]),
                                 helper.make_node("MatMul", ["xu", "yu"], ["o"])], ["x", "y"], [rows, last, column]),
        "Einsum (x*y)": ([helper.make_node("Einsum", ["x", "y"], ["o"], equation="nchw,nchw->nc")], ["x", "y"], []),
        "Sub, ReduceSum, ReduceSumSquare (today's x side)": (
            [helper.make_node("Sub", ["x", "centre"], ["xc"]), helper.make_node("Reshape", ["xc", "rows"], ["xr"]),
             helper.make_node("ReduceSum", ["xr", "last"], ["s1"], keepdims=0),
             helper.make_node("ReduceSumSquare", ["xr", "last"], ["s2"], keepdims=0),
             helper.make_node("Add", ["s1", "s2"], ["o"])], ["x"],
            [rows, last, numpy_helper.from_array(np.ones((1, c, 1, 1), np.float32), "centre")]),
        "LayerNormalization (mean, inv. std)": (
            flat + [helper.make_node("LayerNormalization", ["xr", "unit"], ["z", "mean", "inv"], axis=-1,
                                     epsilon=1e-12), helper.make_node("Add", ["mean", "inv"], ["o"])], ["x"],
            [rows, numpy_helper.from_array(np.ones(1, np.float32), "unit")]),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    names = list(_cases(1))
    print("| shape | MB | " + " | ".join(f"{n} ms" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    for shape in SHAPES:
        x, y = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        cells = []
        for nodes, inputs, inits in _cases(shape[1]).values():
            session = _session(nodes, inputs, inits)
            feeds = {"x": x, "y": y} if "y" in inputs else {"x": x}
            session.run(None, feeds)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(10):
                    session.run(None, feeds)
                best = min(best, (time.perf_counter() - start) / 10)
            cells.append(f"{best * 1e3:.2f}")
        print(f"| {shape} | {x.nbytes >> 20} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
