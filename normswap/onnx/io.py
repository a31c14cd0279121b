"""Safe loading and atomic saving of ONNX models.

Loading never guesses the format, never follows links for external data, and checks every external-data
reference (location inside the model's folder, offset and length within the file and equal to the tensor's
size) before reading a byte. Saving writes to a temporary file in the destination folder, fsyncs and renames, so
the destination holds either the old file or the complete new one; models over 2 GB are written with external
data.
"""
from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from ..errors import InvalidModelError, OutputError, UsageError
from .walk import iter_graphs, iter_tensors

PROTOBUF_LIMIT = 2**31 - 1
# Save with external data well below the hard protobuf limit (the serialized size grows with headers).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# Tensors at least this large go to the external data file when saving with external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024
EXTERNAL_ALIGNMENT = 4096


@dataclass
class LoadedModel:
    model: onnx.ModelProto
    path: Path
    had_external_data: bool


def _sniff_not_onnx(head: bytes) -> str | None:
    """Name what a file looks like when it is clearly not a serialized ModelProto."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (normswap never unpickles files)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch checkpoint?)"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file"
    return None


def _tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's raw data must hold, or None for types without a fixed item size."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    np_type = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    return count * np.dtype(np_type).itemsize


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _check_no_links(base: Path, relative: Path, tensor_name: str) -> Path:
    """Resolve ``base/relative`` refusing any symbolic link along the way and any hard-linked file."""
    current = base
    for part in relative.parts:
        current = current / part
        if current.is_symlink():
            raise InvalidModelError(
                f"external data of tensor '{tensor_name}' goes through the link '{current}'; "
                "copy the data file next to the model instead of linking it")
    try:
        st = current.stat()
    except FileNotFoundError:
        raise InvalidModelError(
            f"external data file '{relative}' of tensor '{tensor_name}' is missing; "
            "keep the data file next to the model") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidModelError(f"external data '{relative}' of tensor '{tensor_name}' is not a regular file")
    if st.st_nlink > 1:
        raise InvalidModelError(
            f"external data file '{relative}' of tensor '{tensor_name}' is hard-linked elsewhere; "
            "copy it to a plain file next to the model")
    return current


def _read_external(tensor: onnx.TensorProto, base: Path) -> None:
    """Check one external-data reference and load its bytes into ``raw_data``."""
    info = _external_info(tensor)
    location = info.get("location", "")
    name = tensor.name or "<unnamed>"
    if not location:
        raise InvalidModelError(f"tensor '{name}' is marked external but names no location")
    rel = Path(location)
    if rel.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise InvalidModelError(
            f"external data of tensor '{name}' has the absolute location '{location}'; "
            "only files inside the model's folder are read")
    if any(part == ".." for part in rel.parts):
        raise InvalidModelError(
            f"external data of tensor '{name}' escapes the model's folder ('{location}'); "
            "only files inside the model's folder are read")
    path = _check_no_links(base, rel, name)
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InvalidModelError(f"tensor '{name}' has a non-numeric external data offset or length") from None
    size = path.stat().st_size
    expected = _tensor_nbytes(tensor)
    if offset < 0 or (length is not None and length < 0):
        raise InvalidModelError(f"tensor '{name}' has a negative external data offset or length")
    if length is None:
        length = expected if expected is not None else size - offset
    if offset + length > size:
        raise InvalidModelError(
            f"external data of tensor '{name}' asks for bytes {offset}..{offset + length} "
            f"but '{location}' has only {size}; the data file is truncated or does not belong to this model")
    if expected is not None and length != expected:
        raise InvalidModelError(
            f"external data of tensor '{name}' is {length} bytes but its shape and type need {expected}; "
            "the data file does not belong to this model")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise InvalidModelError(f"external data file '{location}' changed while it was read")
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def parse_model_bytes(data: bytes, source: str) -> onnx.ModelProto:
    """Parse a serialized ModelProto, refusing anything that is not clearly an ONNX model."""
    if not data:
        raise InvalidModelError(f"'{source}' is empty; pass a serialized ONNX model")
    looks_like = _sniff_not_onnx(data[:64])
    if looks_like:
        raise InvalidModelError(f"'{source}' is {looks_like}, not an ONNX model")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except DecodeError:
        raise InvalidModelError(f"'{source}' is not a valid ONNX model (truncated or corrupt protobuf)") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise InvalidModelError(
            f"'{source}' parses but is not an ONNX model (no IR version, graph or opset); pass a .onnx file")
    return model


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Load an ONNX model from ``path`` with its external data, checking everything first."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"model file '{p}' does not exist")
    if not p.is_file():
        raise UsageError(f"'{p}' is not a file; pass the path of a .onnx model")
    model = parse_model_bytes(p.read_bytes(), str(p))
    base = p.resolve().parent
    had_external = False
    for tensor in iter_tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            had_external = True
            _read_external(tensor, base)
    return LoadedModel(model, p, had_external)


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset for ``domain`` ('' and 'ai.onnx' are the same domain); 0 when not imported."""
    for o in model.opset_import:
        if o.domain in ((domain,) if domain else ("", "ai.onnx")):
            return o.version
    return 0


def _without(message, excluded: str):
    """A copy of ``message`` with every set field except ``excluded`` (no large field is copied)."""
    out = type(message)()
    for field, value in message.ListFields():
        if field.name == excluded:
            continue
        if field.is_repeated:
            getattr(out, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(out, field.name).CopyFrom(value)
        else:
            setattr(out, field.name, value)
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """Tag and length prefix of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


GRAPH_FIELD, INITIALIZER_FIELD, RAW_DATA_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, raw_data


class _Plan:
    """The serialized layout of a model, with each initializer's raw bytes left in the proto until written.

    ``SerializeToString`` on a 700 MB model copies every weight into one bytes object (and is several times
    slower after weights were replaced from Python); the plan holds only headers, and ``write`` streams each
    initializer's raw bytes straight to the file. The bytes are identical to a protobuf serialization up to field
    order, which protobuf parsers accept.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.model_head = _without(model, "graph").SerializeToString()
        self.graph_head = _without(graph, "initializer").SerializeToString()
        self.tensors: list[tuple[onnx.TensorProto, bytes, int]] = []  # (tensor, header, raw length)
        graph_size = len(self.graph_head)
        for tensor in graph.initializer:
            if tensor.HasField("raw_data"):
                raw_len = len(tensor.raw_data)
                header = _without(tensor, "raw_data").SerializeToString()
                size = len(header) + len(_field(RAW_DATA_FIELD, raw_len)) + raw_len
            else:
                header, raw_len = tensor.SerializeToString(), -1
                size = len(header)
            self.tensors.append((tensor, header, raw_len))
            graph_size += len(_field(INITIALIZER_FIELD, size)) + size
        self.graph_size = graph_size
        self.size = len(self.model_head) + len(_field(GRAPH_FIELD, graph_size)) + graph_size

    def write(self, f) -> None:
        f.write(self.model_head)
        f.write(_field(GRAPH_FIELD, self.graph_size))
        f.write(self.graph_head)
        for tensor, header, raw_len in self.tensors:
            if raw_len < 0:
                f.write(_field(INITIALIZER_FIELD, len(header)))
                f.write(header)
                continue
            raw_field = _field(RAW_DATA_FIELD, raw_len)
            f.write(_field(INITIALIZER_FIELD, len(header) + len(raw_field) + raw_len))
            f.write(header)
            f.write(raw_field)
            f.write(tensor.raw_data)


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model is too large for one protobuf (measured without serializing the weights)."""
    return _Plan(model).size > EXTERNAL_DATA_THRESHOLD


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(dest: Path, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``dest``, fsync, then rename over ``dest``."""
    folder = dest.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise OutputError(f"cannot write to folder '{folder}': {e.strerror}; choose a writable output path") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise OutputError(f"cannot write '{dest}': {e.strerror}; check free space and permissions") from None
        raise
    _fsync_dir(folder)


def _external_name(dest: Path) -> str:
    """Data file name for ``dest``: ``<name>.data``, or a fresh unique name when that file already exists
    (so an existing model never points at a half-written data file)."""
    candidate = dest.name + ".data"
    if not (dest.parent / candidate).exists():
        return candidate
    return f"{dest.name}.{os.urandom(4).hex()}.data"


def save_model(model: onnx.ModelProto, dest: str | os.PathLike, external_data: bool = False) -> list[Path]:
    """Write ``model`` to ``dest`` atomically, streaming the weights; with ``external_data`` (forced above 2 GB)
    main-graph initializers of at least 1 KiB go to a data file beside it. Returns the files written. ``model``
    is never modified."""
    dest = Path(dest)
    if dest.is_dir():
        raise OutputError(f"output '{dest}' is a folder; pass a file path ending in .onnx")
    if not dest.parent.exists():
        raise OutputError(f"output folder '{dest.parent}' does not exist; create it first")
    plan = _Plan(model)
    if not external_data and plan.size <= EXTERNAL_DATA_THRESHOLD:
        write_atomically(dest, plan.write)
        return [dest]
    data_name = _external_name(dest)
    headers: list[onnx.TensorProto] = []

    def write_data(f) -> None:
        offset = 0
        for tensor in model.graph.initializer:
            nbytes = _tensor_nbytes(tensor)
            if nbytes is None or nbytes < EXTERNAL_TENSOR_MIN_BYTES:
                headers.append(tensor)
                continue
            raw = tensor.raw_data if tensor.HasField("raw_data") else \
                onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor)).raw_data
            pad = (-offset) % EXTERNAL_ALIGNMENT
            f.write(b"\0" * pad)
            offset += pad
            f.write(raw)
            header = _without(tensor, "raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                header.ClearField(field)
            header.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                entry = header.external_data.add()
                entry.key, entry.value = key, value
            headers.append(header)
            offset += len(raw)

    write_atomically(dest.parent / data_name, write_data)
    skeleton = _without(model, "graph")
    skeleton.graph.CopyFrom(_without(model.graph, "initializer"))
    skeleton.graph.initializer.extend(headers)  # small tensors are copied, large ones are headers only
    write_atomically(dest, lambda f: f.write(skeleton.SerializeToString()))
    return [dest, dest.parent / data_name]


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (through links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def graph_count(model: onnx.ModelProto) -> int:
    """Total number of nodes in the model, subgraphs included."""
    return sum(len(g.node) for _, g in iter_graphs(model.graph))
