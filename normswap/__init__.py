"""normswap: rewrite the BatchNorm layers of trained networks -- fold, affine -- and validate the result.

Public API: ``inspect``, ``convert``, ``compare``, ``validate``, ``restore`` (PyTorch), the option groups, the report
types and the errors.
"""
from . import validate as _validate_package  # noqa: F401 -- imported first, so the function below keeps the name
from .api import ConversionResult, batch_sensitivity, convert, inspect, restore, validate
from .comparison import compare
from .errors import (InvalidModelError, NormswapError, OutputError, UnsupportedError, UsageError,
                     ValidationFailedError)
from .options import CalibrationOptions, RefinementOptions, ValidationOptions
from .report import (CompareReport, CompareRow, ConversionReport, InspectReport, LayerRecord, LayerSensitivity,
                     OutputComparison, PlanReport, RefinementReport, SensitivityReport, ValidationReport)
from .targets import TARGETS, Target

__version__ = "0.1.0"

__all__ = [
    "CalibrationOptions", "CompareReport", "CompareRow", "ConversionReport", "ConversionResult", "InspectReport",
    "InvalidModelError", "LayerRecord", "LayerSensitivity", "NormswapError", "OutputComparison", "OutputError",
    "PlanReport", "RefinementOptions", "RefinementReport", "SensitivityReport", "ValidationOptions",
    "TARGETS", "Target", "UnsupportedError", "UsageError", "ValidationFailedError", "ValidationReport",
    "batch_sensitivity", "compare", "convert", "inspect", "restore", "validate",
]
