"""Running the reference and the candidate in ONNX Runtime and comparing every output.

The reference runs with graph optimizations disabled (``ORT_DISABLE_ALL``): onnxruntime's basic level already
fuses Conv+BatchNorm, which would hide a wrong fold. The candidate runs the same way, so the check compares the
two graphs' math, not onnxruntime's rewrites of them.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

import numpy as np
import onnx

from ..errors import InvalidModelError, UnsupportedError
from ..report import ValidationReport
from .compare import DEFAULT_ATOL, DEFAULT_RTOL, compare_output
from .inputs import check_feeds, load_npz_inputs, random_inputs
from .providers import ORT_SILENT, check_ran, select_providers

OPTIMIZATION = "ORT_DISABLE_ALL"


def _session(model: onnx.ModelProto | str | os.PathLike, providers: tuple[str, ...], workdir: str, label: str):
    import onnxruntime as ort
    from ..onnx.io import needs_external_data, save_model
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = ORT_SILENT
    if isinstance(model, (str, os.PathLike)):  # a file normswap loaded and checked: onnxruntime reads it again
        source = str(model)
    elif needs_external_data(model):
        path = os.path.join(workdir, f"{label}.onnx")
        save_model(model, path, external_data=True)
        source = path
    else:
        source = model.SerializeToString()
    try:
        return ort.InferenceSession(source, options, providers=list(providers))
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnsupportedError(f"onnxruntime cannot load the {label} model: {message}") from None


def _run(session, feeds: Mapping[str, np.ndarray], label: str) -> dict[str, np.ndarray]:
    try:
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, dict(feeds))))
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InvalidModelError(f"onnxruntime failed to run the {label} model: {message}; "
                                "check --inputs / --input-shape") from None


def make_feeds(model: onnx.ModelProto, inputs: str | os.PathLike | Mapping[str, np.ndarray] | None,
               input_shapes: Mapping[str, tuple[int, ...]] | None, seed: int) -> tuple[dict, str]:
    """Feeds and a description of where they came from."""
    if inputs is None:
        return random_inputs(model, input_shapes, seed), f"random (seed {seed})"
    if isinstance(inputs, Mapping):
        return check_feeds(inputs, model, "the inputs mapping"), "given arrays"
    return load_npz_inputs(inputs, model), str(inputs)


def validate_models(reference: onnx.ModelProto | str | os.PathLike, candidate: onnx.ModelProto, *, provider: str = "auto",
                    inputs: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
                    input_shapes: Mapping[str, tuple[int, ...]] | None = None, atol: float = DEFAULT_ATOL,
                    rtol: float = DEFAULT_RTOL, seed: int = 0) -> ValidationReport:
    """Run both models on the same inputs and compare every output of the reference by name. ``reference`` may be
    the path of the unmodified original (then the inputs are read off the candidate, which has the same ones)."""
    choice = select_providers(provider)
    feeds, source = make_feeds(reference if isinstance(reference, onnx.ModelProto) else candidate, inputs,
                               input_shapes, seed)
    with tempfile.TemporaryDirectory(prefix="normswap-") as workdir:
        ref_session = _session(reference, choice.providers, workdir, "reference")
        cand_session = _session(candidate, choice.providers, workdir, "candidate")
        ran = list(dict.fromkeys(ref_session.get_providers() + cand_session.get_providers()))
        check_ran(choice, ran)
        ref_out = _run(ref_session, feeds, "reference")
        cand_names = {o.name for o in cand_session.get_outputs()}
        missing = [n for n in ref_out if n not in cand_names]
        if missing:
            raise InvalidModelError(f"the candidate has no output(s) {missing} that the reference has; "
                                    "compare models with the same outputs")
        cand_out = _run(cand_session, {k: v for k, v in feeds.items()
                                       if k in {i.name for i in cand_session.get_inputs()}}, "candidate")
    comparisons = [compare_output(name, ref_out[name], cand_out[name], atol, rtol) for name in ref_out]
    return ValidationReport("exact", ran, provider, OPTIMIZATION, atol, rtol, source, comparisons)
