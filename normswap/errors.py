"""Errors normswap raises, each mapped to a documented process exit code.

Every message is one sentence that says what is wrong and what to do about it.
"""
from __future__ import annotations

import contextvars

EXIT_OK = 0
EXIT_VALIDATION_FAILED = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_UNSUPPORTED = 4
EXIT_CANNOT_WRITE = 5
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143  # SIGTERM (128 + SIGTERM)


class NormswapError(Exception):
    """Base class; ``exit_code`` is what the CLI returns for it."""

    exit_code = EXIT_INTERNAL


class ValidationFailedError(NormswapError):
    """The converted model does not match the original within tolerance."""

    exit_code = EXIT_VALIDATION_FAILED


class UsageError(NormswapError):
    """The arguments do not make sense together (bad option value, output equals input...)."""

    exit_code = EXIT_USAGE


class InvalidModelError(NormswapError):
    """The input is not a valid ONNX model, or is unsafe to read (external data escaping its folder...)."""

    exit_code = EXIT_INVALID_INPUT


class UnsupportedError(NormswapError):
    """The model or the request uses something normswap cannot handle (or CUDA was required but is not usable)."""

    exit_code = EXIT_UNSUPPORTED


class OutputError(NormswapError):
    """The output could not be written."""

    exit_code = EXIT_CANNOT_WRITE


# How a parameter is spelled in messages: the command line's flag, or the Python API's keyword. The CLI sets
# ``SPEAKING_CLI`` for its run; every message that names a parameter goes through ``option``.
SPEAKING_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("normswap_speaking_cli", default=False)
_FLAGS = {"calibration": "--calibrate", "input_shapes": "--input-shape", "to": "--to", "validate": "--no-validate",
          "example_inputs": "--calibrate", "refine": "--no-refine"}
_SWITCHES = {"validate", "refine"}  # flags without a value: option("refine", False) is --no-refine / refine=False


def option(name: str, value: object = None) -> str:
    """``option("input_shapes")`` is ``--input-shape`` from the CLI and ``input_shapes=`` from Python; with a
    value, ``--groups 7`` / ``groups=7``."""
    if SPEAKING_CLI.get():
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        return flag if value is None or name in _SWITCHES else f"{flag} {value}"
    keyword = f"{name}=False" if name in _SWITCHES else f"{name}="
    return keyword if value is None or name in _SWITCHES else f"{name}={value!r}"
