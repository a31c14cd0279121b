"""Running a traced module segment by segment over all the data, so calibration runs every node once.

The same cut as the ONNX path (``normswap.onnx.segments``), on torch.fx graphs traced with every BN site as a
leaf: a node's segment is the largest among its inputs'; in the converted module a site's call (the new norm,
whose parameters are fitted) runs one segment after its input's, in the original module a site's call runs in
its input's segment but counts one later for its readers. Values a later segment reads stay on the module's
device between segments (an ``ActivationStore``: up to a byte budget, on disk beyond).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from ..activation_store import ActivationStore


@dataclass
class TorchPlan:
    segments: list[list[fx.Node]]
    sites: dict[str, fx.Node]  # site name -> its call node
    level: dict[fx.Node, int]  # the segment whose end makes the value available
    last_use: dict[fx.Node, int] = field(default_factory=dict)  # the last segment that reads the value
    dead_after: dict[int, list[fx.Node]] = field(default_factory=dict)

    def fit_after(self, site: str) -> int:
        """The segment after which a site's layer is fitted: the one that computes its input."""
        return self.level[self.sites[site].args[0]]


def plan(gm: fx.GraphModule, sites: set[str], converted: bool, hold: list[fx.Node], count: int = 0) -> TorchPlan:
    level: dict[fx.Node, int] = {}
    placed: list[tuple[int, fx.Node]] = []
    calls: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        base = max((level[a] for a in node.all_input_nodes), default=0)
        s = level[node] = base
        if node.op == "call_module" and node.target in sites:
            calls[node.target] = node
            x = node.args[0]
            if converted:
                s = level[node] = max(base, level[x] + 1)
            else:
                level[node] = level[x] + 1
        placed.append((s, node))
    total = max([s for s, _ in placed] + [count - 1]) + 1
    segments: list[list[fx.Node]] = [[] for _ in range(total)]
    last: dict[fx.Node, int] = {}
    for s, node in placed:
        segments[s].append(node)
        for a in node.all_input_nodes:
            last[a] = max(last.get(a, 0), s)
    for node in hold:
        last[node] = total
    dead: dict[int, list[fx.Node]] = {}
    for node, s in last.items():
        dead.setdefault(s, []).append(node)
    return TorchPlan(segments, calls, level, last, dead)


class SegmentRunner:
    """One traced module, run a segment at a time over every batch; kept values live in ``store``."""

    def __init__(self, gm: fx.GraphModule, plan_: TorchPlan, tag: str, store: ActivationStore) -> None:
        self.gm, self.plan, self.tag, self.store = gm, plan_, tag, store
        self.interpreter = fx.Interpreter(gm)
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def key(self, node: fx.Node) -> str:
        return f"{self.tag}:{node.name}"

    def get(self, node: fx.Node, batch: int):
        return self.store.get(self.key(node), batch)

    def run(self, s: int, batch: int, args: tuple) -> dict[fx.Node, object]:
        """Run segment ``s`` on batch ``batch`` (its forward arguments ``args``); returns what it computed."""
        nodes = self.plan.segments[s] if s < len(self.plan.segments) else []
        made = set(nodes)
        env: dict[fx.Node, object] = {}
        for node in nodes:
            for a in node.all_input_nodes:
                if a not in env and a not in made:
                    env[a] = self.get(a, batch)
        self.interpreter.env = env
        for node in nodes:
            if node.op == "placeholder":
                k = self.placeholders.index(node)
                env[node] = args[k] if k < len(args) else node.args[0] if node.args else None
            else:
                env[node] = self.interpreter.run_node(node)
        for node in nodes:
            if self.plan.last_use.get(node, -1) > s:
                self.store.put(self.key(node), batch, env[node])
        return env

    def release(self, s: int, batches: int) -> None:
        """Drop the kept values no segment after ``s`` reads."""
        for node in self.plan.dead_after.get(s, ()):
            for b in range(batches):
                self.store.drop(self.key(node), b)


def moments(x: torch.Tensor, y_centred: torch.Tensor, x_center: torch.Tensor, channel_norm: bool,
            eps: float) -> tuple[int, dict[str, np.ndarray]]:
    """Per-sample, per-channel sums for ``CandidateSums``, reduced on the device in float32 over positions (after
    centring x by the BN's running mean; the target comes centred): the moments of x for GroupNorm candidates, or
    sums of the explicit channel-LayerNorm z. Only these (N, C) sums reach the host, in float64. Measured on
    resnet50 at 224x224: float64 accumulation made calibration 1.5x slower for no change in the fit."""
    n, c = x.shape[:2]

    def total(t: torch.Tensor) -> np.ndarray:
        return t.sum(2).double().cpu().numpy()

    xr = x.detach().reshape(n, c, -1).float()
    yr = y_centred.detach().reshape(n, c, -1).float()
    sums = {"sy": total(yr), "syy": total(yr * yr)}
    if channel_norm:
        mean = xr.mean(1, keepdim=True)
        d = xr - mean
        z = d / torch.sqrt((d * d).mean(1, keepdim=True) + eps)
        sums.update(sz=total(z), szz=total(z * z), szy=total(z * yr))
    else:
        xc = xr - x_center.reshape(1, c, 1)
        sums.update(sx=total(xc), sxx=total(xc * xc), sxy=total(xc * yr))
    return xr.shape[2], sums
