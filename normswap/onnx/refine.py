"""Refinement of a converted ONNX model after calibration: the original and the converted graph run in torch
(``torch_executor``), the shared refinement loop (``torch.refine``: loss per output kind, warm-up and cosine
decay within a time budget, held-out guard on task agreement, the calibrated state restored when no step beats
it) trains the converted graph's initializers, and the trained values are written back into the initializers
they came from -- graph, names, shapes, dtypes, opset and IR version untouched.

What trains: scope ``all`` -- every float initializer whose every use is a weight, bias, scale or shift (Conv /
ConvTranspose / Gemm / MatMul operands, Add / Sub / Mul operands, the scale and bias of normalization nodes,
PRelu slopes); never a Resize scale, a Clip bound, a shape or an exponent. Scope ``norms`` -- the new layers'
per-channel scale and shift only. torch is imported only here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..options import RefinementOptions
from ..report import RefinementReport
from ..validate.agreement import TaskMeasure

TRAINABLE_ROLES = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "Add": (0, 1),
                   "Sub": (0, 1), "Mul": (0, 1), "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2),
                   "LayerNormalization": (1, 2), "GroupNormalization": (1, 2), "PRelu": (1,)}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}


def trainable_initializers(model: onnx.ModelProto, scope: str, norm_tensors: list[str]) -> list[str]:
    """The initializers refinement may change (see the module doc), in model order."""
    if scope == "norms":
        present = {t.name for t in model.graph.initializer}
        return [n for n in dict.fromkeys(norm_tensors) if n in present]
    uses: dict[str, list[bool]] = {}
    for node in model.graph.node:
        roles = TRAINABLE_ROLES.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
        for k, name in enumerate(node.input):
            uses.setdefault(name, []).append(k in roles)
    return [t.name for t in model.graph.initializer
            if t.data_type in _FLOATS and uses.get(t.name) and all(uses[t.name])]


def refine_onnx(reference: onnx.ModelProto | str | os.PathLike, converted: onnx.ModelProto, norm_tensors: list[str],
                calibration: dict[str, np.ndarray], options: RefinementOptions, task: TaskMeasure = TaskMeasure(),
                progress=None) -> RefinementReport:
    """Train ``converted``'s initializers (in place) towards ``reference``'s outputs on ``calibration``; returns
    what ran. Raises ``UnsupportedError`` when the executor cannot run one of the graphs."""
    import torch

    from ..torch.data import Batches
    from ..torch.refine import refine
    from .io import load_model
    from .torch_executor import OnnxModule
    original = reference if isinstance(reference, onnx.ModelProto) else load_model(Path(reference)).model
    names = trainable_initializers(converted, options.scope, norm_tensors)
    teacher = OnnxModule(original)
    student = OnnxModule(converted, trainable=names)
    fixed = [d.dim_value for i in converted.graph.input if i.name in student.input_names
             for d in i.type.tensor_type.shape.dim[:1] if d.dim_value > 0]
    tensors = tuple(torch.from_numpy(np.ascontiguousarray(calibration[n])) for n in student.input_names)
    size = fixed[0] if fixed else options.batch_size
    data = Batches(tensors, len(tensors), size)
    if fixed:  # a fixed-batch model takes its own batch
        from dataclasses import replace
        options = replace(options, batch_size=size)
    result = refine(teacher, student, list(student.parameters()), data, options, task, progress)
    if result.kept:
        trained = student.initializer_arrays()
        for k, tensor in enumerate(converted.graph.initializer):
            if tensor.name in trained:
                converted.graph.initializer[k].CopyFrom(numpy_helper.from_array(trained[tensor.name], tensor.name))
    return result


__all__ = ["TRAINABLE_ROLES", "refine_onnx", "trainable_initializers"]
