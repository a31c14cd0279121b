"""Folding a BatchNorm into its producer module, in float64, with the shared formulas of ``normswap._math``.

Conv: weight (M, C/g, k...) scaled along axis 0; ConvTranspose: weight (C_in, M/g, k...) scaled along axis 1
per group; Linear: weight (M, K) scaled along axis 0. Bias ``s * b + t``. The folded module is a new module
(the original's parameters are never changed); weights are cast back once to their dtype.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .._math import fold_bias, fold_conv_transpose_weight, fold_conv_weight, fold_matrix_columns

CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def output_axis(m: nn.Module) -> int:
    return 1 if isinstance(m, CONV_TRANSPOSE) else 0


def folded(producer: nn.Module, s: np.ndarray, t: np.ndarray) -> nn.Module:
    """A copy of ``producer`` whose output equals ``s * producer(x) + t`` per output channel."""
    w = producer.weight.detach().to("cpu", torch.float64).numpy()
    if isinstance(producer, CONV_TRANSPOSE):
        w2 = fold_conv_transpose_weight(w, s, producer.groups)
    elif isinstance(producer, nn.Linear):
        w2 = fold_matrix_columns(w, s, transposed=True)
    else:
        w2 = fold_conv_weight(w, s)
    b = None if producer.bias is None else producer.bias.detach().to("cpu", torch.float64).numpy()
    b2 = fold_bias(b, s, t)
    new = copy.deepcopy(producer)
    dtype, device = producer.weight.dtype, producer.weight.device
    with torch.no_grad():
        new.weight = nn.Parameter(torch.from_numpy(w2).to(device, dtype), requires_grad=producer.weight.requires_grad)
        new.bias = nn.Parameter(torch.from_numpy(b2).to(device, dtype), requires_grad=producer.weight.requires_grad)
    return new


def weight_normalized(module: nn.Module) -> nn.Module:
    """``weight = g * v / ||v||`` per output channel via torch's parametrization (exact at conversion)."""
    from torch.nn.utils.parametrizations import weight_norm
    return weight_norm(module, name="weight", dim=output_axis(module))
