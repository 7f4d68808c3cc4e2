"""A fused region as a program over one iteration space, and its derived backward.

The iteration space is the region's full shape ``S``; the last ``k`` dims (``k >= 0``) form a row
that the kernel reduces over (``k = 0``: a pointwise region). Every value is either *full*
(one per element of ``S``) or *row* (one per row: constant along the reduced dims). A program is a
list of steps, each one of:

* ``load``: input ``index``, broadcast to ``S`` (or to the rows);
* ``expr``: a sympy expression of earlier values (pointwise; rows broadcast along the row);
* ``reduce``: the sum/max/min of a full value along the row, giving a row value.

The backward is derived from the forward program, not written per op: reverse-mode over the
steps, each ``expr`` step differentiated by sympy (:mod:`.scalar`), sums of full contributions
into row values becoming reductions. Which tensors the forward saves for it is chosen to minimize
the bytes the backward reads (inputs and outputs are the candidates; the rest is recomputed).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field

import sympy as sp

from ..cost_models.names import dtype_name
from .scalar import IsEq, flop_count, symbol

__all__ = ["TensorSpec", "Step", "Program", "derive_backward", "choose_saved", "BackwardPlan"]

_ITEMSIZE = {"torch.float32": 4, "torch.float64": 8, "torch.float16": 2, "torch.bfloat16": 2, "torch.bool": 1}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor crossing the region boundary: its kind, shape (as the program sees it: the
    input's broadcast view, the output's own shape) and dtype."""

    kind: str          # "full" | "row" | "col" (an output summed over the rows: per-program partials)
    shape: tuple
    dtype: str         # "torch.float32", ...
    strides: tuple | None = None   # an output's strides (those of the node it replaces), if fixed
    # the tensor is seen through a permute: ``shape`` is in the region's space, the tensor is
    # ``t.view(own shape).permute(perm)`` (an input) or has its own shape (an output)
    perm: tuple | None = None

    @property
    def own_shape(self) -> tuple:
        """The shape of the tensor itself (before the permute into the region's space)."""
        if not self.perm:
            return tuple(self.shape)
        own = [0] * len(self.shape)
        for d, p in enumerate(self.perm):
            own[p] = self.shape[d]
        return tuple(own)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEMSIZE.get(self.dtype, 4)

    def text(self) -> str:
        st = "" if self.strides is None else f" strides={tuple(self.strides)}"
        pm = "" if self.perm is None else f" perm={tuple(self.perm)}"
        return f"{self.kind} {tuple(self.shape)} {dtype_name(self.dtype)}{st}{pm}"


@dataclass(frozen=True)
class Step:
    name: str
    kind: str                 # "full" | "row"
    op: str                   # "load" | "expr" | "reduce"
    expr: object = None       # expr: the sympy expression
    src: str | None = None    # reduce: the reduced value
    how: str | None = None    # reduce: "sum" | "max" | "min"
    index: int | None = None  # load: the input
    nograd: bool = False      # no gradient flows through this value (softmax's row max)

    def deps(self) -> set[str]:
        """The values this step reads."""
        if self.op == "reduce":
            return {self.src}
        return {x.name for x in self.expr.free_symbols} if self.op == "expr" else set()

    def text(self) -> str:
        if self.op == "load":
            return f"{self.name} = load in{self.index} ({self.kind})"
        if self.op == "reduce":
            return f"{self.name} = {self.how}({self.src}){' nograd' if self.nograd else ''}"
        return f"{self.name} = {self.expr} ({self.kind})"


@dataclass
class Program:
    shape: tuple                 # iteration space S
    k: int                       # trailing dims reduced (0: pointwise)
    inputs: list[TensorSpec]
    steps: list[Step]
    outputs: list[tuple[str, TensorSpec]]   # (value, spec)
    label: str = "fused"         # short human name (op names), for kernel and op names
    order: tuple | None = None   # a fixed iteration order (dims outermost first), else chosen per call
    cols: tuple | None = None    # pointwise program tiled rows x cols: the (innermost) column dims

    @property
    def inner(self) -> tuple:
        """The dims a tile's columns span: the reduced dims, or ``cols``; () for flat blocks."""
        rank = len(self.shape)
        return tuple(range(rank - self.k, rank)) if self.k else tuple(self.cols or ())

    def text(self) -> str:
        lines = [f"program {self.label} S={tuple(self.shape)} k={self.k}"
                 + (f" order={self.order}" if self.order else "") + (f" cols={self.cols}" if self.cols else "")]
        lines += [f"in{i}: {s.text()}" for i, s in enumerate(self.inputs)]
        lines += [s.text() for s in self.steps]
        lines += [f"out{j} = {v}: {s.text()}" for j, (v, s) in enumerate(self.outputs)]
        return "\n".join(lines)

    def key(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()[:12]

    @property
    def name(self) -> str:
        """``<ops>_<key>``: an identifier for the custom op and its kernel."""
        return re.sub(r"[^0-9a-zA-Z_]", "_", self.label)[:40] + "_" + self.key()

    @property
    def rows(self) -> int:
        inner = self.inner
        return math.prod(s for d, s in enumerate(self.shape) if d not in inner) if inner else 1

    @property
    def row_size(self) -> int:
        inner = self.inner
        return math.prod(self.shape[d] for d in inner) if inner else math.prod(self.shape)

    def kinds(self) -> dict:
        return {s.name: s.kind for s in self.steps}

    def flops(self) -> int:
        """Arithmetic per launch: each expression once per element of its kind, each reduction once
        per element reduced."""
        per, live = {"full": math.prod(self.shape), "row": self.rows}, self.live()
        return sum(flop_count(s.expr) * per[s.kind] if s.op == "expr" else
                   per["full"] if s.op == "reduce" else 0 for s in self.steps if s.name in live)

    def live(self) -> set[str]:
        """The values the outputs depend on (the kernel computes only these)."""
        deps = {s.name: s.deps() for s in self.steps}
        live, stack = set(), [v for v, _ in self.outputs]
        while stack:
            v = stack.pop()
            if v not in live:
                live.add(v)
                stack.extend(deps.get(v, ()))
        return live

    def boundary_bytes(self) -> int:
        """Bytes one launch moves: each input it reads once, each output written once."""
        live = self.live()
        read = {s.index for s in self.steps if s.op == "load" and s.name in live}
        return sum(self.inputs[i].nbytes for i in read) + sum(s.nbytes for _, s in self.outputs)


def iteration_order(shape: tuple, k: int, strides) -> tuple:
    """Dims outermost first: the reduced dims last, the others by decreasing ``strides`` (a
    memory layout to follow; ties and size-1 dims keep their order)."""
    rank = len(shape)
    outer = list(range(rank - k))
    if strides is not None:
        outer.sort(key=lambda d: -strides[d])
    return tuple(outer) + tuple(range(rank - k, rank))


def _column_dims(forward: "Program", spec: TensorSpec) -> tuple | None:
    """For a pointwise program walked in a fixed order: the dims a per-channel input spans, when
    they are the innermost ones (then its gradient is summed over rows in the kernel)."""
    S, order = tuple(forward.shape), forward.order
    if forward.k or order is None or spec.kind != "full":
        return None
    walk = [d for d in order if S[d] > 1]
    full = [d for d in walk if spec.shape[d] == S[d]]
    if not full or len(full) == len(walk) or walk[len(walk) - len(full):] != full or full != sorted(full):
        return None
    return tuple(full)


class _Builder:
    """Appends steps with fresh names, tracking each value's kind."""

    def __init__(self, prefix: str, kinds: dict | None = None):
        self.prefix, self.steps, self.kinds, self.n = prefix, [], dict(kinds or {}), 0

    def _name(self) -> str:
        self.n += 1
        return f"{self.prefix}{self.n - 1}"

    def kind_of(self, expr) -> str:
        syms = sp.sympify(expr).free_symbols
        return "full" if any(self.kinds.get(s.name) == "full" for s in syms) else "row"

    def add(self, step: Step) -> sp.Symbol:
        self.steps.append(step)
        self.kinds[step.name] = step.kind
        return symbol(step.name)

    def expr(self, expr, kind: str | None = None) -> sp.Symbol:
        expr = sp.sympify(expr)
        if expr.is_Symbol:
            return expr
        return self.add(Step(self._name(), kind or self.kind_of(expr), "expr", expr=expr))

    def reduce(self, value: sp.Symbol, how: str = "sum", nograd: bool = False) -> sp.Symbol:
        return self.add(Step(self._name(), "row", "reduce", src=value.name, how=how, nograd=nograd))

    def load(self, name: str, index: int, kind: str) -> sp.Symbol:
        return self.add(Step(name, kind, "load", index=index))


# ---- the backward -----------------------------------------------------------------------------

def _needed(forward: Program, exprs: list) -> set[str]:
    fwd_names = {s.name for s in forward.steps}
    return {s.name for e in exprs for s in sp.sympify(e).free_symbols if s.name in fwd_names}


def _uses(steps: list[Step]) -> list:
    """What the steps read, as expressions (for :func:`_needed`)."""
    return [st.expr if st.op == "expr" else symbol(st.src) for st in steps if st.op != "load"]


def _recomputable(forward: Program, available: set[str]) -> list[Step]:
    """The forward steps computable, in order, from the ``available`` values (loads excluded)."""
    have, steps = set(available), []
    for s in forward.steps:
        if s.name not in have and s.op != "load" and s.deps() <= have:
            have.add(s.name)
            steps.append(s)
    return steps


def _computable(forward: Program, available: set[str]) -> set[str]:
    return set(available) | {s.name for s in _recomputable(forward, available)}


def _saved_names(forward: Program, saved: list[tuple[str, int]]) -> set[str]:
    loads = {s.index: s.name for s in forward.steps if s.op == "load"}
    return {loads[i] if where == "in" else forward.outputs[i][0] for where, i in saved}


def _adjoints(forward: Program, needs: tuple[bool, ...], b: _Builder) -> dict[int, sp.Expr]:
    """Reverse-mode over the forward steps; returns input index -> gradient value."""
    adj: dict[str, list] = {}
    for j, (value, spec) in enumerate(forward.outputs):
        adj.setdefault(value, []).append(symbol(f"gy{j}"))
    grads = {}
    for step in reversed(forward.steps):
        contribs = adj.pop(step.name, [])
        if not contribs or step.nograd:
            continue
        a = b.expr(sp.Add(*contribs))
        if step.op == "load":
            if needs[step.index]:
                grads[step.index] = a
            continue
        if step.op == "reduce":
            src = symbol(step.src)
            if step.how == "sum":
                adj.setdefault(step.src, []).append(a)
            else:  # max/min: split among the elements that attain it, as torch does
                hit = b.expr(IsEq(src, symbol(step.name)), "full")
                count = b.reduce(hit)
                adj.setdefault(step.src, []).append(a * hit / count)
            continue
        y = symbol(step.name)
        for s in sorted(step.expr.free_symbols, key=lambda s: s.name):
            d = sp.diff(step.expr, s).xreplace({step.expr: y})
            if d == 0:
                continue
            c = a * d
            # a row operand of a full value gets the sum of the contributions of all the row's
            # elements, even where the contribution itself is constant along the row
            if b.kinds.get(s.name) == "row" and step.kind == "full":
                c = b.reduce(b.expr(c, "full") if not c.is_Symbol else c)
            adj.setdefault(s.name, []).append(c)
    return grads


def choose_saved(forward: Program) -> list[tuple[str, int]]:
    """The inputs/outputs to save for the backward: the set with the fewest bytes from which the
    backward's needs are computable (ties: fewer tensors, outputs before inputs)."""
    needs = tuple(s.dtype != "torch.bool" for s in forward.inputs)
    probe = _Builder("g", forward.kinds() | {f"gy{j}": s.kind for j, (_, s) in enumerate(forward.outputs)})
    grads = _adjoints(forward, needs, probe)
    want = _needed(forward, _uses(probe.steps) + list(grads.values()))
    candidates = [("out", j) for j in range(len(forward.outputs))] + \
                 [("in", i) for i in range(len(forward.inputs))]
    size = {("out", j): s.nbytes for j, (_, s) in enumerate(forward.outputs)}
    size.update({("in", i): s.nbytes for i, s in enumerate(forward.inputs)})
    best = None
    for r in range(len(candidates) + 1):
        if len(candidates) > 14 and r > 3:
            break
        for subset in itertools.combinations(candidates, r):
            if want <= _computable(forward, _saved_names(forward, list(subset))):
                cost = (sum(size[c] for c in subset), r)
                if best is None or cost < best[0]:
                    best = (cost, list(subset))
    return best[1] if best else [("in", i) for i in range(len(forward.inputs))]


def _in_space(forward: Program, spec: TensorSpec) -> TensorSpec:
    """An output read back as an input: a row result without its kept dims is viewed with them."""
    rank = len(forward.shape)
    if spec.perm:   # an output in a permuted space: read back through the same permute
        return TensorSpec(spec.kind, tuple(spec.shape[p] for p in spec.perm), spec.dtype, perm=spec.perm)
    if len(spec.shape) == rank:
        return spec
    return TensorSpec(spec.kind, tuple(forward.shape[:rank - forward.k]) + (1,) * forward.k, spec.dtype)


@dataclass
class BackwardPlan:
    program: Program
    saved: list[tuple[str, int]]             # forward tensors the backward reads, in its input order
    grads_for: list[int] = field(default_factory=list)  # forward inputs that get a gradient
    # per entry of grads_for: ("out", m) the program's output m, or ("grad", j) the gradient of
    # forward output j passed through unchanged (a residual add's backward launches nothing)
    route: list[tuple[str, int]] = field(default_factory=list)


def derive_backward(forward: Program, needs: tuple[bool, ...], saved: list[tuple[str, int]]) -> BackwardPlan:
    """The backward program: inputs are the saved tensors then one gradient per forward output;
    outputs are the gradients of the inputs in ``needs`` (full-shape fp32 for an input that was
    broadcast within the full space: the caller sums it down)."""
    b = _Builder("g", {f"gy{j}": s.kind for j, (_, s) in enumerate(forward.outputs)})
    inputs: list[TensorSpec] = []
    loads = {s.index: s for s in forward.steps if s.op == "load"}
    available = _saved_names(forward, saved)
    for where, i in saved:
        if where == "in":
            inputs.append(forward.inputs[i])
            b.load(loads[i].name, len(inputs) - 1, loads[i].kind)
        else:
            value, spec = forward.outputs[i]
            inputs.append(_in_space(forward, spec))
            b.load(value, len(inputs) - 1, spec.kind)
    for j, (_, spec) in enumerate(forward.outputs):
        inputs.append(_in_space(forward, spec))
        b.load(f"gy{j}", len(inputs) - 1, spec.kind)
    ad = _Builder("g", forward.kinds() | b.kinds)
    ad.n = b.n
    grads = _adjoints(forward, needs, ad)
    want = _needed(forward, _uses(ad.steps) + list(grads.values()))
    # recompute, in forward order, what the backward needs and was not saved
    recompute = _recomputable(forward, available)
    missing = want - available - {s.name for s in recompute}
    if missing:
        raise ValueError(f"saved tensors {saved} do not determine {sorted(missing)}")
    used = _needed(forward, _uses(recompute)) | want
    steps = b.steps + [s for s in recompute if s.name in used] + ad.steps
    outputs, route, seen = [], [], {}
    tile = next((c for i, n in enumerate(needs) if n
                 for c in [_column_dims(forward, forward.inputs[i])] if c), None)
    for i in [i for i, n in enumerate(needs) if n]:
        spec = forward.inputs[i]
        value = grads.get(i)
        if value is None:   # no path from this input to any output
            ad.n += 1
            steps.append(Step(f"g{ad.n}", spec.kind, "expr", expr=sp.S.Zero))
            value = symbol(f"g{ad.n}")
        rank, S = len(forward.shape), tuple(forward.shape)
        whole = S if spec.kind == "full" else S[:rank - forward.k] + (1,) * forward.k
        broadcast = tuple(spec.shape) != whole   # the caller sums this gradient down to the input
        wide = "torch.float32" if broadcast and spec.dtype != "torch.float64" else spec.dtype
        column = forward.k and spec.kind == "full" and spec.shape == (1,) * (rank - forward.k) + S[rank - forward.k:]
        # a per-column input (a norm's weight, a per-channel scale in a channels-last walk): the
        # kernel sums its gradient over the rows it visits and writes one partial row per program;
        # the caller adds the partials
        if column:
            out = TensorSpec("col", S[rank - forward.k:], wide)
        elif tile and _column_dims(forward, spec) == tile:
            out = TensorSpec("col", tuple(S[d] for d in tile), wide)
        else:
            out = TensorSpec(spec.kind, whole, wide)
        if value.name.startswith("gy") and value.name[2:].isdigit():
            route.append(("grad", int(value.name[2:])))
            continue
        if (value.name, out) not in seen:
            seen[(value.name, out)] = len(outputs)
            outputs.append((value.name, out))
        route.append(("out", seen[(value.name, out)]))
    uses_tile = any(s.kind == "col" for _, s in outputs) and not forward.k
    prog = Program(forward.shape, forward.k, inputs, steps, outputs, label=forward.label + "_bwd",
                   order=forward.order, cols=tile if uses_tile else None)
    return BackwardPlan(prog, list(saved), [i for i, n in enumerate(needs) if n], route)
