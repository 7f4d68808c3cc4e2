"""``channels-last``: run conv regions in NHWC where the cost model says it pays.

cuDNN's tensor-core convolutions want NHWC (channels-last) memory; an NCHW conv pays for hidden
transposes or slower kernels. Pointwise ops, batch norm, pooling, upsampling and ``cat`` follow
their input's memory format in PyTorch, so once a conv region's inputs and weights are NHWC the
whole region stays NHWC by itself. This pass picks, per region, which tensors to make NHWC and
inserts the conversions (``aten._to_copy(x, memory_format=...)``) only at region boundaries.

* **Regions** are connected sets of *layout ops* (:data:`CONV_OPS`, :data:`FOLLOW_OPS`, every
  ATen op tagged pointwise) joined by the 4-D tensors they carry; regions without a conv are
  ignored. Consumers of a region tensor are classified by small tables: those that read any
  layout (:data:`ANY_LAYOUT_OPS`: reductions, size queries, explicit-format copies),
  ``permute(x, [0, 2, 3, 1])`` (free, even better, on an NHWC tensor), and everything else (views,
  ``linear``, unknown ops, graph outputs) which gets the original NCHW tensor back.
* **Decision.** Each tensor of a region is NCHW or NHWC; the estimated step time is the convs'
  time (NHWC runs at the device's speedup, ``Hardware.layout_table()``: measured cells over the priors
  of :data:`NHWC_SPEEDUP`, per conv class and precision) plus one
  conversion copy (read + write at memory bandwidth, one launch, again in the backward when the
  tensor needs a gradient) wherever a tensor and its consumer disagree. That is a binary labelling
  with pairwise costs, solved exactly as a minimum s-t cut (networkx). A region converts only if
  its convs gain more than its conversions cost (ties: no change); a depthwise conv between two
  NHWC convs is converted when that is cheaper than two copies; there is no NHWC->NCHW->NHWC
  ping-pong unless a conv in between is faster in NCHW by more than the two copies cost; equal
  copies are placed at the region's edge (before the ``flatten``, not after the last conv).
* **Weights** are converted in the graph from the fp32 ``get_attr`` (``_to_copy(w,
  memory_format=torch.channels_last)``), so parameters stay NCHW fp32 masters; their gradients come
  back in the parameter's layout (autograd's accumulation obeys it) and optimizer state keeps its
  layout. A producer that already is a ``_to_copy`` cast (mixed precision) used only by NHWC
  consumers gets the memory format folded into it: one copy does both.
* Tensors already channels-last stay so (ConvNeXt's ``permute -> layer_norm -> permute`` already
  feeds its convs NHWC); a tensor written in place is never copied (the write must land in the one
  storage every reader sees).

Every conv, region and conversion is logged with ``ctx.decide`` and its estimated gain ("conv
body.18 stays NCHW: depthwise conv (groups=64 = C_in), 16-bit tensor cores: CL est. 1.25x
slower"); the stats count conversions inserted, their bytes and estimated time. Nodes this pass
makes NHWC carry ``node.meta["fxopt.layout"] == "nhwc"``. The ``meta`` device cannot show the
result's layouts (its conv kernels always return NCHW): capture on CPU to see them.

Options: ``force`` (every conv in scope goes NHWC whatever the cost model says, conversions still
placed where they are cheapest: for measuring the layout on a device, and for tests at tiny sizes
where launch overheads make every copy a loss), ``scope`` (module-path globs of the convs that may
convert, e.g. ``scope=backbone.*;fpn.*``).
"""
from __future__ import annotations

import fnmatch
import functools
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx

from fxopt.cost_models.names import dtype_name
from fxopt.errors import FxoptError
from fxopt.nodeinfo import node_info

from .base import Option, Pass, PassContext, PassResult, register
from .provenance import insert_call
from .rewrite import GraphFacts, val

__all__ = ["ToChannelsLast", "LayoutError", "NHWC_SPEEDUP", "CONV_OPS", "FOLLOW_OPS", "ANY_LAYOUT_OPS",
           "conv_class", "conv_class_of", "layout_of", "nhwc_speedup", "LAYOUT_META"]

from fxopt.cost_models.layout import (NHWC_SPEEDUP, _int, conv_class_of, layout_factor, nhwc_speedup,
                                      precision_key)

aten = torch.ops.aten

NCHW, NHWC, BOTH, OTHER = "nchw", "nhwc", "both", "other"
FOLD = "fold"  # a use that takes NHWC only if it can ride on an existing cast
LAYOUT_META = "fxopt.layout"  # node.meta key: "nhwc" on every node this pass made run channels-last

_PRECISION_TEXT = {"16bit": "16-bit tensor cores", "tf32": "TF32 tensor cores", "fp32": "fp32, no tensor cores"}

CONV_OPS = {aten.conv2d.default, aten.conv2d.padding, aten.convolution.default}
# ops besides the pointwise-tagged ones whose output follows the memory format of their input;
# value: positions of the arguments that carry the layout (a list argument: each element)
FOLLOW_OPS: dict = {
    aten.batch_norm.default: (0,),
    aten.max_pool2d.default: (0,),
    aten.avg_pool2d.default: (0,),
    aten.adaptive_avg_pool2d.default: (0,),
    aten._adaptive_avg_pool2d.default: (0,),
    aten.upsample_nearest2d.vec: (0,),
    aten.upsample_nearest2d.default: (0,),
    aten.upsample_bilinear2d.vec: (0,),
    aten.upsample_bilinear2d.default: (0,),
    aten._upsample_nearest_exact2d.vec: (0,),
    aten.cat.default: (0,),
    aten.dropout.default: (0,),
    aten.feature_dropout.default: (0,),
    aten._to_copy.default: (0,),  # a dtype cast (mixed precision) preserves the memory format
}
# consumers that read a tensor in any memory format and whose result does not depend on it
ANY_LAYOUT_OPS = {
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
    aten.std.correction, aten.var_mean.correction, aten.sym_size.int, aten.sym_numel.default,
}
_COPY_OPS = {aten._to_copy.default, aten.clone.default}  # with an explicit memory format: any layout
_BIG_PS = 10 ** 15   # 1000 s in ps: the pull of a forced conv
_INF_PS = 10 ** 18   # a labelling that would copy a tensor written in place


class LayoutError(FxoptError, ValueError):
    """The graph cannot be analysed for channels-last (missing metadata, bad options)."""


# ---------------------------------------------------------------------------------------------
# facts about tensors and nodes


def _guard_false(x) -> bool:
    from torch.fx.experimental.symbolic_shapes import guard_or_false
    return bool(guard_or_false(x)) if isinstance(x, torch.SymBool) else bool(x)


def layout_of(v) -> str | None:
    """``nchw``/``nhwc``/``both`` (e.g. ``[N, C, 1, 1]``)/``other`` for a 4-D floating strided
    fake tensor, None for anything else."""
    if not (isinstance(v, torch.Tensor) and v.dim() == 4 and v.layout == torch.strided
            and v.is_floating_point()):
        return None
    try:
        cl = _guard_false(v.is_contiguous(memory_format=torch.channels_last))
        nc = _guard_false(v.is_contiguous())
    except Exception:  # undecidable symbolic strides: leave the tensor alone
        return OTHER
    return BOTH if cl and nc else NHWC if cl else NCHW if nc else OTHER


def _explicit_format(node: fx.Node) -> bool:
    fmt = node.kwargs.get("memory_format")
    return fmt is not None and fmt != torch.preserve_format


def _carrying(node: fx.Node) -> tuple | None:
    """Argument positions that carry ``node``'s layout, or None when it is not a layout op."""
    if node.op != "call_function" or _explicit_format(node):
        return None
    t = node.target
    if t in CONV_OPS:
        x = val(node.args[0])
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return None
        if t is aten.convolution.default and node.args[6]:
            return None  # transposed conv: left alone
        pos = (0, 1)  # input and weight
    elif t in FOLLOW_OPS:
        pos = FOLLOW_OPS[t]
    elif isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
        pos = tuple(range(len(node.args)))
    else:
        return None
    return pos if layout_of(val(node)) is not None else None


def _any_layout(user: fx.Node) -> bool:
    """Does ``user`` read a tensor in either layout with the same result and no copy?"""
    if user.op != "call_function":
        return False
    t = user.target
    if t in _COPY_OPS and _explicit_format(user):
        return True
    if t is aten._assert_tensor_metadata.default:
        return user.kwargs.get("stride") is None and (len(user.args) < 3 or user.args[2] is None)
    if t in ANY_LAYOUT_OPS:
        outs = [x for x in torch.utils._pytree.tree_leaves(val(user)) if isinstance(x, torch.Tensor)]
        return all(layout_of(o) in (None, BOTH) for o in outs)  # no layout-dependent 4-D result
    return False


def _to_nhwc_permute(user: fx.Node) -> bool:
    """``permute(x, [0, 2, 3, 1])``: contiguous (no copy downstream) only when ``x`` is NHWC."""
    return user.op == "call_function" and user.target is aten.permute.default and \
        [d % 4 for d in user.args[1]] == [0, 2, 3, 1]


def _module(node: fx.Node) -> str:
    return node_info(node).module or "(root)"


def _conv_groups(node: fx.Node) -> int:
    i = 8 if node.target is aten.convolution.default else 6
    return int(node.args[i]) if len(node.args) > i else int(node.kwargs.get("groups", 1))


_precision = precision_key


def conv_class(node: fx.Node) -> tuple[str, str]:
    """``(class, why)`` of a conv node: depthwise, grouped, tiny, unaligned, 1x1 or dense."""
    return conv_class_of(val(node.args[0]), val(node.args[1]), _conv_groups(node))


# ---------------------------------------------------------------------------------------------
# costs (seconds) from the roofline primitives


@dataclass
class _Costs:
    hw: object
    training: bool
    requires_grad: dict

    def _bytes(self, v) -> int:
        return _int(v.numel()) * v.element_size()

    def copy(self, node: fx.Node) -> float:
        """One layout conversion of ``node``'s tensor: forward copy, plus the gradient's in backward."""
        from fxopt.cost_models.roofline import call_time
        v = val(node)
        one = call_time("memory", dtype_name(v.dtype), 0, 2 * self._bytes(v), 1, self.hw).total_s
        fwd = 0.0 if _foldable_cast(node) else one
        return fwd + (one if self.training and self.requires_grad.get(node, False) else 0.0)

    def conv(self, node: fx.Node) -> float:
        """Forward + backward time of a conv in NCHW without launches (layout does not change those)."""
        from torch.utils.flop_counter import conv_flop_count

        from fxopt.cost_models.roofline import call_time
        x, w, out = val(node.args[0]), val(node.args[1]), val(node)
        shape = lambda t: [_int(d) for d in t.shape]
        flops = conv_flop_count(shape(x), shape(w), shape(out), transposed=False)
        dtype = dtype_name(x.dtype)
        nx, nw, no = self._bytes(x), self._bytes(w), self._bytes(out)
        t = call_time("conv", dtype, flops, nx + nw + no, 0, self.hw).total_s
        if self.training:
            gx, gw = self.requires_grad.get(node.args[0], False), self.requires_grad.get(node.args[1], False)
            if gx or gw:
                t += call_time("conv", dtype, flops * (gx + gw), no + nx + nw + gx * nx + gw * nw, 0,
                               self.hw).total_s
        return t


def _foldable_cast(node: fx.Node) -> bool:
    """A ``_to_copy`` without a memory format: the layout can ride on its copy."""
    return node.op == "call_function" and node.target is aten._to_copy.default and not _explicit_format(node)


def _requires_grad(gm: fx.GraphModule, training: bool) -> dict:
    out: dict = {}
    if not training:
        return out
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            out[n] = bool(getattr(val(n), "requires_grad", False))
        elif n.op == "get_attr":
            attr = functools.reduce(getattr, n.target.split("."), gm)
            out[n] = bool(getattr(attr, "requires_grad", False))
        elif n.op == "call_function":
            v = val(n)
            floating = any(isinstance(x, torch.Tensor) and x.is_floating_point()
                           for x in torch.utils._pytree.tree_leaves(v))
            out[n] = floating and any(out.get(a, False) for a in n.all_input_nodes)
    return out


# ---------------------------------------------------------------------------------------------
# the plan: regions, costs, minimum cut


@dataclass
class _Region:
    nodes: list                      # layout nodes, graph order
    convs: list
    nhwc: set = field(default_factory=set)   # nodes that change to NHWC
    gain_s: float = 0.0
    conv_gain_s: float = 0.0
    all_gain_s: float = 0.0          # the gain if every free node went NHWC (for refusals)


def _ps(seconds: float) -> int:
    return max(0, int(round(seconds * 1e12)))


class _Planner:
    def __init__(self, gm: fx.GraphModule, ctx: PassContext):
        from fxopt.cost_models import load_hardware

        self.gm, self.ctx = gm, ctx
        self.force = bool(ctx.options.get("force", False))
        scope = ctx.options.get("scope", "*")
        self.scope = [scope] if isinstance(scope, str) else [str(s) for s in scope]
        if not self.scope:
            raise LayoutError("channels-last: scope is empty; give module-path globs like scope=backbone.*;fpn.*")
        for n in gm.graph.nodes:
            if n.op == "call_function" and "val" not in n.meta:
                raise LayoutError(f"channels-last needs node.meta['val'] on every node; {n.name} has none. "
                                  f"Capture with fxopt.capture and run passes through PassManager.")
        self.costs = _Costs(load_hardware(ctx.hardware), ctx.training, _requires_grad(gm, ctx.training))
        self.facts = GraphFacts(gm.graph)
        self.carry = {n: c for n in gm.graph.nodes if (c := _carrying(n)) is not None}
        self.layout0 = {}
        for n in gm.graph.nodes:  # a [N, C, 1, 1] result of an op reading NHWC input runs NHWC
            if n.op == "output":
                continue
            lay = layout_of(val(n))
            if lay == BOTH and n in self.carry and any(
                    self.layout0.get(a) == NHWC for a in self.carried_args(n, weights=False)):
                lay = NHWC
            self.layout0[n] = lay
        self.conv_info: dict = {}  # conv -> (class, why, factor, gain_s)

    # -- graph structure ------------------------------------------------------------------------
    def carried_args(self, node: fx.Node, weights: bool = True) -> list[fx.Node]:
        """The tensors feeding ``node`` in a layout-carrying position (4-D ones only)."""
        out = []
        for i in self.carry[node]:
            if i >= len(node.args) or (not weights and i == 1 and node.target in CONV_OPS):
                continue
            for a in torch.utils._pytree.tree_leaves(node.args[i]):
                if isinstance(a, fx.Node) and layout_of(val(a)) is not None and a not in out:
                    out.append(a)
        return out

    def carried_by(self, user: fx.Node, producer: fx.Node) -> bool:
        return user in self.carry and producer in self.carried_args(user)

    def regions(self) -> list[_Region]:
        import networkx as nx
        g = nx.Graph()
        g.add_nodes_from(self.carry)
        for n in self.carry:
            for a in self.carried_args(n):
                if a in self.carry:
                    g.add_edge(a, n)
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        out = []
        for comp in nx.connected_components(g):
            nodes = sorted(comp, key=order.get)
            convs = [n for n in nodes if n.target in CONV_OPS]
            if convs:
                out.append(_Region(nodes, convs))
        return sorted(out, key=lambda r: order[r.nodes[0]])

    # -- costs ----------------------------------------------------------------------------------
    def edge_cost(self, p: fx.Node) -> tuple[int, int]:
        """(estimated ps, pin) of converting ``p``'s tensor; pin forbids copying a tensor written in place."""
        if self.layout0.get(p) == BOTH:
            return 0, 0
        return _ps(self.costs.copy(p)), (_INF_PS if self.written(p) else 0)

    def written(self, p: fx.Node) -> bool:
        """Is ``p``'s storage written in place (by a later op, or is ``p`` an in-place op's result)?"""
        schema = getattr(p.target, "_schema", None) if p.op == "call_function" else None
        inplace = schema is not None and any(r.alias_info is not None and r.alias_info.is_write
                                             for r in schema.returns)
        return inplace or self.facts.is_written(p)

    def in_scope(self, conv: fx.Node) -> bool:
        path = node_info(conv).module
        return any(fnmatch.fnmatchcase(path, pat) for pat in self.scope)

    def conv_gain(self, conv: fx.Node) -> float:
        cls, why = conv_class(conv)
        prec = _precision(val(conv.args[0]).dtype)
        factor = self.costs.hw.layout_table()[cls][prec]   # this device's measured cells over the priors
        # the cost model's own rule: roofline x layout factor in NCHW minus in NHWC
        gain = self.costs.conv(conv) * (layout_factor(factor, False) - layout_factor(factor, True))
        self.conv_info[conv] = (cls, why, prec, factor, gain)
        return gain

    # -- the cut --------------------------------------------------------------------------------
    def solve(self, region: _Region) -> None:
        """Label the region's nodes NCHW/NHWC by a minimum s-t cut of the estimated step time.

        Source side = NCHW, sink side = NHWC. An edge u -> v of capacity c costs c when u is NCHW
        and v is NHWC: a conv's gain sits on conv -> NHWC (lost when the conv stays NCHW), its
        loss on NCHW -> conv, a conversion copy on both directions between a tensor and its
        consumer, and on NCHW -> n for a consumer outside the region that needs NCHW back.
        """
        import networkx as nx
        S, T = "__nchw__", "__nhwc__"
        real: Counter = Counter()     # (u, v) -> ps: estimated times
        pinned: Counter = Counter()   # (u, v) -> ps: constraints (fixed layouts, force)
        members = set(region.nodes)
        for n in region.nodes:
            lay = self.layout0[n]
            if lay == NHWC:
                pinned[n, T] += _INF_PS        # already channels-last: stays so
            elif lay == OTHER:
                pinned[S, n] += _INF_PS        # odd strides: left alone
            if n.target in CONV_OPS:
                gain = _ps(self.conv_gain(n))
                loss = _ps(-self.conv_info[n][4])
                real[n, T] += gain
                real[S, n] += loss
                if lay != NHWC and not self.in_scope(n):
                    pinned[S, n] += _INF_PS
                elif self.force and lay != NHWC:
                    pinned[n, T] += _BIG_PS
            for p in self.carried_args(n):
                cost, pin = self.edge_cost(p)
                if p in members:
                    real[p, n] += cost
                    real[n, p] += cost
                    pinned[p, n] += pin
                    pinned[n, p] += pin
                elif self.layout0.get(p) in (NCHW, OTHER):
                    real[S, n] += cost         # n in NHWC needs a copy of p
                    pinned[S, n] += pin
            cost, pin = self.edge_cost(n)
            for user in n.users:
                if user in members and self.carried_by(user, n):
                    continue
                if user.op != "output" and _any_layout(user):
                    continue
                if _to_nhwc_permute(user):
                    real[n, T] += cost         # NCHW: the permuted tensor is copied downstream
                else:
                    real[S, n] += cost         # n in NHWC: user needs it back in NCHW
                    pinned[S, n] += pin
        g = nx.DiGraph()
        g.add_nodes_from([S, T, *region.nodes])
        for (u, v), cap in (real + pinned).items():
            if cap > 0:
                g.add_edge(u, v, capacity=min(cap, _INF_PS))
        residual = nx.algorithms.flow.preflow_push(g, S, T)

        def reachable(start, forward: bool) -> set:
            seen, stack = {start}, [start]
            while stack:
                v = stack.pop()
                for u in (residual.successors(v) if forward else residual.predecessors(v)):
                    e = residual[v][u] if forward else residual[u][v]
                    if u not in seen and e["capacity"] - e["flow"] > 0:
                        seen.add(u)
                        stack.append(u)
            return seen

        # Among minimum cuts: the smallest NHWC side (nodes that reach T in the residual graph), so a
        # region that does not pay stays untouched; if that converts anything, the largest one (all
        # nodes S cannot reach), so ties between equal copies put them at the region's boundary.
        sink = set() if residual.graph["flow_value"] >= _INF_PS else reachable(T, forward=False) - {T}
        if sink:
            sink = set(region.nodes) - reachable(S, forward=True)
        fixed = {n for n in region.nodes if self.layout0[n] == NHWC}
        region.nhwc = sink - fixed

        def cost(sink: set) -> float:
            sink = sink | fixed | {T}
            return sum(c for (u, v), c in real.items() if u not in sink and v in sink) * 1e-12

        free = {n for n in region.nodes if self.layout0[n] in (NCHW, BOTH)
                and not (n.target in CONV_OPS and not self.in_scope(n))}
        region.gain_s = cost(set()) - cost(region.nhwc)
        region.all_gain_s = cost(set()) - cost(free)
        region.conv_gain_s = sum(self.conv_info[n][4] for n in region.nhwc if n in self.conv_info)


# ---------------------------------------------------------------------------------------------
# rewriting: conversions where the labelling needs them


def _positions(user: fx.Node):
    """(position, argument) of every positional and keyword argument of ``user``."""
    yield from enumerate(user.args)
    yield from user.kwargs.items()


# what an inserted conversion is, by (direction, is a weight): the stat it counts and its log line
_INSERTED = {
    (NHWC, True): ("weights_to_nhwc", "weight {weight} to NHWC in the graph (the parameter stays an NCHW master)"),
    (NHWC, False): ("conversions_to_nhwc", "{p} NCHW->NHWC at a region input (for {before})"),
    (NCHW, False): ("conversions_to_nchw", "{p} NHWC->NCHW at a region exit (for {before})"),
}


@dataclass
class _Rewriter:
    """Inserts the conversions the labelling ``nhwc`` needs; each tensor is converted at most once per
    direction (``converted``), and a cast folds the layout in only if every use wants NHWC (``wants``)."""

    graph: fx.Graph
    plan: _Planner
    nhwc: set
    ctx: PassContext
    stats: Counter = field(default_factory=Counter)
    wants: dict = field(default_factory=dict)       # tensor -> the layout each of its uses wants
    converted: dict = field(default_factory=dict)   # (tensor, layout) -> its conversion

    def run(self) -> Counter:
        for user in list(self.graph.nodes):
            for pos, a in _positions(user):
                for p in torch.utils._pytree.tree_leaves(a):
                    if isinstance(p, fx.Node) and layout_of(val(p)) is not None:
                        self.wants.setdefault(p, []).append(self.want(user, pos, p))
        for user in list(self.graph.nodes):
            self.rewire(user)
        self.stats["conversion_est_us"] = round(self.stats["conversion_est_us"], 3)
        return self.stats

    def runs_nhwc(self, n: fx.Node) -> bool:
        return n in self.nhwc or self.plan.layout0.get(n) == NHWC

    def current(self, p: fx.Node) -> str | None:
        return NHWC if p in self.nhwc else self.plan.layout0.get(p)

    def want(self, user: fx.Node, pos, p: fx.Node) -> str:
        """What layout ``user`` wants of ``p`` at argument position ``pos``: nhwc, nchw, fold or keep."""
        plan = self.plan
        carrying = user in plan.carry and isinstance(pos, int) and pos in plan.carry[user]
        if carrying and user in self.nhwc:
            return NHWC if self.current(p) not in (NHWC, BOTH) else "keep"
        if carrying and user.target in CONV_OPS and pos == 1 and self.runs_nhwc(user) and _foldable_cast(p) \
                and self.current(p) not in (NHWC, BOTH):
            return FOLD  # a conv already NHWC converts its weight itself: free only inside a cast
        if p in self.nhwc and self.current(p) != BOTH and plan.layout0[p] != BOTH:
            if carrying and self.runs_nhwc(user):
                return "keep"
            if user.op != "output" and (_any_layout(user) or _to_nhwc_permute(user)):
                return "keep"
            return NCHW
        return "keep"

    def rewire(self, user: fx.Node) -> None:
        """Point ``user``'s arguments at the conversions it wants."""
        args, kwargs, hits = list(user.args), dict(user.kwargs), []
        for pos, a in _positions(user):
            new = fx.node.map_arg(a, functools.partial(self.swap, user, pos, hits))
            if isinstance(pos, int):
                args[pos] = new
            else:
                kwargs[pos] = new
        if hits:
            user.args, user.kwargs = tuple(args), kwargs

    def swap(self, user: fx.Node, pos, hits: list, p):
        """``p`` as ``user`` reads it at ``pos``: itself or its conversion (noted in ``hits``)."""
        if not isinstance(p, fx.Node) or layout_of(val(p)) is None:
            return p
        to = self.want(user, pos, p)
        if to == "keep":
            return p
        hits.append(p)
        if (p, to) in self.converted:
            return self.converted[p, to]
        return _CONVERSIONS[to](self, p, user)

    def foldable(self, p: fx.Node) -> bool:
        """Can NHWC ride on ``p``'s own cast: every use wants NHWC and none is a graph output?"""
        return _foldable_cast(p) and all(k in (NHWC, FOLD, "keep") for k in self.wants.get(p, [])) and \
            all(u.op != "output" for u in p.users)

    def fold(self, p: fx.Node) -> fx.Node:
        cost = self.plan.costs.copy(p)  # priced as the cast it still is
        p.kwargs = {**p.kwargs, "memory_format": torch.channels_last}
        p.meta[LAYOUT_META] = NHWC
        self.ctx.decide(p, "fold-cast", f"memory_format=channels_last folded into the existing cast "
                                        f"{p.name}: one copy casts and converts", -cost)
        self.stats["folded_casts"] += 1
        self.converted[p, NHWC] = self.converted[p, FOLD] = p
        return p

    def insert(self, p: fx.Node, to: str, before: fx.Node) -> fx.Node:
        """A ``_to_copy`` of ``p`` into layout ``to`` before ``before``, counted and logged."""
        fmt = torch.channels_last if to == NHWC else torch.contiguous_format
        new = insert_call(self.graph, aten._to_copy.default, (p,), {"memory_format": fmt}, before=before,
                          like=p if p.op == "call_function" else before, name=f"{p.name}_{to}")
        is_weight = p.op == "get_attr" or (before.target in CONV_OPS and before.args[1] is p)
        if to == NHWC:
            new.meta[LAYOUT_META] = NHWC
        stat, what = _INSERTED[to, to == NHWC and is_weight]  # a weight: a parameter, or computed from one
        cost, nbytes = self.plan.costs.copy(p), self.plan.costs._bytes(val(p))
        self.stats[stat] += 1
        self.stats["conversion_bytes"] += 2 * nbytes
        self.stats["conversion_est_us"] += round(cost * 1e6, 3)
        what = what.format(weight=p.target if p.op == "get_attr" else p.name, p=p.name, before=before.name)
        self.ctx.decide(new, "insert-conversion", f"{what}: copy of {_fmt_bytes(nbytes)}", -cost)
        self.converted[p, to] = new
        return new


# conversion wanted -> how: NHWC folds into an existing cast where it can, else copies; FOLD only folds
_CONVERSIONS = {
    NHWC: lambda rw, p, before: rw.fold(p) if rw.foldable(p) else rw.insert(p, NHWC, before),
    NCHW: lambda rw, p, before: rw.insert(p, NCHW, before),
    FOLD: lambda rw, p, before: rw.fold(p) if rw.foldable(p) else p,
}


# ---------------------------------------------------------------------------------------------
# the pass


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _fmt_us(s: float) -> str:
    return f"{s * 1e6:+.1f} us"


@register
class ToChannelsLast(Pass):
    name = "channels-last"
    summary = "run conv regions in NHWC (channels-last) where the cost model predicts a gain"
    after = {"mixed-precision": "the layout change folds into the weight casts mixed precision inserts"}
    statistics = {
        "regions": "conv regions found", "regions_converted": "regions run in NHWC",
        "convs_nhwc": "convolutions run in NHWC", "convs_nchw": "convolutions left NCHW",
        "weights_to_nhwc": "weight conversions inserted (the parameter stays NCHW)",
        "conversions_to_nhwc": "activation conversions at region inputs",
        "conversions_to_nchw": "activation conversions at region exits",
        "folded_casts": "conversions folded into an existing cast", "conversion_bytes": "bytes the conversions move",
        "conversion_est_us": "predicted cost of the conversions (us)", "est_gain_us": "predicted net gain (us)",
    }
    options = {
        "force": Option(bool, False, "every conv in scope goes NHWC whatever the cost model predicts"),
        "scope": Option(list, "*", "module-path globs of the convs that may convert (*: all; backbone.*;fpn.*)"),
    }

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        plan = _Planner(gm, ctx)
        regions = plan.regions()
        stats: Counter = Counter(regions=len(regions))
        nhwc: set = set()
        for region in regions:
            plan.solve(region)
            nhwc |= region.nhwc
            self._log_region(region, plan, ctx, stats)
        stats.update(_Rewriter(gm.graph, plan, nhwc, ctx).run())
        for n in nhwc:
            n.meta[LAYOUT_META] = NHWC
        modified = bool(stats["conversions_to_nhwc"] or stats["conversions_to_nchw"] or stats["weights_to_nhwc"]
                        or stats["folded_casts"])
        stats["est_gain_us"] = round(sum(d.est_gain_s or 0.0 for d in ctx.decisions
                                         if d.action in ("convert-region",)) * 1e6, 3)
        return PassResult(gm, modified, dict(stats))

    # -- decisions --------------------------------------------------------------------------------
    def _log_region(self, region: _Region, plan: _Planner, ctx: PassContext, stats: Counter) -> None:
        converts = bool(region.nhwc)
        first, last = _module(region.convs[0]), _module(region.convs[-1])
        span = first if first == last else f"{first} .. {last}"
        what = f"region of {len(region.convs)} conv(s) ({span}), {len(region.nodes)} ops"
        if converts:
            conv_part = region.conv_gain_s
            ctx.decide(region.convs[0], "convert-region",
                       f"{what}: {len(region.nhwc)} to NHWC; convs {_fmt_us(conv_part)}, "
                       f"conversions {_fmt_us(region.gain_s - conv_part)}"
                       + (" (force=true)" if plan.force else ""), region.gain_s)
            stats["regions_converted"] += 1
        elif any(plan.layout0[c] != NHWC for c in region.convs):
            if not any(plan.in_scope(c) for c in region.convs):
                why = f"no conv in scope {';'.join(plan.scope)}"
            elif plan.force:
                why = "its tensors are written in place and read where NCHW is needed: they cannot be copied"
            else:
                why = f"converting it is estimated at {_fmt_us(region.all_gain_s)} (conversions cost more " \
                      f"than the convs gain)"
            ctx.decide(region.convs[0], "keep-region", f"{what} stays NCHW: {why}", region.all_gain_s)
        for conv in region.convs:
            cls, why, prec, factor, gain = plan.conv_info[conv]
            speed = f"CL est. {factor:.3g}x faster" if factor >= 1 else f"CL est. {1 / factor:.3g}x slower"
            what = f"{why}, {_PRECISION_TEXT[prec]}: {speed}"
            head = lambda verdict: f"conv {_module(conv)} {verdict}: {what}"
            if plan.layout0[conv] == NHWC:
                ctx.decide(conv, "already-nhwc", f"{head('already runs NHWC')}; its input is channels-last", 0.0)
                stats["convs_nhwc"] += 1
            elif conv in region.nhwc:
                note = ""
                if plan.force:
                    note = "; forced (force=true)"
                elif factor < 1:
                    note = "; converted anyway: its neighbours run NHWC and keeping it NCHW needs dearer copies"
                ctx.decide(conv, "to-nhwc", head("to NHWC") + note, gain)
                stats["convs_nhwc"] += 1
            else:
                if not plan.in_scope(conv):
                    note = f"; outside scope {';'.join(plan.scope)}"
                elif plan.written(conv.args[0]):
                    note = f"; its input {conv.args[0].name} is written in place, a copy would lose the writes"
                elif factor < 1:
                    note = ""
                elif converts:
                    note = "; the conversions it would need cost more than it gains"
                else:
                    note = f"; its region stays NCHW (region est. {_fmt_us(region.all_gain_s)} with conversions)"
                ctx.decide(conv, "keep-nchw", head("stays NCHW") + note, gain)
                stats["convs_nchw"] += 1

    # -- guarantee --------------------------------------------------------------------------------
    def ensures(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        """Every conv this pass made NHWC reads NHWC input and weight; no NHWC->NCHW->NHWC round trip.

        Not checkable on the ``meta`` device: its conv kernels always return NCHW."""
        for n in gm.graph.nodes:
            if n.op != "call_function":
                continue
            if n.target in CONV_OPS and n.meta.get(LAYOUT_META) == NHWC and val(n).device.type != "meta":
                for a, what in ((n.args[0], "input"), (n.args[1], "weight")):
                    if layout_of(val(a)) not in (NHWC, BOTH):
                        raise LayoutError(f"conv {n.name} was made channels-last but its {what} {a.name} is "
                                          f"{layout_of(val(a))}")
            if n.target is aten._to_copy.default and n.kwargs.get("memory_format") == torch.channels_last:
                src = n.args[0]
                if isinstance(src, fx.Node) and src.target is aten._to_copy.default and \
                        src.kwargs.get("memory_format") == torch.contiguous_format:
                    raise LayoutError(f"{n.name} converts {src.name} back to NHWC right after converting it "
                                      f"to NCHW (ping-pong)")
