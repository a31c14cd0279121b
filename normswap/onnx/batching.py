"""Feeding data to a model in batches, whatever batch dimension it was exported with.

Most torch.onnx and tf2onnx exports fix the batch dimension (often to 1). A model whose batched inputs leave
axis 0 free (a ``dim_param``, no value, or a non-positive ``dim_value`` as paddle2onnx writes) takes batches of
any size. A model that fixes it to ``F`` is fed ``F`` samples per run, the last run padded by repeating its last
sample, and the padding rows are left out of every result -- unless an internal copy with a free batch
dimension is shown to compute the same per-sample results (``relaxed``): then it takes any batch size.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

RELAX_RTOL = 1e-4
"""A freed batch dimension is accepted when every output of a run over F + 1 samples matches the runs at the
model's own batch within this relative tolerance (of each output's largest magnitude)."""


@dataclass(frozen=True)
class BatchLayout:
    rows: int       # samples per run (0: the data is fed whole, its arrays do not share a batch axis)
    pad: bool       # every run must hold exactly ``rows`` samples
    relaxed: bool   # internal copies free the batch dimension
    note: str
    fixed: int | None = None  # the batch the model itself fixes
    reshapes: dict | None = None  # ``batch_reshapes`` of the model, for its freed internal copies


def sample_count(data: Mapping[str, np.ndarray]) -> int | None:
    """Samples in ``data`` when every array has the same first dimension, else None (not batchable)."""
    counts = {len(v) if np.ndim(v) else -1 for v in data.values()}
    return counts.pop() if len(counts) == 1 and -1 not in counts else None


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model fixes on axis 0 of its fed inputs (a positive ``dim_value``), else None."""
    constants = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in constants or not vi.type.HasField("tensor_type"):
            continue
        dims = vi.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def iter_layout(data: Mapping[str, np.ndarray], layout: BatchLayout
                ) -> Iterator[tuple[dict[str, np.ndarray], int | None]]:
    """``(feeds, valid rows)`` per run; padding rows come after the valid ones (None: fed whole, all valid)."""
    count = sample_count(data)
    if count is None or layout.rows == 0:
        yield dict(data), None
        return
    for start in range(0, count, layout.rows):
        batch = {k: v[start:start + layout.rows] for k, v in data.items()}
        valid = min(layout.rows, count - start)
        if layout.pad and valid < layout.rows:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], layout.rows - valid, axis=0)]) for k, v in batch.items()}
        yield batch, valid


def layout_count(data: Mapping[str, np.ndarray], layout: BatchLayout) -> int:
    count = sample_count(data)
    return 1 if count is None or layout.rows == 0 else -(-count // layout.rows)


BATCH_INPUT_BYTES = 64 << 20  # a calibration batch's inputs at most (large inputs: fewer rows per run)


def batch_rows(data: Mapping[str, np.ndarray], batch_size: int) -> int:
    """``batch_size``, or fewer rows when one batch's inputs would exceed ``BATCH_INPUT_BYTES``. Measured on the
    PP-OCRv4 detector at 736x736 (6.5 MB a page): 64 samples calibrated in 59 s in batches of 64, 47 s in 32,
    37 s in 16 or 8 -- activations of a large batch outgrow the caches and the arena; the fit sums are the same."""
    per_sample = sum(int(np.prod(np.shape(v)[1:], dtype=np.int64)) * np.dtype(getattr(v, "dtype", float)).itemsize
                     for v in data.values())
    return max(1, min(batch_size, BATCH_INPUT_BYTES // max(per_sample, 1)))


def fixed_layout(model: onnx.ModelProto, data: Mapping[str, np.ndarray], batch_size: int) -> BatchLayout:
    """Runs at ``batch_size`` (at most; ``batch_rows``), or at the model's own fixed batch (padded): never
    changes the model."""
    if sample_count(data) is None:
        return BatchLayout(0, False, False, "the input arrays do not share a first dimension: fed whole")
    fixed = fixed_batch(model)
    if fixed is None:
        rows = batch_rows(data, batch_size)
        note = ("" if rows == batch_size else
                f" ({batch_size} asked: at most {BATCH_INPUT_BYTES >> 20} MiB of inputs a batch)")
        return BatchLayout(rows, False, False, f"batches of {rows}{note}")
    return BatchLayout(fixed, True, False, f"the model fixes its batch to {fixed}: fed {fixed} sample(s) per run, "
                                           "the last run padded")


def batch_reshapes(model: onnx.ModelProto, fixed: int) -> dict[str, np.ndarray]:
    """Constant Reshape targets that spell the fixed batch (``shape[0] == F``, as exporters write a flatten, from
    an initializer, a Constant or a constant subgraph): in an internal copy with a free batch dimension they
    become 0 ("copy the input's first dimension"), or -1 under ``allowzero=1``."""
    from .graph import GraphIndex, NameRegistry
    from .io import opset_of
    from .rules.base import attr
    from .types import TypeTable
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape" and len(n.input) > 1]
    if not reshapes:
        return {}
    index = GraphIndex(model.graph, ir_version=model.ir_version, opset=opset_of(model), types=TypeTable(),
                       names=NameRegistry(model))
    out = {}
    for node in reshapes:
        value = index.constant(node.input[1])
        if value is None or value.ndim != 1 or not len(value) or value[0] != fixed:
            continue
        if attr(node, "allowzero", 0) != 1:  # 0: copy the input's dimension
            out[node.input[1]] = np.concatenate([[0], value[1:]]).astype(value.dtype)
        elif -1 not in value[1:]:  # 0 would mean an empty dimension: infer the batch instead
            out[node.input[1]] = np.concatenate([[-1], value[1:]]).astype(value.dtype)
    return out


def _freed_session(model: onnx.ModelProto, feeds: dict, reshapes: dict, providers: tuple[str, ...],
                   workdir: str):
    """A session of an internal copy of ``model`` with a free batch dimension (and ``batch_reshapes``)."""
    from ..validate.runner import make_session
    from .segments import Segment, segment_model
    fed = [i.name for i in model.graph.input if i.name in feeds]
    whole = Segment(0, list(model.graph.node), fed, [o.name for o in model.graph.output])
    return make_session(segment_model(model, whole, {}, True, reshapes), providers, workdir, "batch-freed")


def choose_layout(model: onnx.ModelProto, data: Mapping[str, np.ndarray], batch_size: int,
                  providers: tuple[str, ...], workdir: str) -> BatchLayout:
    """``fixed_layout``, except that a fixed-batch model whose data holds more samples than its batch is fed
    ``batch_size`` samples per run through internal copies with a free batch dimension when one run over
    F + 1 samples shows that is safe (a Reshape to a constant batch would break it)."""
    layout = fixed_layout(model, data, batch_size)
    count = sample_count(data)
    batch_size = batch_rows(data, batch_size) if count is not None else batch_size
    if not layout.pad or count is None or count <= layout.rows or batch_size <= layout.rows:
        return layout
    fixed = layout.rows
    probe = {k: v[:fixed + 1] for k, v in data.items()}
    reshapes = batch_reshapes(model, fixed)
    try:  # the freed copy run on F samples computes what the model itself computes; on F + 1 it must agree
        session = _freed_session(model, probe, reshapes, providers, workdir)
        freed = session.run(None, probe)
        parts = [session.run(None, c) for c, _ in iter_layout(probe, layout)]
        same = all(
            np.shape(f)[:1] == (fixed + 1,) and np.allclose(
                f, np.concatenate([p[k] for p in parts])[:fixed + 1],
                rtol=RELAX_RTOL, atol=RELAX_RTOL * float(np.max(np.abs(f))) if np.size(f) else 0.0)
            for k, f in enumerate(freed))
    except Exception:  # the freed copy does not even run
        same = False
    if not same:
        return BatchLayout(fixed, True, False, layout.note + " (a free batch dimension changes its results)")
    return BatchLayout(batch_size, False, True, f"the model fixes its batch to {fixed}; its internal copies free "
                                                f"it (checked on {fixed + 1} samples): batches of {batch_size}",
                       fixed, reshapes)
