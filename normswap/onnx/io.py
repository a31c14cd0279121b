"""Safe loading and atomic saving of ONNX models.

Loading never guesses the format, never follows links for external data, and checks every external-data
reference (location inside the model's folder, offset and length within the file and equal to the tensor's
size) before reading a byte. Saving writes to a temporary file in the destination folder, fsyncs and renames, so
the destination holds either the old file or the complete new one; models over 2 GB are written with external
data.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import stat
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from ..errors import InvalidModelError, OutputError, UsageError
from . import external
from .external import tensor_nbytes
from .walk import iter_all_tensors, iter_graphs

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
    from .structure import check_structure
    check_structure(model)
    return model


def load_model(path: str | os.PathLike, lazy_external: bool = False) -> LoadedModel:
    """Load an ONNX model from ``path``, checking every external-data reference first. With ``lazy_external``
    the main graph's external initializers stay in their file (bound, read on demand, copied file to file when
    saved), so memory holds only what a conversion changes."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"model file '{p}' does not exist")
    if not p.is_file():
        raise UsageError(f"'{p}' is not a file; pass the path of a .onnx model")
    model = parse_model_bytes(p.read_bytes(), str(p))
    base = p.resolve().parent
    had_external = False
    for tensor in model.graph.initializer:
        if external.is_external(tensor):
            had_external = True
            (external.bind if lazy_external else external.load_into)(tensor, base)
    for tensor in iter_all_tensors(model):  # every other tensor, sparse parts and function bodies too: loaded
        if external.is_external(tensor):  # (after the same checks as the main graph's)
            had_external = True
            external.load_into(tensor, base)
    return LoadedModel(model, p, had_external)


def opset_of(model: onnx.ModelProto, domain: str = "") -> int:
    """The model's opset for ``domain`` ('' and 'ai.onnx' are the same domain); 0 when not imported."""
    for o in model.opset_import:
        if o.domain in ((domain,) if domain else ("", "ai.onnx")):
            return o.version
    return 0


def without_field(message, *excluded: str):
    """A copy of ``message`` with every set field except the ``excluded`` ones (no large field is copied)."""
    out = type(message)()
    for field, value in message.ListFields():
        if field.name in excluded:
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


def _payload_header(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """The tensor without its payload: no raw data, no typed data, no external reference."""
    header = without_field(tensor, "raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "external_data",
                  "data_location"):
        header.ClearField(field)
    return header


class _Plan:
    """The serialized layout of a model, with each initializer's raw bytes left in the proto until written.

    ``SerializeToString`` on a 700 MB model copies every weight into one bytes object (and is several times
    slower after weights were replaced from Python); the plan holds only headers, and ``write`` streams each
    initializer's raw bytes straight to the file. The bytes are identical to a protobuf serialization up to field
    order, which protobuf parsers accept.
    """

    def __init__(self, model: onnx.ModelProto, progress=None) -> None:
        self.model, self.progress = model, progress
        graph = model.graph
        self.model_head = without_field(model, "graph").SerializeToString()
        self.graph_head = without_field(graph, "initializer").SerializeToString()
        self.tensors: list[tuple[onnx.TensorProto, bytes, int]] = []  # (tensor, header, raw length)
        graph_size = len(self.graph_head)
        for tensor in graph.initializer:
            raw_len = external.payload_length(tensor)
            if raw_len is not None:
                header = _payload_header(tensor).SerializeToString()
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
        for k, (tensor, header, raw_len) in enumerate(self.tensors, start=1):
            if self.progress and k % 16 == 0:
                self.progress(k, len(self.tensors), "writing")
            if raw_len < 0:
                f.write(_field(INITIALIZER_FIELD, len(header)))
                f.write(header)
                continue
            raw_field = _field(RAW_DATA_FIELD, raw_len)
            f.write(_field(INITIALIZER_FIELD, len(header) + len(raw_field) + raw_len))
            f.write(header)
            f.write(raw_field)
            external.stream(tensor, f)


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether the model is too large for one protobuf (measured without serializing the weights). Models whose
    payloads and nodes add up to well under the limit are answered without planning the write."""
    payload = 0
    for tensor in model.graph.initializer:
        length = external.payload_length(tensor)
        payload += length if length is not None else tensor.ByteSize()
    if payload + sum(n.ByteSize() for n in model.graph.node) < EXTERNAL_DATA_THRESHOLD // 2:
        return False
    return _Plan(model).size > EXTERNAL_DATA_THRESHOLD


def has_bound_data(model: onnx.ModelProto) -> bool:
    """Whether some initializers still live in an external file (loaded lazily)."""
    return any(external.is_external(t) for t in model.graph.initializer)


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


def file_mode(dest: Path) -> int:
    """The mode a new file gets (0o666 less the umask), or the mode of the file it replaces."""
    try:
        return stat.S_IMODE(dest.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


TEMP_TAG = "normswap-"


def temp_prefix(dest: Path) -> str:
    """Hidden temporary files carry normswap's tag and the writing process's id, so a later run can tell its own
    leftovers (a SIGKILL leaves them) from files another live run is writing."""
    return f".{dest.name}.{TEMP_TAG}{os.getpid()}-"


_TEMP_NAME = re.compile(rf"^\..+\.{TEMP_TAG}(\d+)-[a-z0-9_]{{8}}\.tmp$")  # mkstemp's 8 random characters


def remove_stale_temps(folder: Path, protected: Iterable[Path] = ()) -> list[Path]:
    """Remove normswap's temporary files in ``folder`` whose writing process is gone; returns them. Only names
    exactly of the form ``temp_prefix`` + mkstemp's 8 characters + ``.tmp`` count, and never a file in
    ``protected`` (what the running command reads), whatever its name."""
    removed = []
    keep = {os.path.realpath(p) for p in protected}
    try:
        candidates = [p for p in folder.glob(f".*.{TEMP_TAG}*-*.tmp") if _TEMP_NAME.match(p.name)]
    except OSError:
        return removed
    for path in candidates:
        pid = int(_TEMP_NAME.match(path.name).group(1))
        if _alive(pid) or os.path.realpath(path) in keep:
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or not a pid we can ask about): leave its files alone
    return True


def write_atomically(dest: Path, write, protected: Iterable[Path] = ()) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``dest``, fsync, then rename over ``dest`` (with the mode a
    plain write would give it: mkstemp's 0600 would hide the model from other users). Stale temporary files of
    earlier, killed runs in that folder are removed first (never one of ``protected``)."""
    folder = dest.parent
    remove_stale_temps(folder, protected)
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dest), suffix=".tmp", dir=folder)
    except OSError as e:
        raise OutputError(f"cannot write to folder '{folder}': {e.strerror}; choose a writable output path") from None
    try:
        os.fchmod(fd, file_mode(dest))
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
    (so an existing model never points at a half-written data file; the old one is removed once the new model is
    in place, see ``_remove_replaced_data``)."""
    candidate = dest.name + ".data"
    if not (dest.parent / candidate).exists():
        return candidate
    return f"{dest.name}.{os.urandom(4).hex()}.data"


@contextlib.contextmanager
def folder_lock(folder: Path):
    """An exclusive advisory lock on ``folder`` (``flock`` on its descriptor) while a model and its data file are
    written: two runs saving to the same place never interleave, so a model and its data always come from one run
    (no lock file is left behind; where the folder cannot be opened or locked, no lock)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


def save_model(model: onnx.ModelProto, dest: str | os.PathLike, external_data: bool = False,
               progress=None, protected: Iterable[Path] = ()) -> list[Path]:
    """Write ``model`` to ``dest`` atomically, streaming the weights; with ``external_data`` (forced above 2 GB)
    main-graph initializers of at least 1 KiB go to a data file beside it. Returns the files written. ``model``
    is never modified; no file in ``protected`` (what the command reads) is ever removed."""
    dest = Path(dest)
    if dest.is_dir():
        raise OutputError(f"output '{dest}' is a folder; pass a file path ending in .onnx")
    if not dest.parent.exists():
        raise OutputError(f"output folder '{dest.parent}' does not exist; create it first")
    plan = _Plan(model, progress)
    large = any((tensor_nbytes(t) or 0) >= EXTERNAL_TENSOR_MIN_BYTES for t in model.graph.initializer)
    if (not external_data and plan.size <= EXTERNAL_DATA_THRESHOLD) or not large:  # no tensor to put aside
        write_atomically(dest, plan.write, protected)
        return [dest]
    with folder_lock(dest.parent):
        return _save_with_data(model, dest, progress, list(protected))


def _save_with_data(model: onnx.ModelProto, dest: Path, progress, protected: list[Path]) -> list[Path]:
    data_name = _external_name(dest)
    headers: list[onnx.TensorProto] = []

    def write_data(f) -> None:
        offset = 0
        total = len(model.graph.initializer)
        for k, tensor in enumerate(model.graph.initializer, start=1):
            if progress and k % 16 == 0:
                progress(k, total, "writing")
            nbytes = tensor_nbytes(tensor)
            if nbytes is None or nbytes < EXTERNAL_TENSOR_MIN_BYTES:
                if external.is_external(tensor):  # small but bound: inline it
                    inline = _payload_header(tensor)
                    inline.raw_data = external.raw_bytes(tensor)
                    tensor = inline
                headers.append(tensor)
                continue
            if external.payload_length(tensor) is None:  # typed fields: store the same values as raw bytes
                tensor = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name)
            pad = (-offset) % EXTERNAL_ALIGNMENT
            f.write(b"\0" * pad)
            offset += pad
            length = external.stream(tensor, f)
            header = _payload_header(tensor)
            header.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = header.external_data.add()
                entry.key, entry.value = key, value
            headers.append(header)
            offset += length

    from ..paths import external_files
    replaced = external_files(dest) if dest.is_file() else []  # what the model being replaced reads
    data_path = dest.parent / data_name
    write_atomically(data_path, write_data, protected)
    skeleton = without_field(model, "graph")
    skeleton.graph.CopyFrom(without_field(model.graph, "initializer"))
    skeleton.graph.initializer.extend(headers)  # small tensors are copied, large ones are headers only
    try:
        write_atomically(dest, lambda f: f.write(skeleton.SerializeToString()), protected)
    except BaseException:  # the model was not replaced: its new data file is an orphan
        data_path.unlink(missing_ok=True)
        raise
    _remove_replaced_data(dest, replaced, data_path, model, protected)
    return [dest, data_path]


def _remove_replaced_data(dest: Path, replaced: list[Path], written: Path, model: onnx.ModelProto,
                          protected: list[Path]) -> None:
    """Once ``dest`` is in place, remove the data files the model it replaced used -- those of normswap's naming
    for ``dest`` (``<name>.data``, ``<name>.<hex>.data``) that neither the saved model nor any file the command
    reads (``protected``: the source model and its data, e.g. a copy of ``dest`` that shares its data file)
    still reads -- so a model written again and again keeps one data file beside it."""
    still_read = {os.path.realpath(external.bound_ref(t)[0]) for t in model.graph.initializer
                  if external.is_external(t)}
    still_read |= {os.path.realpath(p) for p in protected}
    for old in replaced:
        name = old.name
        ours = name == f"{dest.name}.data" or (name.startswith(f"{dest.name}.") and name.endswith(".data")
                                               and len(name.split(".")) == len(dest.name.split(".")) + 2)
        if ours and old.parent == dest.parent and os.path.realpath(old) not in still_read and old != written:
            old.unlink(missing_ok=True)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (through links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def graph_count(model: onnx.ModelProto) -> int:
    """Total number of nodes in the model, subgraphs included."""
    return sum(len(g.node) for _, g in iter_graphs(model.graph))
