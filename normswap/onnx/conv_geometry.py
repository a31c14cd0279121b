"""Where a Conv / ConvTranspose / pooling window reads and writes: the padding and output sizes of their ONNX
attributes, split the way onnxruntime splits them (checked against its CPU kernels by tests/test_float64_ops.py).
Pure arithmetic, shared by the float64 yardstick (numpy) and the torch executor."""
from __future__ import annotations


def conv_pads(auto_pad: str | None, pads, size: list[int], kernel: list[int], strides: list[int],
              dilations: list[int]) -> tuple[list[int], list[int]]:
    """(begin, end) zero padding of a Conv's (or pool's) spatial axes."""
    n = len(size)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(n):
            out = -(-size[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size[i])
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin, end
    if auto_pad == "VALID" or pads is None:
        return [0] * n, [0] * n
    return list(pads[:n]), list(pads[n:])


def transpose_geometry(size: list[int], kernel: list[int], strides: list[int], dilations: list[int],
                       output_padding, output_shape, pads, auto_pad: str | None
                       ) -> tuple[list[int], list[int], list[int]]:
    """(full, begin, target) per spatial axis of a ConvTranspose: the size every input position's contribution
    spans (``s*(I-1) + output_padding + (k-1)*d + 1``), where the output starts in it (negative: before it), and the
    output size. The padding an output shape or auto_pad implies is split as onnxruntime does: SAME_UPPER puts the
    odd element at the end, SAME_LOWER and an explicit output_shape at the start; SAME padding is never negative."""
    nd = len(size)
    extra = list(output_padding) if output_padding is not None and len(output_padding) else [0] * nd
    full = [strides[i] * (size[i] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    implied = None
    if output_shape is not None and len(output_shape):
        target = list(output_shape)[-nd:]
        implied = [full[i] - target[i] for i in range(nd)]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        implied = [max(0, full[i] - size[i] * strides[i]) for i in range(nd)]
        target = [full[i] - implied[i] for i in range(nd)]
    if implied is not None:
        begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in implied]
    else:
        p = list(pads) if pads is not None and auto_pad != "VALID" else [0] * (2 * nd)
        begin = p[:nd]
        target = [full[i] - p[i] - p[i + nd] for i in range(nd)]
    return full, begin, target


__all__ = ["conv_pads", "transpose_geometry"]
