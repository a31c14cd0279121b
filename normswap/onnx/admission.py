"""Would the tools the converted model is made for accept the input? Asked before converting.

``onnx.checker`` (full check: with strict type and shape inference) runs on the weightless skeleton
(``types.skeleton``): single definition of every value, known operators and their attributes, opset imports, IR
version rules, operand types -- at any model size, with no weight copied.
Only when the checker objects is the model loaded in onnxruntime (CPU, no optimizations) to see whether the
runtime refuses it too: a model both refuse is refused here (nothing is converted or written, whether or not
validation was asked for); a model only the checker objects to (real exports often carry a stale value_info)
is converted with a note.
"""
from __future__ import annotations

import os
import tempfile

import onnx

from .types import skeleton


def checker_problem(model: onnx.ModelProto) -> str | None:
    """The first line of ``onnx.checker``'s objection to ``model``, or None when it has none."""
    try:
        onnx.checker.check_model(skeleton(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    except Exception:  # noqa: BLE001 -- a checker crash is not a verdict on the model
        return None
    return None


def runtime_problem(model: onnx.ModelProto | str | os.PathLike) -> str | None:
    """Why onnxruntime refuses to load ``model`` (a proto, or the file it was read from), or None."""
    from ..errors import UnsupportedError
    from ..validate.providers import CPU
    from ..validate.runner import make_session
    with tempfile.TemporaryDirectory(prefix="normswap-admission-") as tmp:
        try:
            make_session(model, (CPU,), tmp, "input")
        except UnsupportedError as e:
            return str(e).removeprefix("onnxruntime cannot load the input model: ")
    return None


def assess(model: onnx.ModelProto, source: onnx.ModelProto | str | os.PathLike) -> tuple[str | None, bool]:
    """(what is wrong with the input model, in one line, or None; whether onnxruntime refuses it too).
    ``source``: what onnxruntime should load (the file the model was read from, or the proto)."""
    problem = checker_problem(model)
    if problem is None:
        return None, False
    refused = runtime_problem(source)
    if refused:
        return f"the input model is invalid and onnxruntime refuses it ({refused}); onnx.checker: {problem}", True
    return f"onnx.checker objects to the input model ({problem}); onnxruntime loads it", False


def admit(model: onnx.ModelProto, source: onnx.ModelProto | str | os.PathLike) -> str | None:
    """Refuse (``InvalidModelError``) a model that onnx.checker and onnxruntime both refuse; return a note when
    only the checker objects; None when it is accepted."""
    problem, refused = assess(model, source)
    if refused:
        from ..errors import InvalidModelError
        raise InvalidModelError(f"{problem}; fix the model first")
    return f"{problem}, so it was converted" if problem else None
