"""External data: checked before anything is read, then either loaded or bound for lazy, streamed use.

Every reference is validated first: the location must be relative, must not contain '..', must not pass through
a symbolic link, the file must be a regular, not hard-linked file, and offset + length must lie in the file with
length equal to the tensor's size. A *bound* tensor keeps its data in the file: its location is replaced, in
memory only, by the validated absolute path, and its bytes are read on demand (one tensor at a time, opened with
O_NOFOLLOW) or copied file-to-file when the model is saved -- never decoded. normswap never writes an absolute
location: saving rewrites every reference.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InvalidModelError

COPY_CHUNK = 1 << 26  # bytes per read when copying external data file to file


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's raw data must hold, or None for types without a fixed item size."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count * 4 + 7) // 8
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def _info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _no_links(base: Path, relative: Path, name: str) -> Path:
    current = base
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise InvalidModelError(f"external data of tensor '{name}' goes through the link '{current}'; "
                                    "copy the data file next to the model instead of linking it")
    try:
        st = current.stat()
    except FileNotFoundError:
        raise InvalidModelError(f"external data file '{relative}' of tensor '{name}' is missing; "
                                "keep the data file next to the model") from None
    except NotADirectoryError:
        raise InvalidModelError(f"external data '{relative}' of tensor '{name}' goes through a file that is not a "
                                "folder; the model is corrupt") from None
    except OSError as e:
        raise InvalidModelError(f"external data '{relative}' of tensor '{name}' cannot be read "
                                f"({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidModelError(f"external data '{relative}' of tensor '{name}' is not a regular file")
    if st.st_nlink > 1:
        raise InvalidModelError(f"external data file '{relative}' of tensor '{name}' is hard-linked elsewhere; "
                                "copy it to a plain file next to the model")
    return current


def resolve(tensor: onnx.TensorProto, base: Path) -> tuple[Path, int, int]:
    """Check a reference relative to the model's folder ``base``; returns (file, offset, length)."""
    info = _info(tensor)
    location = info.get("location", "")
    name = tensor.name or "<unnamed>"
    if not location:
        raise InvalidModelError(f"tensor '{name}' is marked external but names no location")
    if "\0" in location or len(location.encode()) > 4096 or any(len(p.encode()) > 255 for p in Path(location).parts):
        raise InvalidModelError(f"external data of tensor '{name}' has a location no file can have (a NUL byte, "
                                "or longer than the file system allows); the model is corrupt")
    if location.endswith(("/", "\\")):
        raise InvalidModelError(f"external data of tensor '{name}' has the location '{location}', which ends in a "
                                "separator (a folder, not a file); the model is corrupt")
    rel = Path(location)
    if rel.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise InvalidModelError(f"external data of tensor '{name}' has the absolute location '{location}'; "
                                "only files inside the model's folder are read")
    if any(part == ".." for part in rel.parts):
        raise InvalidModelError(f"external data of tensor '{name}' escapes the model's folder ('{location}'); "
                                "only files inside the model's folder are read")
    path = _no_links(base, rel, name)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InvalidModelError(f"tensor '{name}' has a non-numeric external data offset or length") from None
    size, expected = path.stat().st_size, tensor_nbytes(tensor)
    if offset < 0 or (length is not None and length < 0):
        raise InvalidModelError(f"tensor '{name}' has a negative external data offset or length")
    if length is None:
        length = expected if expected is not None else size - offset
    if offset + length > size:
        raise InvalidModelError(f"external data of tensor '{name}' asks for bytes {offset}..{offset + length} but "
                                f"'{location}' has only {size}; the data file is truncated or does not belong to "
                                "this model")
    if expected is not None and length != expected:
        raise InvalidModelError(f"external data of tensor '{name}' is {length} bytes but its shape and type need "
                                f"{expected}; the data file does not belong to this model")
    return path, offset, length


def _open(path: Path, length: int, offset: int, name: str):
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    f = os.fdopen(fd, "rb")
    if os.fstat(fd).st_size < offset + length:
        f.close()
        raise InvalidModelError(f"external data file of tensor '{name}' shrank while normswap was using it")
    f.seek(offset)
    return f


def _read(path: Path, offset: int, length: int, name: str) -> bytes:
    with _open(path, length, offset, name) as f:
        data = f.read(length)
    if len(data) != length:
        raise InvalidModelError(f"external data file of tensor '{name}' changed while it was read")
    return data


def load_into(tensor: onnx.TensorProto, base: Path) -> None:
    """Check the reference and move the bytes into ``raw_data``."""
    path, offset, length = resolve(tensor, base)
    tensor.raw_data = _read(path, offset, length, tensor.name)
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def bind(tensor: onnx.TensorProto, base: Path) -> None:
    """Check the reference and point it (in memory) at the absolute, validated file, offset and length."""
    path, offset, length = resolve(tensor, base)
    del tensor.external_data[:]
    for key, value in (("location", str(path)), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def bound_ref(tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    info = _info(tensor)
    return Path(info["location"]), int(info["offset"]), int(info["length"])


def raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's raw bytes, from ``raw_data`` or its bound file."""
    if not is_external(tensor):
        return tensor.raw_data
    path, offset, length = bound_ref(tensor)
    return _read(path, offset, length, tensor.name)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """``numpy_helper.to_array`` that also reads bound external tensors (one tensor at a time)."""
    if not is_external(tensor):
        return numpy_helper.to_array(tensor)
    inline = onnx.TensorProto()
    inline.name, inline.data_type = tensor.name, tensor.data_type
    inline.dims.extend(tensor.dims)
    inline.raw_data = raw_bytes(tensor)
    return numpy_helper.to_array(inline)


def stream(tensor: onnx.TensorProto, f) -> int:
    """Write a tensor's raw bytes to ``f`` -- file to file in chunks for a bound tensor; returns the count."""
    if not is_external(tensor):
        data = tensor.raw_data
        f.write(data)
        return len(data)
    path, offset, length = bound_ref(tensor)
    with _open(path, length, offset, tensor.name) as src:
        left = length
        while left:
            chunk = src.read(min(COPY_CHUNK, left))
            if not chunk:
                raise InvalidModelError(f"external data file of tensor '{tensor.name}' changed while it was copied")
            f.write(chunk)
            left -= len(chunk)
    return length


def payload_length(tensor: onnx.TensorProto) -> int | None:
    """Bytes of raw data the tensor carries (inline or bound), None when it uses typed fields."""
    if is_external(tensor):
        return bound_ref(tensor)[2]
    return len(tensor.raw_data) if tensor.HasField("raw_data") else None
