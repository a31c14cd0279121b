"""Inputs for validation: seeded random data shaped from the model's input types, or a user's .npz file."""
from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping

import numpy as np
import onnx

from ..errors import SPEAKING_CLI, option
from ..errors import InvalidModelError, UsageError
from ..memory import check_allocation

DEFAULT_BATCH = 2  # a symbolic first dimension becomes 2, so batch-mixing bugs show
DEFAULT_SEED = 0


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs a caller must feed: initializers listed as inputs are not among them."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _shape_hint(name: str) -> str:
    if SPEAKING_CLI.get():
        return f"--input-shape {name}:D0,D1,..."
    return f"input_shapes={{'{name}': (D0, D1, ...)}}"


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME:1,3,224,224`` -> ``("NAME", (1, 3, 224, 224))``."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    except ValueError:
        shape = None
    if not sep or not name or shape is None or any(d <= 0 for d in shape):
        raise UsageError(f"{option('input_shapes')} '{text}' is not NAME:D1,D2,... with positive integers")
    return name, shape


def fixed_dim(d: onnx.TensorShapeProto.Dimension) -> bool:
    """A dimension the model fixes: a positive ``dim_value``. A ``dim_param``, no value, or a non-positive value
    (paddle2onnx writes -1 for a dynamic batch) is free."""
    return d.HasField("dim_value") and d.dim_value > 0


def _shape_for(vi: onnx.ValueInfoProto, given: Mapping[str, tuple[int, ...]]) -> tuple[int, ...]:
    dims = vi.type.tensor_type.shape.dim
    if vi.name not in given and not vi.type.tensor_type.HasField("shape"):
        raise UsageError(f"input '{vi.name}' declares no shape (not even its rank); pass {_shape_hint(vi.name)} or "
                         f"{option('inputs')} data")
    if vi.name in given and not vi.type.tensor_type.HasField("shape"):
        return tuple(given[vi.name])
    if vi.name in given:
        shape = tuple(given[vi.name])
        if len(shape) != len(dims):
            raise UsageError(f"{option('input_shapes')} for '{vi.name}' has {len(shape)} dims but the input has "
                             f"{len(dims)}")
        for k, (d, s) in enumerate(zip(dims, shape)):
            if fixed_dim(d) and d.dim_value != s:
                raise UsageError(f"{option('input_shapes')} for '{vi.name}' sets axis {k} to {s} but the model "
                                 f"fixes it to {d.dim_value}")
        return shape
    shape = []
    for k, d in enumerate(dims):
        if fixed_dim(d):
            shape.append(d.dim_value)
        elif k == 0:
            shape.append(DEFAULT_BATCH)
        else:
            label = d.dim_param or "unknown"
            raise UsageError(f"input '{vi.name}' has the symbolic dimension '{label}' at axis {k}; "
                             f"pass {_shape_hint(vi.name)} or {option('inputs')} data")
    return tuple(shape)


def random_inputs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None,
                  seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Seeded data for every input: standard normal floats, integers in [0, 8), random booleans."""
    given = dict(shapes or {})
    inputs = model_inputs(model)
    unknown = set(given) - {i.name for i in inputs}
    if unknown:
        raise UsageError(f"{option('input_shapes')} names unknown input(s) {sorted(unknown)}; the model's inputs are "
                         f"{[i.name for i in inputs]}")
    planned = []
    for vi in inputs:
        if not vi.type.HasField("tensor_type"):
            raise UsageError(f"input '{vi.name}' is not a tensor; pass {option('inputs')} data")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        planned.append((vi.name, _shape_for(vi, given), dtype))
    # floats are drawn in float64 and then cast: both arrays exist for a moment
    total = sum(int(np.prod(shape, dtype=object)) * (dtype.itemsize + (8 if dtype.kind == "f" else 0))
                for _, shape, dtype in planned)
    if planned:
        check_allocation(total, "random validation inputs of shape(s) " +
                         ", ".join(f"{n}{list(shape)}" for n, shape, _ in planned),
                         f"pass {option('inputs')} data or smaller shapes ({_shape_hint(planned[0][0])})")
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, shape, dtype in planned:
        if dtype.kind == "f" or dtype.name == "bfloat16":  # np.asarray: a 0-d input gets a 0-d array, not a scalar
            feeds[name] = np.asarray(rng.standard_normal(shape), dtype=dtype)
        elif dtype.kind in "iu":
            feeds[name] = np.asarray(rng.integers(0, 8, size=shape), dtype=dtype)
        elif dtype.kind == "b":
            feeds[name] = np.asarray(rng.random(shape) < 0.5)
        else:
            raise UsageError(f"cannot generate data for input '{name}' of type {dtype}; pass {option('inputs')} "
                             "data")
    return feeds


class CheckedFeeds(dict):
    """Arrays already matched against a model's inputs (``check_feeds``), with where they came from."""

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str) -> None:
        super().__init__(arrays)
        self.source = source


def checked_inputs(inputs, model: onnx.ModelProto):
    """``--inputs`` read and checked against the model before any work (names, dtypes, ranks, fixed dims,
    sample counts): a wrong key is found at once, not after calibration. None stays None."""
    if inputs is None or isinstance(inputs, CheckedFeeds):
        return inputs
    if isinstance(inputs, Mapping):
        return CheckedFeeds(check_feeds(inputs, model, "the inputs mapping"), "given arrays")
    return CheckedFeeds(load_npz_inputs(inputs, model), str(inputs))


def check_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None) -> None:
    """``--input-shape`` names real inputs, with their rank and the dims the model fixes."""
    given = dict(shapes or {})
    inputs = {i.name: i for i in model_inputs(model)}
    unknown = set(given) - set(inputs)
    if unknown:
        raise UsageError(f"{option('input_shapes')} names unknown input(s) {sorted(unknown)}; the model's inputs are "
                         f"{list(inputs)}")
    for name in given:
        _shape_for(inputs[name], given)


def _not_npz(head: bytes) -> str | None:
    """What a data file is when it is clearly not an .npz (a zip archive)."""
    if head.startswith(b"PK"):
        return None
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array, not an .npz; save it with numpy.savez(FILE, NAME=array), one array per input"
    if head[:1] == b"\x80":
        return "a Python pickle, not an .npz (normswap never unpickles files)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "not an .npz (no zip archive); save the arrays with numpy.savez"
    if text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file, not an .npz; save the arrays with numpy.savez"
    return "not an .npz (no zip archive); save the arrays with numpy.savez"


def _declared_bytes(archive: zipfile.ZipFile, path) -> int:
    """The bytes the arrays of an .npz declare in their .npy headers, read before any array is: each header must
    fit the member's stored size, hold no Python objects, and the total fit in memory."""
    total = 0
    for info in archive.infolist():
        if not info.filename.endswith(".npy"):
            continue
        name = info.filename[:-4]
        with archive.open(info) as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        if dtype.hasobject:
            raise InvalidModelError(f"array '{name}' in data file '{path}' holds Python objects (pickled data), "
                                    "which normswap never loads; save numeric arrays")
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if nbytes > info.file_size:
            raise InvalidModelError(f"array '{name}' in data file '{path}' declares {nbytes} bytes of shape "
                                    f"{list(shape)} but holds {info.file_size}; the file is truncated or corrupt")
        total += nbytes
    return total


def load_npz_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read without unpickling anything; what it is when it is not an .npz, and
    what its headers declare, are checked before a byte of an array is read."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise UsageError(f"data file '{path}' does not exist") from None
    except (IsADirectoryError, NotADirectoryError):
        raise UsageError(f"data file '{path}' is not a file; pass an .npz") from None
    except OSError as e:
        raise InvalidModelError(f"data file '{path}' cannot be read ({e.strerror})") from None
    problem = _not_npz(head)
    if problem:
        raise InvalidModelError(f"data file '{path}' is {problem}")
    try:
        with zipfile.ZipFile(path) as archive:
            check_allocation(_declared_bytes(archive, path), f"data file '{path}'",
                             "pass fewer samples, or split the file")
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise InvalidModelError(f"data file '{path}' is not a plain .npz of numeric arrays ({e}); "
                                "save it with numpy.savez") from None


def load_npz_inputs(path: str | os.PathLike, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Arrays keyed by input name from an .npz file, read without unpickling anything."""
    return check_feeds(load_npz_arrays(path), model, str(path))


def check_feeds(arrays: Mapping[str, np.ndarray], model: onnx.ModelProto, source: str) -> dict[str, np.ndarray]:
    """Match arrays to the model's inputs by name, casting floats to the input's float type."""
    names = [i.name for i in model_inputs(model)]
    missing = [n for n in names if n not in arrays]
    if missing:
        raise UsageError(f"{source} has no array for input(s) {missing}; its keys must be the input names {names}")
    feeds = {}
    for vi in model_inputs(model):
        a = np.asarray(arrays[vi.name])
        want = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        if a.dtype != want:
            if a.dtype.kind == "f" and (want.kind == "f" or want.name == "bfloat16"):
                a = a.astype(want)
            else:
                raise UsageError(f"array '{vi.name}' in {source} is {a.dtype} but the input is {want}")
        if a.ndim and a.shape[0] == 0:
            raise InvalidModelError(f"array '{vi.name}' in {source} holds no samples (its first dimension is 0); "
                                    "give at least one")
        _check_shape(vi, a, source)
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            raise InvalidModelError(f"array '{vi.name}' in {source} holds {bad} NaN or infinite value(s) of "
                                    f"{a.size}; nothing can be calibrated or validated on them -- clean the data")
        feeds[vi.name] = a
    counts = {name: a.shape[0] for name, a in feeds.items() if a.ndim}
    if len(set(counts.values())) > 1:
        raise UsageError(f"the arrays in {source} hold different numbers of samples {counts}; give every input the "
                         "same number (axis 0)")
    return feeds


def _check_shape(vi: onnx.ValueInfoProto, a: np.ndarray, source: str) -> None:
    """The array's rank and every dimension the model fixes, except the batch (axis 0: a model that fixes it is
    fed its own batch size, the last run padded)."""
    tt = vi.type.tensor_type
    if not tt.HasField("shape"):
        return
    dims = tt.shape.dim
    if a.ndim != len(dims):
        raise UsageError(f"array '{vi.name}' in {source} has shape {a.shape} (rank {a.ndim}) but the input has rank "
                         f"{len(dims)}; give arrays shaped like the model's input")
    for k, d in enumerate(dims):
        if k and fixed_dim(d) and a.shape[k] != d.dim_value:
            raise UsageError(f"array '{vi.name}' in {source} has {a.shape[k]} at axis {k} but the model fixes it to "
                             f"{d.dim_value} (shape {a.shape})")
