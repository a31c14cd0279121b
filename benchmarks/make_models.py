"""Generate deep Conv -> BatchNormalization -> Relu models for the scale benchmarks (random weights)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8


def conv_bn_relu(path: Path, layers: int, channels: int, kernel: int = 3, external: bool = False,
                 size: int = 8) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((channels, channels, kernel, kernel), dtype=np.float32)
             * np.float32(1.0 / np.sqrt(channels * kernel * kernel)))
        inits.append(numpy_helper.from_array(w, f"conv{i}.weight"))
        for name, v in (("gamma", rng.uniform(0.5, 1.5, channels)), ("beta", rng.uniform(-0.1, 0.1, channels)),
                        ("mean", rng.uniform(-0.1, 0.1, channels)), ("var", rng.uniform(0.5, 1.5, channels))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"bn{i}.{name}"))
        pad = kernel // 2
        nodes += [helper.make_node("Conv", [x, f"conv{i}.weight"], [f"c{i}"], name=f"conv{i}", pads=[pad] * 4),
                  helper.make_node("BatchNormalization", [f"c{i}"] + [f"bn{i}.{k}" for k in
                                                                       ("gamma", "beta", "mean", "var")],
                                   [f"b{i}"], name=f"bn{i}"),
                  helper.make_node("Relu", [f"b{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                             ["N", channels, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", channels, size, size])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


if __name__ == "__main__":
    conv_bn_relu(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), external=len(sys.argv) > 4)
