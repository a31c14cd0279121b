"""Choosing the ONNX Runtime execution provider, and proving which one ran.

``onnxruntime-gpu`` lists CUDAExecutionProvider even on machines without CUDA libraries or a GPU; a session
asked for it then logs an error and silently runs on CPU. So "usable" is decided by a quiet probe session whose
``get_providers()`` must contain CUDA, and every report names the providers the real sessions returned.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

from ..errors import option
from ..errors import UnsupportedError, UsageError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
PROVIDER_CHOICES = ("auto", "cuda", "cpu")
ORT_DEFAULT_LOG_SEVERITY = 2  # onnxruntime's own default (warning)
ORT_SILENT = 4  # fatal only


@dataclass(frozen=True)
class ProviderChoice:
    requested: str
    providers: tuple[str, ...]
    note: str


def _runtime() -> ModuleType:
    import onnxruntime
    return onnxruntime


def _probe_model_bytes() -> bytes:
    import onnx
    from onnx import helper
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "normswap_probe",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=7).SerializeToString()


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence what native libraries print to fds 1 and 2 (onnxruntime's 'Failed to load libcublas...')."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def cuda_status(runtime: ModuleType | None = None) -> tuple[bool, str]:
    """Whether a CUDA session really gets created here, and why not when it does not."""
    rt = runtime or _runtime()
    if CUDA not in rt.get_available_providers():
        return False, "this onnxruntime build has no CUDA execution provider (install onnxruntime-gpu)"
    rt.set_default_logger_severity(ORT_SILENT)
    try:
        options = rt.SessionOptions()
        options.log_severity_level = ORT_SILENT
        with _quiet_native_output():
            preload = getattr(rt, "preload_dlls", None)
            if preload is not None and importlib.util.find_spec("nvidia") is not None:
                try:  # CUDA / cuDNN from the nvidia-* pip packages, when installed
                    preload(directory="")
                except Exception:
                    pass
            try:
                session = rt.InferenceSession(_probe_model_bytes(), options, providers=[CUDA, CPU])
            except Exception as e:
                return False, f"creating a CUDA session failed ({type(e).__name__})"
        if CUDA in session.get_providers():
            return True, "CUDA execution provider created"
        return False, "CUDA libraries (CUDA / cuDNN) or a GPU are missing, so onnxruntime fell back to CPU"
    finally:
        rt.set_default_logger_severity(ORT_DEFAULT_LOG_SEVERITY)


def select_providers(requested: str, runtime: ModuleType | None = None) -> ProviderChoice:
    """``auto``: CUDA when usable, else CPU; ``cuda``: CUDA or an UnsupportedError; ``cpu``: CPU."""
    if requested not in PROVIDER_CHOICES:
        raise UsageError(f"unknown provider '{requested}'; choose one of {', '.join(PROVIDER_CHOICES)}")
    if requested == "cpu":
        return ProviderChoice(requested, (CPU,), "CPU requested")
    usable, why = cuda_status(runtime)
    if usable:
        return ProviderChoice(requested, (CUDA, CPU), why)
    if requested == "cuda":
        raise UnsupportedError(f"CUDA was requested but is not usable: {why}; use {option('provider', 'cpu')} or auto")
    return ProviderChoice(requested, (CPU,), f"CPU (CUDA not usable: {why})")


def session_providers(providers: tuple[str, ...] | list[str], tf32: bool = False) -> list:
    """The providers as onnxruntime's session takes them: CUDA with TF32 off unless ``tf32`` -- TF32 rounds
    matmul and convolution inputs to 10 mantissa bits (about 1e-3 relative), a known source of large CUDA
    mismatches that an exact check would blame on the rewrite."""
    return [(p, {"use_tf32": "1" if tf32 else "0"}) if p == CUDA else p for p in providers]


def check_ran(choice: ProviderChoice, actual: list[str]) -> None:
    """Fail when CUDA was demanded but the real session did not create it."""
    if choice.requested == "cuda" and CUDA not in actual:
        raise UnsupportedError("CUDA was requested but onnxruntime created the session on "
                               f"{', '.join(actual)}; use {option('provider', 'cpu')} or auto")
