"""torch.export's graph as a torch.fx graph with module leaves: the last tracer ``tracing.trace`` tries.

``torch.export.export`` (non-strict, the batch dimension dynamic) follows what torch.fx cannot -- ``isinstance``
checks, calls torch.fx cannot wrap -- and yields aten ops, each tagged with the stack of module calls that made it
(``nn_module_stack``). For the dataflow and segmented calibration the leaves are what matters: every call of a
leaf module (a BN site, a convolution or linear layer) is a group of consecutive aten nodes under one stack entry.
Each group with one activation input and one output becomes a ``call_module`` node; lifted parameters and
buffers become ``get_attr`` nodes of the module's own tensors (shared, not copied). The result is a GraphModule
over the original module's objects, checked like the value tracer's (same outputs on the example and on a batch
of another size). Data-dependent control flow fails here too, and the caller falls back.
"""
from __future__ import annotations

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree


def _leaf_key(node: fx.Node, leaves: set[str]) -> str | None:
    """The stack key of the outermost leaf module call around ``node``: a leaf's own submodules belong to it."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, (path, _) in stack.items():
        if path in leaves:
            return key
    return None


def exported(module: nn.Module, leaves: set[str], example: tuple) -> fx.GraphModule:
    """``module`` exported and rebuilt with ``leaves`` as call_module nodes (raises what export raises)."""
    batched = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() > 0 and len(a) == 1 else a
                    for a in example)  # a dynamic batch dimension needs an example batch of 2 or more
    dims = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() > 0 else None
                 for a in batched)
    ep = torch.export.export(module, batched, dynamic_shapes=dims, strict=False)
    signature = ep.graph_signature
    tensors = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    constants = signature.inputs_to_lifted_tensor_constants
    nodes = list(ep.graph.nodes)
    position = {n: k for k, n in enumerate(nodes)}
    paths = {key: path for n in nodes for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items()}
    groups: dict[str, list[fx.Node]] = {}
    for n in nodes:
        key = _leaf_key(n, leaves) if n.op == "call_function" else None
        if key is not None:
            groups.setdefault(key, []).append(n)
    graph, env, root = fx.Graph(), {}, {}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:  # a lifted parameter, buffer or constant, read where it is first needed
            if n.name in tensors:
                root[tensors[n.name]] = _tensor(module, tensors[n.name])
                env[n] = graph.get_attr(tensors[n.name])
            else:
                name = "_lifted_" + constants[n.name].replace(".", "_")
                root[name] = ep.constants[constants[n.name]]
                env[n] = graph.get_attr(name)
        return env[n]

    leaf_of: dict[fx.Node, str] = {}
    for key, group in groups.items():
        inside = set(group)
        inputs = list(dict.fromkeys(a for n in group for a in n.all_input_nodes
                                    if a not in inside and a.name not in tensors and a.name not in constants))
        outputs = [n for n in group if any(u not in inside for u in n.users)]
        contiguous = position[group[-1]] - position[group[0]] + 1 == len(group)
        if len(inputs) == 1 and len(outputs) == 1 and contiguous:  # else its aten ops stay as they are
            leaf_of.update({n: key for n in group})
            groups[key] = [inputs[0], outputs[0]]
    for n in nodes:
        if n.op == "placeholder":
            if n.name not in tensors and n.name not in constants:
                env[n] = graph.placeholder(n.name)
        elif n.op == "output":  # the module's own output structure (export flattens it)
            flat = list(fx.node.map_arg(n.args[0], lookup))
            graph.output(pytree.tree_unflatten(flat, ep.call_spec.out_spec))
        elif n not in leaf_of:
            env[n] = graph.node_copy(n, lookup)
        elif n is groups[leaf_of[n]][1]:  # the call's output: one call_module node for the whole group
            path = paths[leaf_of[n]]
            root[path] = module.get_submodule(path)
            env[n] = graph.call_module(path, (lookup(groups[leaf_of[n]][0]),))
            env[n].meta.update(n.meta)
    graph.lint()
    return fx.GraphModule(root, graph)


def _tensor(module: nn.Module, fqn: str) -> torch.Tensor:
    owner, _, name = fqn.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, name)
