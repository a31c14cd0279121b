"""An editable index over one ONNX graph: producers, consumers, constants, and batched edits.

Edits (input swaps, node removal and replacement, new initializers) update the index in O(1) each and are
applied to the protobuf once, in ``commit()``, so a whole conversion stays linear in the graph size. Values read
by nested subgraphs count as consumers of the node that holds the subgraph.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import numpy_helper

from .constants import ConstantEvaluator
from .types import TypeTable, ValueType
from .walk import free_names, subgraphs_of


class NameRegistry:
    """Fresh, model-wide unique names for new values and nodes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from .walk import iter_graphs
        used: set[str] = set()
        for _, g in iter_graphs(model.graph):
            used.update(i.name for i in g.input)
            used.update(o.name for o in g.output)
            used.update(t.name for t in g.initializer)
            for n in g.node:
                used.update(n.output)
                used.add(n.name)
        self._used = used

    def fresh(self, hint: str) -> str:
        name, k = hint, 1
        while name in self._used:
            k += 1
            name = f"{hint}_{k}"
        self._used.add(name)
        return name


class GraphIndex:
    def __init__(self, graph: onnx.GraphProto, *, ir_version: int, opset: int, types: TypeTable,
                 names: NameRegistry, parent: "GraphIndex | None" = None, path: str = "main") -> None:
        self.graph = graph
        self.path = path
        self.parent = parent
        self.ir_version = ir_version
        self.types = types
        self.names = names
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.order: list[tuple[int, float]] = [(i, 0) for i in range(len(self.nodes))]
        self.removed: set[int] = set()
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        self.outputs = {o.name for o in graph.output}
        self.inputs = {i.name for i in graph.input}
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        # Concrete shapes seen when the model ran (fills in symbolic dims shape inference cannot resolve).
        self.observed_shapes: dict[str, tuple[int, ...]] = parent.observed_shapes if parent is not None else {}
        self.opset = opset
        self._dropped_refs: set[str] = set()
        self._removed_initializers: set[str] = set()
        self._changed = False
        # Before IR 4 every initializer of the main graph must also be listed as a graph input.
        self._lists_initializers_as_inputs = parent is None and ir_version < 4
        for i, node in enumerate(self.nodes):
            self._register(i, node)
        self.constants = ConstantEvaluator(self, opset)

    # ----- reading -------------------------------------------------------------------------------
    def _reads(self, node: onnx.NodeProto) -> Iterable[str]:
        yield from (n for n in node.input if n)
        for sub in subgraphs_of(node):
            yield from free_names(sub)

    def _register(self, i: int, node: onnx.NodeProto) -> None:
        for out in node.output:
            if out:
                self.producer[out] = i
        for name in set(self._reads(node)):
            self.consumers[name].append(i)

    def producer_of(self, name: str) -> int | None:
        i = self.producer.get(name)
        return None if i is None or i in self.removed else i

    def live_consumers(self, name: str) -> list[int]:
        return [c for c in self.consumers.get(name, ()) if c not in self.removed]

    def use_count(self, name: str) -> int:
        """Consumers in this graph plus one if the value is a graph output."""
        return len(self.live_consumers(name)) + (name in self.outputs)

    def is_overridable_initializer(self, name: str) -> bool:
        """onnxruntime treats an initializer that is also a graph input as overridable (not constant) from IR 4."""
        return name in self.initializers and name in self.inputs and self.ir_version >= 4

    def defines(self, name: str) -> bool:
        return name in self.inputs or name in self.initializers or name in self.producer

    def value_type(self, name: str) -> ValueType | None:
        return self.types.get(name)

    def constant(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if onnxruntime would treat it as a constant, else None."""
        return self.constants.value(name)

    # ----- editing -------------------------------------------------------------------------------
    def set_input(self, i: int, slot: int, name: str) -> None:
        node = self.nodes[i]
        while len(node.input) <= slot:
            node.input.append("")
        old = node.input[slot]
        node.input[slot] = name
        if old and old not in node.input:
            self.consumers[old].remove(i)
            self._dropped_refs.add(old)
        if name and i not in self.consumers[name]:
            self.consumers[name].append(i)
        self._changed = True

    def rename_output(self, i: int, slot: int, name: str) -> None:
        node = self.nodes[i]
        old = node.output[slot]
        if self.producer.get(old) == i:
            del self.producer[old]
        node.output[slot] = name
        self.producer[name] = i
        self._changed = True

    def remove_node(self, i: int) -> None:
        self.removed.add(i)
        self._dropped_refs.update(self._reads(self.nodes[i]))
        for out in self.nodes[i].output:
            if self.producer.get(out) == i:
                del self.producer[out]
        self._changed = True

    def replace_node(self, i: int, new_nodes: list[onnx.NodeProto]) -> None:
        """Remove node ``i`` and put ``new_nodes`` (topologically ordered) where it was."""
        position = self.order[i][0]
        self.remove_node(i)
        for k, node in enumerate(new_nodes, start=1):
            j = len(self.nodes)
            self.nodes.append(node)
            self.order.append((position, k))
            self._register(j, node)

    def insert_before(self, i: int, new_nodes: list[onnx.NodeProto]) -> None:
        """Put ``new_nodes`` (topologically ordered) just before node ``i``."""
        position, sub = self.order[i]
        for k, node in enumerate(new_nodes, start=1):
            j = len(self.nodes)
            self.nodes.append(node)
            self.order.append((position, sub - 1 + k / (len(new_nodes) + 1)))
            self._register(j, node)
        self._changed = True

    def add_initializer(self, array: np.ndarray, hint: str) -> str:
        """Store ``array`` as a new initializer of this graph and return its (fresh) name."""
        name = self.names.fresh(hint)
        tensor = self.graph.initializer.add()
        array = np.ascontiguousarray(array)
        if array.dtype.kind == "f" and array.dtype.itemsize in (2, 4, 8) and array.dtype.name != "bfloat16":
            tensor.name = name  # one copy of the bytes, straight into the graph
            tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
            tensor.dims.extend(array.shape)
            tensor.raw_data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        else:
            tensor.CopyFrom(numpy_helper.from_array(array, name))
        self.initializers[name] = tensor
        if self._lists_initializers_as_inputs:
            self.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
            self.inputs.add(name)
        self._changed = True
        return name

    def new_value(self, hint: str) -> str:
        return self.names.fresh(hint)

    # ----- committing ----------------------------------------------------------------------------
    def _collect_dead(self) -> None:
        """Remove what only fed rewritten nodes: nodes and initializers whose last reader a rewrite removed."""
        pending = list(self._dropped_refs)
        while pending:
            name = pending.pop()
            if self.use_count(name):
                continue
            p = self.producer_of(name)
            if p is not None:
                if not any(self.use_count(o) for o in self.nodes[p].output if o):
                    self.remove_node(p)
                    pending.extend(self._reads(self.nodes[p]))
            elif name in self.initializers and (name not in self.inputs or self._lists_initializers_as_inputs):
                self._removed_initializers.add(name)

    def commit(self) -> None:
        """Write all edits into the GraphProto."""
        if not self._changed:
            return
        self._collect_dead()
        keep = sorted((k for k in range(len(self.nodes)) if k not in self.removed), key=self.order.__getitem__)
        if keep != list(range(len(self.graph.node))):
            kept_nodes = [self.nodes[k] for k in keep]
            self.graph.ClearField("node")
            self.graph.node.extend(kept_nodes)
        if self._removed_initializers:
            gone = self._removed_initializers
            for k in reversed(range(len(self.graph.initializer))):
                if self.graph.initializer[k].name in gone:
                    del self.graph.initializer[k]
            if self._lists_initializers_as_inputs:
                for k in reversed(range(len(self.graph.input))):
                    if self.graph.input[k].name in gone:
                        del self.graph.input[k]
        alive = set(self.producer) | self.inputs | (set(self.initializers) - self._removed_initializers)
        stale = [k for k, vi in enumerate(self.graph.value_info) if vi.name not in alive]
        for k in reversed(stale):
            del self.graph.value_info[k]
        self._changed = False


def overwrite_initializer(tensor: onnx.TensorProto, values: np.ndarray, keep_shape: bool = True) -> None:
    """Replace an initializer's values in place, keeping its name and dtype (and its shape when ``keep_shape``)."""
    array = np.asarray(values).astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    tensor.CopyFrom(numpy_helper.from_array(array.reshape(tuple(tensor.dims)) if keep_shape else array, tensor.name))
