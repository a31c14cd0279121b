"""Numerical validation in ONNX Runtime: provider selection, input generation, comparison.

onnxruntime is imported lazily, inside the functions that run sessions.
"""
