"""fx nodes -> a region :class:`~fxopt.codegen.program.Program`.

Which ATen nodes can join a region, over which iteration space (``Domain``), and what they compute
as program steps. Pointwise ops come from the table in :mod:`.scalar`; the row-wise ops below
(sums and means over the trailing dims, softmax, layer/RMS norm) are expanded into reductions and
expressions, so their backward is derived like everything else's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import sympy as sp
import torch
from torch import fx

from fxopt.errors import FxoptError

from .program import Program, TensorSpec, _Builder
from .scalar import POINTWISE

aten = torch.ops.aten

__all__ = ["Domain", "Unfusible", "classify", "lower", "Lowered", "VIEWS", "FREE"]


class Unfusible(FxoptError):
    """A node (or a region) that the fused-kernel backend cannot compile; the message says why."""


@dataclass(frozen=True)
class Domain:
    shape: tuple
    k: int = 0   # trailing dims reduced

    @property
    def row_shapes(self) -> tuple:
        if not self.k:
            return ()
        outer = self.shape[:len(self.shape) - self.k]
        return outer + (1,) * self.k, outer

    def merge(self, other: "Domain") -> "Domain | None":
        """The space both fit in, or None: same shape with at most one reduction depth, or a
        pointwise space that is the other's rows."""
        if self.shape == other.shape and (self.k == other.k or 0 in (self.k, other.k)):
            return Domain(self.shape, max(self.k, other.k))
        if other.k == 0 and self.k and other.shape in self.row_shapes:
            return self
        if self.k == 0 and other.k and self.shape in other.row_shapes:
            return other
        return None


REDUCTIONS = {aten.sum.dim_IntList: "sum", aten.mean.dim: "mean", aten.amax.default: "max",
              aten.amin.default: "min"}
SOFTMAX = {aten.softmax.int: False, aten._softmax.default: False, aten.log_softmax.int: True,
           aten._log_softmax.default: True}
NORMS = {aten.layer_norm.default, aten.rms_norm.default}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
         aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default}
FREE = VIEWS | {aten.permute.default}   # views that can sit inside a region (they move no data)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _static(shape) -> tuple:
    if not all(isinstance(s, int) for s in shape):
        raise Unfusible("dynamic shape: fused kernels are specialized to static shapes")
    return tuple(shape)


def _trailing(dims, rank: int) -> int:
    """How many trailing dims ``dims`` names (raise if they are not the trailing ones)."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return rank
    dims = [dims] if isinstance(dims, int) else list(dims)
    norm = sorted(d % rank for d in dims)
    if norm != list(range(rank - len(norm), rank)):
        raise Unfusible(f"reduces dims {dims} of a rank-{rank} tensor: only trailing dims are a row")
    return len(norm)


def classify(node: fx.Node) -> tuple[str, Domain | None]:
    """("pointwise" | "reduce" | "view", its domain); raises Unfusible with the reason otherwise."""
    if node.op != "call_function":
        raise Unfusible("not an op")
    out = _val(node)
    if node.target in FREE:
        return "view", None
    if not isinstance(out, torch.Tensor):
        raise Unfusible("does not return one tensor")
    if out.dtype not in _FLOATS:
        raise Unfusible(f"{out.dtype} result")
    for a in node.all_input_nodes:
        v = _val(a)
        if isinstance(v, torch.Tensor) and v.dtype not in _FLOATS + (torch.bool,):
            raise Unfusible(f"{v.dtype} operand {a.name}")
    shape = _static(out.shape)
    t = node.target
    if t in REDUCTIONS:
        x = _val(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return "reduce", Domain(_static(x.shape), _trailing(dims, x.dim()))
    if t in SOFTMAX:
        x = _val(node.args[0])
        if node.args[1] % x.dim() != x.dim() - 1:
            raise Unfusible("softmax over a dim that is not the last")
        return "reduce", Domain(_static(x.shape), 1)
    if t in NORMS:
        return "reduce", Domain(shape, len(node.args[1]))
    if t is aten.batch_norm.default:
        if node.args[5]:
            raise Unfusible("batch norm in training: its statistics reduce over (N, H, W), not a row")
        if out.dim() < 2:
            raise Unfusible("batch norm of a 1-D tensor")
        return "pointwise", Domain(shape)
    if str(t) not in POINTWISE:
        raise Unfusible(f"{t} is not in the fusible op table")
    if t is aten._to_copy.default and set(node.kwargs) - {"dtype", "memory_format"}:
        raise Unfusible("copy that changes device or layout")
    if t in (aten._to_copy.default, aten.clone.default) and node.kwargs.get("memory_format") not in (
            None, torch.preserve_format):
        raise Unfusible("copy to another memory format (a layout change, not arithmetic)")
    if t is aten.dropout.default and node.args[2]:
        raise Unfusible("dropout in training draws random numbers")
    return "pointwise", Domain(shape)


def _pad(shape, rank: int) -> tuple:
    return (1,) * (rank - len(shape)) + tuple(shape)


@dataclass
class Lowered:
    program: Program
    inputs: list          # (fx.Node, view shape) per program input
    outputs: list         # fx.Node per program output
    oracle: object = None  # the nodes as an fx.GraphModule of the inputs (see ``_oracle``)


def _label(nodes) -> str:
    names = []
    for n in nodes:
        if n.target in FREE:
            continue
        name = str(n.target.overloadpacket).split(".")[-1].strip("_")
        if name not in names:
            names.append(name)
    return "_".join(names)[:40] or "fused"


def lower(nodes: list[fx.Node], domain: Domain) -> Lowered:
    """Compile a region's nodes (in graph order) over ``domain`` into a program."""
    return _Lowering(nodes, domain).run()


class _Lowering:
    """One region being lowered: its index space, the program builder, the values computed so far
    (``env``: fx node -> program value) and the tensors loaded from outside the region."""

    def __init__(self, nodes: list[fx.Node], domain: Domain):
        self.nodes = nodes
        self.S, self.k = tuple(domain.shape), domain.k
        self.rank, self.region = len(self.S), set(nodes)
        self.keep, self.flat = domain.row_shapes or (None, None)
        self.b = _Builder("v")
        self.env: dict = {}
        self.inputs: list = []
        self.specs: list[TensorSpec] = []
        self.loads: dict = {}
        self.space = _permuted_space(nodes, self.region, self.k)   # node -> permute into the region's space

    def run(self) -> Lowered:
        for n in self.nodes:
            self.env[n] = _LOWERINGS.get(n.target, _pointwise)(self, n)
        outputs = [n for n in self.nodes if any(u not in self.region for u in n.users)]
        if not outputs:
            raise Unfusible("the region's results are not used")
        out_specs = []
        for n in outputs:
            v = _val(n)
            out_specs.append((self.env[n].name, TensorSpec(self.kind(self.rshape(n)), tuple(v.shape), str(v.dtype),
                                                           perm=self.space.get(n))))
        for value, spec in out_specs:
            if value not in self.b.kinds:
                raise Unfusible("a result of the region is one of its inputs, unchanged")
        program = Program(self.S, self.k, self.specs, self.b.steps, out_specs, _label(self.nodes))
        return Lowered(program, self.inputs, outputs, _oracle(self.nodes, self.inputs, outputs))

    def rshape(self, n: fx.Node) -> tuple:
        """``n``'s shape in the region's index space (through the permute for nodes upstream of it)."""
        own = tuple(_val(n).shape)
        return tuple(own[p] for p in self.space[n]) if n in self.space else own

    def kind(self, shape) -> str:
        shape = tuple(shape)
        if shape == self.S:
            return "full"
        if self.k and shape in (self.keep, self.flat):
            return "row"
        raise Unfusible(f"shape {list(shape)} is neither the region's {list(self.S)} nor its rows")

    def load(self, arg: fx.Node, view: tuple, perm: tuple | None):
        """The program value of an input tensor, loaded once per (tensor, view, permute)."""
        key = (arg, view, perm)
        if key not in self.loads:
            k = self.k
            kd = "row" if k and all(d == 1 for d in view[self.rank - k:]) else "full"
            idx = len(self.inputs)
            self.inputs.append((arg, view))
            self.specs.append(TensorSpec(kd, view, str(_val(arg).dtype), perm=perm))
            self.loads[key] = self.b.load(f"x{idx}", idx, kd)
        return self.loads[key]

    def operand(self, arg, shape: tuple, view: tuple | None = None, perm: tuple | None = None):
        """``arg`` (a region node, an outside tensor read through ``view``, or a number) as a program
        value of a node of ``shape``."""
        S, k, rank = self.S, self.k, self.rank
        if isinstance(arg, fx.Node) and arg in self.region:
            ashape = tuple(_val(arg).shape)
            if ashape != shape and not (shape == S and ashape == self.keep):
                raise Unfusible(f"{arg.name} {list(ashape)} broadcasts against {list(shape)} "
                                f"in a way the row layout does not express")
            return self.env[arg]
        if isinstance(arg, fx.Node):
            v = _val(arg)
            if not isinstance(v, torch.Tensor):
                raise Unfusible(f"operand {arg.name} is not a tensor")
            if view is None:
                view = _pad(v.shape, rank) if shape != self.flat or k == 0 else _pad(v.shape, rank - k) + (1,) * k
            view = _static(view)
            if perm:   # the operand of a node upstream of the region's permute
                view = tuple(view[p] for p in perm)
            if len(view) != rank or any(a not in (1, s) for a, s in zip(view, S)):
                raise Unfusible(f"operand {arg.name} {list(v.shape)} does not broadcast to {list(S)}")
            return self.load(arg, view, perm)
        if isinstance(arg, (int, float, bool)):
            return arg
        raise Unfusible(f"argument {arg!r} is neither a tensor nor a number")


# ---------------------------------------------------------------------------------------------
# one lowering per op group: (region, node) -> the node's program value


def _permute(lw: _Lowering, n: fx.Node):
    """The region's one permute: free in its index space."""
    return lw.env[n.args[0]]


def _view(lw: _Lowering, n: fx.Node):
    """A view between the region's row shapes (or a row expanded to the full space) moves nothing."""
    src, shape = n.args[0], tuple(_val(n).shape)
    sshape = tuple(_val(src).shape)
    ok = lw.kind(shape) == "row" and lw.kind(sshape) == "row" or \
        (n.target is aten.expand.default and lw.kind(sshape) == "row" and shape == lw.S)
    if src not in lw.region or not ok:
        raise Unfusible(f"view {n.name} reshapes a value of the region")
    return lw.env[src]


def _reduction(lw: _Lowering, n: fx.Node):
    how = REDUCTIONS[n.target]
    x = lw.operand(n.args[0], lw.S)
    s = lw.b.reduce(x, "sum" if how == "mean" else how)
    return lw.b.expr(s / math.prod(lw.S[lw.rank - lw.k:]), "row") if how == "mean" else s


def _softmax(lw: _Lowering, n: fx.Node):
    b = lw.b
    x = lw.operand(n.args[0], lw.S)
    m = b.reduce(x, "max", nograd=True)
    e = b.expr(sp.exp(x - m), "full")
    s = b.reduce(e)
    return b.expr(x - m - sp.log(s) if SOFTMAX[n.target] else e / s, "full")


def _batch_norm(lw: _Lowering, n: fx.Node):
    """Inference batch norm: per-channel affine arithmetic on the running statistics."""
    S = lw.S
    x, w, bias, rm, rv = n.args[:5]
    eps = n.args[7]
    cview = (1, S[1]) + (1,) * (lw.rank - 2)
    y = (lw.operand(x, S) - lw.operand(rm, S, cview)) / sp.sqrt(lw.operand(rv, S, cview) + sp.Float(eps))
    if w is not None:
        y = y * lw.operand(w, S, cview)
    if bias is not None:
        y = y + lw.operand(bias, S, cview)
    return lw.b.expr(y, "full")


def _pointwise(lw: _Lowering, n: fx.Node):
    """Every other op: an expression from the table in :mod:`.scalar`."""
    t, out = n.target, _val(n)
    args = [lw.operand(a, tuple(out.shape), perm=lw.space.get(n)) for a in n.args]
    kwargs = {key: v for key, v in n.kwargs.items() if key not in ("memory_format",)}
    if t in (aten._to_copy.default, aten.to.dtype, aten.type_as.default):
        kwargs = {"dtype": out.dtype}
        args = args[:1]
    return lw.b.expr(POINTWISE[str(t)](*args, **kwargs), lw.kind(lw.rshape(n)))


def _oracle(nodes: list, inputs: list, outputs: list) -> fx.GraphModule:
    """The region's nodes as a module of the op's inputs: run on meta tensors, it tells the strides
    eager gives their results for given input layouts."""
    graph, env = fx.Graph(), {}
    for i, (node, _) in enumerate(inputs):
        ph = graph.placeholder(f"x{i}")
        env.setdefault(node, ph)
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(torch.nn.Module(), graph)


def _permuted_space(nodes: list, region: set, k: int) -> dict:
    """A region may hold one permute (ConvNeXt: layer-scale mul, permute, residual add): the
    region runs in the permute's output space, and every region node upstream of it reads and
    writes through the permute. Returns node -> permute dims for those upstream nodes."""
    perms = [n for n in nodes if n.target is aten.permute.default]
    if not perms:
        return {}
    if len(perms) > 1 or k:
        raise Unfusible("more than one permute, or a permute in a row region")
    p = perms[0]
    rank = _val(p).dim()
    dims = tuple(d % rank for d in p.args[1])
    upstream, stack = set(), [p.args[0]]
    while stack:
        n = stack.pop()
        if n in region and n not in upstream:
            upstream.add(n)
            stack.extend(n.all_input_nodes)
    for n in upstream:
        if _LOWERINGS.get(n.target) in (_reduction, _softmax, _norm, _batch_norm):
            raise Unfusible(f"{n.name} before the permute is not pointwise")
        if any(u in region and u not in upstream and u is not p for u in n.users):
            raise Unfusible(f"{n.name} is used on both sides of the permute")
    return {n: dims for n in upstream}


def _norm(lw: _Lowering, n: fx.Node):
    """Layer norm and RMS norm over the region's ``k`` trailing dims."""
    b, S = lw.b, lw.S
    x_node = n.args[0]
    size = math.prod(S[len(S) - lw.k:])
    x = lw.operand(x_node, S)
    if n.target is aten.layer_norm.default:
        weight = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        bias = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
        eps = n.args[4] if len(n.args) > 4 else n.kwargs.get("eps", 1e-5)
        mean = b.expr(b.reduce(x) / size, "row")
        d = b.expr(x - mean, "full")
        var = b.expr(b.reduce(b.expr(d * d, "full")) / size, "row")
        y = d / sp.sqrt(var + sp.Float(eps))
    else:  # rms_norm
        weight = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        bias = None
        eps = n.args[3] if len(n.args) > 3 else n.kwargs.get("eps")
        if eps is None:
            eps = torch.finfo(_val(x_node).dtype).eps
        ms = b.expr(b.reduce(b.expr(x * x, "full")) / size, "row")
        y = x / sp.sqrt(ms + sp.Float(eps))
    if weight is not None:
        y = y * lw.operand(weight, S)
    if bias is not None:
        y = y + lw.operand(bias, S)
    return b.expr(y, "full")


_LOWERINGS = {aten.permute.default: _permute, **dict.fromkeys(VIEWS, _view),
              **dict.fromkeys(REDUCTIONS, _reduction), **dict.fromkeys(SOFTMAX, _softmax),
              **dict.fromkeys(NORMS, _norm), aten.batch_norm.default: _batch_norm}
