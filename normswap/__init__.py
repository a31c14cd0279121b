"""normswap: rewrite the BatchNorm layers of trained networks -- fold, affine -- and validate the result.

Public API: ``inspect``, ``convert``, ``validate``, ``restore`` (PyTorch), the report types and the errors.
"""
from . import validate as _validate_package  # noqa: F401 -- imported first, so the function below keeps the name
from .api import ConversionResult, convert, inspect, restore, validate
from .errors import (InvalidModelError, NormswapError, OutputError, UnsupportedError, UsageError,
                     ValidationFailedError)
from .report import ConversionReport, InspectReport, LayerRecord, OutputComparison, ValidationReport
from .targets import TARGETS, Target

__version__ = "0.1.0"

__all__ = [
    "ConversionReport", "ConversionResult", "InspectReport", "InvalidModelError", "LayerRecord", "NormswapError",
    "OutputComparison", "OutputError", "TARGETS", "Target", "UnsupportedError", "UsageError",
    "ValidationFailedError", "ValidationReport", "convert", "inspect", "restore", "validate",
]
