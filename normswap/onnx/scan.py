"""The external-data locations a model file names, read from its protobuf wire format without loading weights.

A write plan must know every file the model it reads points at, at any model size, before any work -- but
parsing a model with protobuf copies every inline weight into memory (a 2 GB model costs 2 GB). This walker
reads the file through ``mmap`` and descends only into the fields whose message type can hold a TensorProto
(graphs, nodes, attributes, sparse tensors, functions, training info -- derived from onnx's own descriptors, so a
new field of that kind is followed too); every other length-delimited field, ``raw_data`` included, is skipped by
its length without being read. Cost: one pass over the fields' headers.
"""
from __future__ import annotations

import mmap
from functools import lru_cache
from pathlib import Path

import onnx

_EXTERNAL_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["external_data"].number
_KEY, _VALUE = (onnx.StringStringEntryProto.DESCRIPTOR.fields_by_name[n].number for n in ("key", "value"))


class _Corrupt(Exception):
    pass


@lru_cache(maxsize=None)
def _descend(full_name: str) -> dict[int, str]:
    """Field number -> message type name, for the fields of ``full_name`` whose type can contain a TensorProto."""
    return {f.number: f.message_type.full_name for f in _DESCRIPTORS[full_name].fields
            if f.message_type is not None and f.message_type.full_name in _REACHES}


def _message_types() -> dict:
    found, todo = {}, [onnx.ModelProto.DESCRIPTOR]
    while todo:
        d = todo.pop()
        if d.full_name in found:
            continue
        found[d.full_name] = d
        todo.extend(f.message_type for f in d.fields if f.message_type is not None)
    return found


def _reaching() -> frozenset[str]:
    """Message types from which a TensorProto can be reached (TensorProto itself included)."""
    reaches = {onnx.TensorProto.DESCRIPTOR.full_name}
    changed = True
    while changed:
        changed = False
        for name, d in _DESCRIPTORS.items():
            if name not in reaches and any(f.message_type is not None and f.message_type.full_name in reaches
                                           for f in d.fields):
                reaches.add(name)
                changed = True
    return frozenset(reaches)


_DESCRIPTORS = _message_types()
_REACHES = _reaching()
_TENSOR = onnx.TensorProto.DESCRIPTOR.full_name
_MODEL = onnx.ModelProto.DESCRIPTOR.full_name


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Corrupt()
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf, pos: int, end: int):
    """(field number, wire type, start, stop) of each field in ``buf[pos:end]``; payload bounds for type 2."""
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, stop = _varint(buf, pos, end)
            start = pos
        elif wire == 1:
            start, stop = pos, pos + 8
        elif wire == 5:
            start, stop = pos, pos + 4
        elif wire == 2:
            length, start = _varint(buf, pos, end)
            stop = start + length
        else:  # groups (deprecated) or garbage: not a model this walker can read
            raise _Corrupt()
        if stop > end:
            raise _Corrupt()
        yield number, wire, start, stop
        pos = stop


def _walk(buf, pos: int, end: int, type_name: str, out: set[bytes], depth: int = 0) -> None:
    if depth > 64:  # deeper than any real model nests graphs: stop rather than recurse without bound
        raise _Corrupt()
    descend = _descend(type_name)
    for number, wire, start, stop in _fields(buf, pos, end):
        if wire != 2:
            continue
        if type_name == _TENSOR and number == _EXTERNAL_DATA:
            entry = {k: bytes(buf[s:e]) for k, w, s, e in _fields(buf, start, stop) if w == 2 and k in (_KEY, _VALUE)}
            if entry.get(_KEY) == b"location" and _VALUE in entry:
                out.add(entry[_VALUE])
        elif number in descend:
            _walk(buf, start, stop, descend[number], out, depth + 1)


def external_locations(path: Path) -> list[str] | None:
    """Every external-data ``location`` the model file names (as written, valid UTF-8 only), or None when the file
    is not readable as a protobuf model (the loader then says what is wrong, with its own exit code)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size == 0:
                return []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                found: set[bytes] = set()
                _walk(buf, 0, size, _MODEL, found)
    except (OSError, ValueError, _Corrupt):
        return None
    locations = []
    for raw in found:
        try:
            locations.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # no file can be named by it here; the loader refuses the model
    return sorted(locations)


__all__ = ["external_locations"]
