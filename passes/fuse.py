"""``fuse``: chains of pointwise, broadcast and row-reduction ops become one fxopt Triton kernel each.

Between the matmuls and convs a training graph is mostly memory-bound glue: bias, activation,
residual add, scaling, casts, norm-apply, softmax. Each ATen op reads and writes the whole
activation; a fused region reads its inputs and writes its outputs once, forward and backward.

How regions form (in graph order, greedily):

* a node joins a region of one of its producers when both run over the same iteration space
  (:class:`fxopt.codegen.Domain`: the same shape, at most one reduction depth, or the region's
  rows), the region stays *convex* (no path leaves it and comes back: the fused op could not be
  placed) and within ``max_ops`` ops and ``max_inputs`` inputs;
* views join only where they are free in the row layout (keepdim <-> squeezed row values, a row
  expanded to the full shape);
* regions are then checked jointly: contracting all of them must leave a DAG (networkx), else the
  smaller region of a cycle is dropped.

Each region is scored with the cost model: the predicted time of its nodes (forward + backward)
before, and the fused kernels' time after (boundary bytes at the memory roofline, one launch
forward and one backward, plus the sums that reduce broadcast inputs' gradients). It is fused only
if it gains more than 1% (and ``min_gain_us``). Every decision is logged with its reason.

Where Triton cannot run on the graph's device the regions stay ATen ops, and the pass says so
(``fallback=reference`` fuses anyway, running the same programs with ATen ops: for tests and for
costing on machines without a GPU; meta graphs are always fused, they only get costed).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace

import networkx as nx
import torch
from torch import fx

from fxopt.codegen.kernel import MAX_ROW
from fxopt.codegen.lower import FREE, Domain, Unfusible, classify, lower
from fxopt.codegen.program import choose_saved, derive_backward
from fxopt.codegen.runtime import region_op, triton_status
from fxopt.cost_models.names import dtype_name

from .base import Option, Pass, PassContext, PassResult, register
from .rewrite import GraphFacts

__all__ = ["Fuse", "RegionRecord", "region_table"]

_NOT_IN_TABLE = "is not in the fusible op table"


@dataclass
class RegionRecord:
    """One candidate region: its ops, the bytes it moves and its predicted time, before and after."""

    name: str
    ops: list
    nodes: list
    fused: bool
    reason: str
    bytes_before: int = 0
    bytes_after: int = 0
    time_before_s: float | None = None
    time_after_s: float | None = None
    op: str = ""

    def row(self) -> list:
        us = lambda t: "-" if t is None else f"{t * 1e6:.1f}"  # noqa: E731
        return [self.name, " ".join(self.ops), f"{self.bytes_before / 1e6:.2f}", f"{self.bytes_after / 1e6:.2f}",
                us(self.time_before_s), us(self.time_after_s), "fused" if self.fused else self.reason]


def region_table(records: list[RegionRecord], singles: bool = False) -> str:
    """The regions of a ``fuse`` run as a table (bytes are forward + backward); one-op regions
    (nothing to fuse) only with ``singles``."""
    from tabulate import tabulate
    return tabulate([r.row() for r in records if singles or len(r.ops) > 1],
                    headers=["region", "ops", "MB before", "MB after", "us before", "us after", "decision"],
                    disable_numparse=True)


@dataclass(eq=False)
class _Group:
    nodes: list
    domain: Domain | None
    members: set = field(default_factory=set)

    def __post_init__(self):
        self.members = set(self.nodes)


def _device(gm: fx.GraphModule) -> str:
    for n in gm.graph.nodes:
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            return v.device.type
    return "cpu"


def _short(n: fx.Node) -> str:
    return str(getattr(n.target, "overloadpacket", n.target)).split(".")[-1]


def _view_domain(n: fx.Node, group: "_Group") -> Domain | None:
    """The group's domain once view ``n`` of one of its values joins, or None: views free in the
    row layout (keepdim <-> squeezed rows, a row expanded to the full shape), or one permute of a
    pointwise region's full value (the region then runs in the permute's output space)."""
    dom = group.domain
    if dom is None:
        return None
    src, out = tuple(n.args[0].meta["val"].shape), tuple(n.meta["val"].shape)
    if n.target is torch.ops.aten.permute.default:
        first = not any(m.target is torch.ops.aten.permute.default for m in group.nodes)
        return Domain(out) if first and not dom.k and src == tuple(dom.shape) else None
    if not dom.k:
        return None
    rows = set(dom.row_shapes)
    ok = (src in rows and out in rows) or (n.target is torch.ops.aten.expand.default and src in rows
                                           and out == tuple(dom.shape))
    return dom if ok else None


class _Former:
    """Greedy region formation over one graph (see the module docstring)."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, opts: dict):
        self.graph, self.ctx, self.opts = gm.graph, ctx, opts
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.dag = nx.DiGraph()
        self.dag.add_nodes_from(gm.graph.nodes)
        self.dag.add_edges_from((a, n) for n in gm.graph.nodes for a in n.all_input_nodes)
        self.facts = GraphFacts(gm.graph)
        self.group_of: dict = {}

    def _fusible(self, n: fx.Node):
        """(kind, domain) or the reason it cannot join a region (logged for the ops fxopt knows)."""
        if n.op != "call_function":
            return None
        try:
            kind, dom = classify(n)
        except Unfusible as e:
            if not str(e).endswith(_NOT_IN_TABLE) and str(e) != "does not return one tensor":
                self.ctx.decide(n, "keep", str(e))
            return str(e)
        why = None
        if any(self.facts.is_written(a) for a in [n, *n.all_input_nodes]):
            why = "reads or produces a tensor written in place"
        elif dom is not None and dom.k and math.prod(dom.shape[len(dom.shape) - dom.k:]) > self.opts["max_row"]:
            why = f"row of {math.prod(dom.shape[len(dom.shape) - dom.k:])} elements > max_row={self.opts['max_row']}"
        if why:
            self.ctx.decide(n, "keep", why)
            return why
        return kind, dom

    def convex(self, members: set) -> bool:
        """No path from the set through an outside node back into the set."""
        hi = max(self.order[n] for n in members)
        stack = [s for n in members for s in self.dag.successors(n) if s not in members and self.order[s] < hi]
        seen = set()
        while stack:
            u = stack.pop()
            if u in seen:
                continue
            seen.add(u)
            for s in self.dag.successors(u):
                if s in members:
                    return False
                if self.order[s] < hi:
                    stack.append(s)
        return True

    def _inputs(self, members: set) -> int:
        return len({a for n in members for a in n.all_input_nodes if a not in members})

    def form(self) -> list[_Group]:
        for n in self.graph.nodes:
            info = self._fusible(n)
            if not isinstance(info, tuple):
                continue
            kind, dom = info
            group = _Group([n], dom)
            producers = sorted({self.group_of[a] for a in n.all_input_nodes if a in self.group_of},
                               key=lambda g: self.order[g.nodes[0]], reverse=True)
            for pg in producers:
                if kind == "view" and group.domain is None:
                    merged = _view_domain(n, pg)
                elif group.domain is None or pg.domain is None:
                    merged = None
                else:
                    merged = pg.domain.merge(group.domain)
                members = pg.members | group.members
                if merged is not None and merged.k and any(m.target is torch.ops.aten.permute.default
                                                           for m in members):
                    merged = None   # a permute only in a pointwise region (lower's rule)
                if merged is None or len(members) > self.opts["max_ops"] or \
                        self._inputs(members) > self.opts["max_inputs"] or not self.convex(members):
                    continue
                group = _Group(sorted(members, key=self.order.get), merged)
            if kind == "view" and group.domain is None:
                continue   # a view joins a region or nothing
            for m in group.nodes:
                self.group_of[m] = group
        groups = list({id(g): g for g in self.group_of.values()}.values())
        return self._acyclic(groups)

    def _acyclic(self, groups: list[_Group]) -> list[_Group]:
        """Drop the smallest region of each cycle the contraction would create (networkx)."""
        while True:
            block = {n: i for i, g in enumerate(groups) for n in g.nodes}
            quotient = nx.DiGraph()
            quotient.add_nodes_from(("n", n) if n not in block else ("g", block[n]) for n in self.dag)
            key = lambda n: ("g", block[n]) if n in block else ("n", n)  # noqa: E731
            quotient.add_edges_from((key(a), key(b)) for a, b in self.dag.edges if key(a) != key(b))
            try:
                cycle = nx.find_cycle(quotient)
            except nx.NetworkXNoCycle:
                return groups
            in_cycle = [groups[k[1]] for edge in cycle for k in edge if k[0] == "g"]
            victim = min(in_cycle, key=lambda g: len(g.nodes))
            self.ctx.decide(victim.nodes[0], "keep", "region would close a cycle with another region")
            groups = [g for g in groups if g is not victim]


def _needs(program, inputs, training: bool) -> tuple:
    """Which inputs get a gradient in a training step: float activations and parameters, not user
    inputs (placeholders)."""
    return tuple(training and spec.dtype != "torch.bool" and node.op != "placeholder"
                 for spec, (node, _) in zip(program.inputs, inputs))


def _fused_time(low, training: bool, hw) -> tuple[int, float]:
    """Bytes and predicted seconds of the fused kernels: forward, backward and gradient sums."""
    from fxopt.cost_models.roofline import call_time
    from fxopt.codegen.kernel import output_order
    prog = low.program   # walked in the order of the replaced nodes' layout
    prog = replace(prog, order=output_order(prog, [tuple(n.meta["val"].stride()) for n in low.outputs]))
    dtype = dtype_name(prog.inputs[0].dtype) if prog.inputs else None
    nbytes, t = prog.boundary_bytes(), 0.0
    t += call_time("fused", dtype, prog.flops(), prog.boundary_bytes(), 1, hw).total_s
    needs = _needs(prog, low.inputs, training)
    if any(needs):
        bwd = derive_backward(prog, needs, choose_saved(prog))
        if bwd.program.outputs:
            nbytes += bwd.program.boundary_bytes()
            t += call_time("fused", dtype, bwd.program.flops(), bwd.program.boundary_bytes(), 1, hw).total_s
        for i, (where, m) in zip(bwd.grads_for, bwd.route):
            spec = bwd.program.outputs[m][1] if where == "out" else prog.outputs[m][1]
            if math.prod(spec.shape) != math.prod(prog.inputs[i].shape):   # summed down to the input's shape
                extra = spec.nbytes + prog.inputs[i].nbytes
                nbytes += extra
                t += call_time("reduction", dtype, 0, extra, 1, hw).total_s
    return nbytes, t


def _unfused_bytes(nodes: list, training: bool) -> int:
    """Forward bytes of the nodes as separate kernels (inputs + output each), doubled for a
    backward that reads and writes about as much."""
    total = 0
    for n in nodes:
        if n.target in FREE:
            continue
        for t in [a.meta.get("val") for a in n.all_input_nodes] + [n.meta.get("val")]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total * (3 if training else 1)


@register
class Fuse(Pass):
    name = "fuse"
    summary = "pointwise/broadcast/row-reduction chains -> one fxopt Triton kernel each, forward and backward"
    options = {
        "max_ops": Option(int, 24, "most ops in one region (1: fuse nothing)", minimum=1),
        "max_inputs": Option(int, 8, "most tensor inputs of one region", minimum=1),
        "max_row": Option(int, MAX_ROW, "longest reduced row (elements) a row-reduction region takes", minimum=1),
        "min_gain_us": Option(float, 0.0, "fuse a region only when the cost model predicts at least this gain (us)"),
        "fallback": Option(str, "unfused", "without Triton: unfused keeps ATen ops, reference fuses with ATen "
                           "programs (tests)", choices=("unfused", "reference")),
    }
    statistics = {"fused": "regions replaced by one fxopt kernel (the regions themselves: PassResult.details)"}

    @classmethod
    def render_details(cls, details) -> str:
        return region_table(details) if details else ""

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = ctx.options
        device = _device(gm)
        ok, why = triton_status(device)
        if not ok and device != "meta" and opts["fallback"] != "reference":
            ctx.decide("graph", "keep", f"regions stay ATen ops: {why}")
            return PassResult(gm, False, {}, details=[])
        hw = ctx.hw
        former = _Former(gm, ctx, opts)
        records, modified = [], False
        for i, group in enumerate(former.form()):
            rec = self._consider(gm, group, ctx, hw, f"r{i}", opts)
            records.append(rec)
            modified |= rec.fused
        if modified:
            _topo_sort(gm.graph)
        return PassResult(gm, modified, {"fused": sum(r.fused for r in records)}, details=records)

    def _consider(self, gm, group: _Group, ctx: PassContext, hw, name: str, opts) -> RegionRecord:
        nodes = group.nodes
        ops = [_short(n) for n in nodes if n.target not in FREE]
        rec = RegionRecord(name, ops, [n.name for n in nodes], False, "")
        if len(ops) < 2:
            rec.reason = "one op: nothing to fuse"
            ctx.decide(nodes[0], "keep", f"region {name}: {rec.reason}")
            return rec
        try:
            low = lower(nodes, group.domain)
        except Unfusible as e:
            rec.reason = str(e)
            ctx.decide(nodes[0], "keep", f"region {name} ({' '.join(ops)}): {e}")
            return rec
        times = [ctx.node_time(n) for n in nodes]
        rec.bytes_before = _unfused_bytes(nodes, ctx.training)
        rec.bytes_after, rec.time_after_s = _fused_time(low, ctx.training, hw)
        if all(t is not None for t in times):
            rec.time_before_s = sum(times)
        else:   # not costed: the kernel model on the unfused bytes, one kernel per op each way
            from fxopt.cost_models.roofline import call_time
            launches = len(ops) * (2 if ctx.training else 1)
            rec.time_before_s = float(call_time("pointwise", None, 0, rec.bytes_before, launches, hw).total_s)
        gain = rec.time_before_s - rec.time_after_s
        what = (f"region {name} ({' '.join(ops)}): {rec.bytes_before / 1e6:.2f} -> {rec.bytes_after / 1e6:.2f} MB, "
                f"{rec.time_before_s * 1e6:.1f} -> {rec.time_after_s * 1e6:.1f} us")
        if gain <= max(opts["min_gain_us"] * 1e-6, 0.01 * rec.time_before_s):  # 1%: below the model's resolution
            rec.reason = "no predicted gain"
            ctx.decide(nodes[-1], "keep", f"{what}: no predicted gain", gain)
            return rec
        op = region_op(low.program, low.oracle)
        rec.fused, rec.reason, rec.op = True, "fused", str(op)
        _replace(gm, nodes, low, op)
        ctx.decide(nodes[-1], "fuse", f"{what} as {op}", gain)
        return rec


def _replace(gm: fx.GraphModule, nodes: list, low, op) -> None:
    """Put the op where the region's last node was and route the outputs' uses to it (the graph is
    re-sorted once all regions are in: the region is convex, so an order exists)."""
    graph = gm.graph
    with graph.inserting_after(nodes[-1]):
        call = graph.call_function(op, tuple(node for node, _ in low.inputs))
    vals = [out.meta.get("val") for out in low.outputs]
    call.meta["val"] = vals[0] if len(vals) == 1 else tuple(vals)
    results, prev = ([call], call) if len(low.outputs) == 1 else ([], call)
    for j in range(len(low.outputs) if len(low.outputs) > 1 else 0):
        with graph.inserting_after(prev):
            prev = graph.call_function(operator.getitem, (call, j))
        prev.meta["val"] = vals[j]
        results.append(prev)
    for out, res in zip(low.outputs, results):
        out.replace_all_uses_with(res, delete_user_cb=lambda u: u not in results)
    for n in reversed(nodes):
        if not n.users:
            graph.erase_node(n)


def _topo_sort(graph: fx.Graph) -> None:
    """Reorder nodes into a topological order that keeps the original order where it can."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from((a, n) for n in graph.nodes for a in n.all_input_nodes)
    output = next(n for n in graph.nodes if n.op == "output")
    for n in nx.lexicographical_topological_sort(dag, key=index.get):
        if n is not output:
            output.prepend(n)
