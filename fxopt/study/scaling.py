"""``fxopt.scaling``: the cost of a training step as exact formulas in batch, height, width, ...

How: the model is analyzed (``fxopt.analyze``, concrete sizes) at a few sizes on a lattice
``base + step * j`` per dimension, and the polynomial through those points is solved for exactly
(rational arithmetic), per ATen call. FLOPs, bytes and saved activations of every call are
polynomials in the input dims on such a lattice (a stride-s layer maps ``H`` to ``H / s``; attention
over ``h * w`` tokens gives ``h**2 * w**2``), so the fit is exact, not a regression:

1. the degree in each dimension is found from finite differences (the (D+1)-th differences of
   every call's numbers vanish) along that axis;
2. the coefficients come from the tensor-product grid of ``D + 1`` sizes per dimension;
3. the fit is checked at one more size off the grid; if any number differs, AnalysisError.

Why fit rather than export with symbolic height/width (``torch.export.Dim``): the fit needs
nothing but the concrete analysis, so it works for every model that analysis handles. Symbolic
spatial dims break on ordinary models: export specializes or refuses dims that Python code
reshapes (``view(B, N, C, h * w)``), a model with a learned position table (ViT) pins the
size, and conv/pool output sizes become ``floor((H + 2p - k) / s) + 1`` expressions instead of
polynomials. The price is a handful of analyses, each on fake tensors: 12 for a conv net in
batch/height/width (degree 1 each), 22 when attention makes height and width degree 2.

The time of a step is not a polynomial: each kernel takes ``max(compute, memory) + launch``.
``time_s`` is that exact sum of ``Max`` terms; ``time_s_regime`` is the polynomial you get when
every kernel keeps the bound it has at the example sizes (what to read; exact near them).
"""
from __future__ import annotations

import itertools
import json
import math
import warnings
from dataclasses import dataclass, field
from fractions import Fraction

import sympy
import torch
from tabulate import tabulate
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..analyze import UnknownOpWarning, analyze
from ..capture import Captured, normalize_inputs
from ..cost_models.ops import MATRIX_CLASSES
from ..cost_models.roofline import peak_for
from ..errors import AnalysisError, FxoptError, InputError
from ..report import GraphReport, row_time, time_factor
from ..cost_models.hardware import DEFAULT_PRESET

__all__ = ["scaling", "ScalingReport", "BlockScaling", "DIMS"]

#: Named dimensions: name -> (axes of each tensor input, smallest rank of a tensor it applies to,
#: default lattice step; None: the example size, since strided convs need sizes they divide).
DIMS = {"batch": ((0,), 1, 1), "height": ((-2,), 4, None), "width": ((-1,), 4, None), "seq": ((1,), 2, 1),
        "tokens": ((1,), 2, 1), "depth": ((-3,), 5, None), "time": ((-3,), 5, None),
        "side": ((-2, -1), 4, None)}
MAX_DEGREE = 6


@dataclass(frozen=True)
class _Dim:
    name: str
    axes: tuple[int, ...]
    min_rank: int
    default_step: int | None = None
    base: int = 0
    step: int = 0

    def size(self, j: int) -> int:
        return self.base + self.step * j


def _with_context(exc: FxoptError, message: str) -> FxoptError:
    """The same error type with a message that says where it happened."""
    try:
        return type(exc)(message)
    except TypeError:
        return AnalysisError(message)


def _parse_dims(dims) -> list[_Dim]:
    """Names from DIMS, ``(name, axis)`` or ``(name, (axis, ...))`` pairs, or a dict name -> axis/axes."""
    items = list(dims.items()) if isinstance(dims, dict) else list(dims)
    out = []
    for item in items:
        if isinstance(item, str):
            if item not in DIMS:
                raise InputError(f"unknown dimension {item!r}; known: {sorted(DIMS)}, or pass (name, axis) "
                                 f"pairs such as ('cams', 1)")
            out.append(_Dim(item, *DIMS[item]))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], (int, tuple, list)):
            name, axes = item[0], tuple(item[1]) if isinstance(item[1], (tuple, list)) else (item[1],)
            if not axes or not all(isinstance(a, int) for a in axes):
                raise InputError(f"dimension {name!r}: axes must be ints, got {item[1]!r}")
            out.append(_Dim(str(name), axes, max(a + 1 if a >= 0 else -a for a in axes), None))
        else:
            raise InputError(f"dims entries are names {sorted(DIMS)} or (name, axis) pairs; got {item!r}")
    if not out or len({d.name for d in out}) != len(out):
        raise InputError(f"dims must name at least one dimension, each once; got {dims!r}")
    return out


def _bind_dims(dims: list[_Dim], args: tuple, kwargs: dict, step) -> list[_Dim]:
    """Read each dim's base size from the example inputs (every tensor it applies to must agree)."""
    leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    step = dict(step or {})
    unknown = set(step) - {d.name for d in dims}
    if unknown:
        raise InputError(f"step names {sorted(unknown)}, which are not in dims {[d.name for d in dims]}")
    out = []
    for d in dims:
        sizes = {t.shape[a] for t in leaves if t.dim() >= d.min_rank for a in d.axes}
        if len(sizes) != 1:
            shapes = [tuple(t.shape) for t in leaves]
            why = "no input tensor has it" if not sizes else f"inputs disagree on its size ({sorted(sizes)})"
            raise InputError(f"dimension {d.name!r} (axes {list(d.axes)} of inputs with rank >= {d.min_rank}): {why}; "
                             f"input shapes {shapes}. Pass dims that exist, e.g. dims=('batch', 'seq') for "
                             f"token inputs, or (name, axis) pairs")
        base = int(next(iter(sizes)))
        s = int(step.get(d.name, d.default_step or base))
        if base < 1 or s < 1:
            raise InputError(f"dimension {d.name!r}: base size {base} and step {s} must be >= 1")
        out.append(_Dim(d.name, d.axes, d.min_rank, d.default_step, base, s))
    return out


def _resize(args: tuple, kwargs: dict, dims: list[_Dim], sizes: tuple[int, ...]):
    """New example inputs with each dim at ``sizes``; ``torch.empty``: no values are ever read."""
    def one(t):
        if not isinstance(t, torch.Tensor):
            return t
        shape = list(t.shape)
        for d, s in zip(dims, sizes):
            if t.dim() >= d.min_rank:
                for a in d.axes:
                    shape[a] = s
        return torch.empty(shape, dtype=t.dtype, device=t.device)
    return tree_map(one, args), tree_map(one, kwargs)


# ---------------------------------------------------------------------------------------------
# one analysis = one vector of integers (per call: FLOPs, bytes read, bytes written; per node: saved)


@dataclass
class _Sample:
    keys: tuple
    saved_keys: tuple
    values: list[int]
    report: GraphReport


def _sample(report: GraphReport) -> _Sample:
    keys = tuple((c.node, c.phase, c.op, c.op_class, c.kernels, c.dtype) for c in report.calls)
    saved_keys = tuple(sorted(report.saved_bytes))
    vals = [int(v) for c in report.calls for v in (c.flops, c.bytes_read, c.bytes_written)]
    vals += [int(report.saved_bytes[k]) for k in saved_keys]
    return _Sample(keys, saved_keys, vals, report)


def _degree(seq: list[list[int]]) -> int | None:
    """Smallest D with vanishing (D+1)-th differences over ``seq`` (None: more points needed)."""
    diffs = list(seq)
    for d in range(len(seq) - 1):
        diffs = [[y - x for x, y in zip(a, b)] for a, b in zip(diffs, diffs[1:])]
        if not any(any(v) for v in diffs):
            return d
    return None


def _combine(weights: list[int], vectors: list[list[int]]) -> list[int]:
    """sum_k weights[k] * vectors[k], elementwise (exact integers)."""
    acc = [0] * len(vectors[0])
    for w, vec in zip(weights, vectors):
        if w:
            acc = [a + w * v for a, v in zip(acc, vec)]
    return acc


def _vandermonde_inverse(xs: list[int]) -> list[list[Fraction]]:
    m = sympy.Matrix([[sympy.Integer(x) ** e for e in range(len(xs))] for x in xs]).inv()
    return [[Fraction(int(v.p), int(v.q)) for v in m.row(i)] for i in range(m.rows)]


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class BlockScaling:
    """One block's formulas and the term that dominates its FLOPs."""

    block: str
    flops: sympy.Expr
    bytes: sympy.Expr
    activation_bytes: sympy.Expr
    time_s_regime: sympy.Expr
    dominant: sympy.Expr        # the FLOP term largest at the example sizes
    dominant_share: float       # its share of the block's FLOPs there
    leading: sympy.Expr         # the FLOP term of highest degree: what wins as sizes grow

    def to_dict(self) -> dict:
        return {"block": self.block, "flops": str(self.flops), "bytes": str(self.bytes),
                "activation_bytes": str(self.activation_bytes), "time_s_regime": str(self.time_s_regime),
                "dominant": str(self.dominant), "dominant_share": self.dominant_share,
                "leading": str(self.leading)}


@dataclass
class ScalingReport:
    """Formulas for one training step in the symbols of ``dims``; see the module docstring.

    ``flops``, ``matrix_flops``, ``bytes``, ``activation_bytes`` are exact polynomials (valid on the
    lattice ``base + step * j``, ``j >= 0``, of each dim, checked at an extra size); ``time_s`` is exact (a sum of
    ``Max`` terms); ``time_s_regime`` is its polynomial at the example sizes' bounds.
    """

    model: str
    hardware: str
    symbols: dict                     # name -> sympy.Symbol
    base: dict                        # name -> example size
    step: dict                        # name -> lattice step
    degrees: dict                     # name -> polynomial degree
    flops: sympy.Expr
    matrix_flops: sympy.Expr
    bytes: sympy.Expr
    activation_bytes: sympy.Expr
    kernels: int
    time_s_regime: sympy.Expr
    blocks: list[BlockScaling]
    samples: list[dict]               # sizes analyzed for the fit
    checked_at: dict                  # the extra size the fit was verified at
    report: GraphReport = field(repr=False)   # the analysis at the example sizes
    _fit: object = field(default=None, repr=False)

    @property
    def time_s(self) -> sympy.Expr:
        """The exact predicted step time: sum over kernels of max(compute, memory) + launch."""
        return self._fit.time_expr()

    def at(self, **sizes: int) -> dict:
        """Concrete totals (FLOPs, bytes, ..., ``step_time_s``) at the given sizes (others: example)."""
        unknown = set(sizes) - set(self.symbols)
        if unknown:
            raise InputError(f"no dimension(s) {sorted(unknown)}; this report has {sorted(self.symbols)}")
        x = tuple(int(sizes.get(n, self.base[n])) for n in self.symbols)
        off = [f"{n}={v}" for n, v in zip(self.symbols, x) if v < self.base[n] or (v - self.base[n]) % self.step[n]]
        if off:
            raise InputError(f"{', '.join(off)}: the formulas are exact on the lattice {self._fit.lattice()} only "
                             f"(a model may run other ops below its example sizes, e.g. batch 1); pick sizes "
                             f"on it, or rerun scaling() with smaller example sizes or a finer step")
        return self._fit.totals_at(x)

    # ---- rendering ----------------------------------------------------------------------
    def summary(self) -> str:
        dims = ", ".join(f"{n} (example {self.base[n]}, step {self.step[n]}, degree {self.degrees[n]})"
                         for n in self.symbols)
        t = self.at()
        return "\n".join([
            f"{self.model}: {'training-step' if self.report.training else 'forward'} cost in {dims} on "
            f"{self.hardware}",
            f"  FLOPs              {self.flops}",
            f"  matrix FLOPs       {self.matrix_flops}",
            f"  bytes moved        {self.bytes}",
            f"  activations saved  {self.activation_bytes}",
            f"  kernels            {self.kernels}",
            f"  step time (s)      ~ {_short(self.time_s_regime)}",
            f"                     (each kernel at its bound at the example sizes; exact: .time_s, .at(...))",
            f"  at the example     {t['step_time_s'] * 1e3:.4g} ms, {t['flops'] / 1e9:.4g} GFLOP",
            f"  fitted on {len(self.samples)} analyses, checked exactly at "
            + ", ".join(f"{k}={v}" for k, v in self.checked_at.items()),
        ])

    def table(self, top: int = 20, tablefmt: str = "simple") -> str:
        rows = [[b.block, _short(b.flops), _short(b.dominant), f"{b.dominant_share * 100:.1f}", _short(b.leading)]
                for b in self.blocks[:top]]
        return tabulate(rows, headers=["block", "FLOPs", "dominant term", "share %", "leading term"],
                        tablefmt=tablefmt, disable_numparse=True)

    def to_dict(self) -> dict:
        return {"schema": "fxopt.scaling/1", "model": self.model, "hardware": self.hardware,
                "symbols": list(self.symbols), "base": self.base, "step": self.step, "degrees": self.degrees,
                "flops": str(self.flops), "matrix_flops": str(self.matrix_flops), "bytes": str(self.bytes),
                "activation_bytes": str(self.activation_bytes), "kernels": self.kernels,
                "time_s_regime": str(self.time_s_regime), "blocks": [b.to_dict() for b in self.blocks],
                "samples": self.samples, "checked_at": self.checked_at}

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __repr__(self) -> str:
        return f"<ScalingReport {self.model}>\n{self.summary()}"


def _short(expr) -> str:
    """Floats to 4 significant digits (time formulas); exact rationals stay exact."""
    if isinstance(expr, sympy.Basic) and expr.has(sympy.Float):
        return str(expr.evalf(4))
    return str(expr)


# ---------------------------------------------------------------------------------------------
# the fit


class _Fit:
    """Per-call polynomial coefficients: ``num[m][q] / den`` for monomial m and quantity q."""

    def __init__(self, dims: list[_Dim], degrees: list[int], num: list[list[int]], den: int, base: _Sample):
        self.dims, self.degrees, self.num, self.den, self.base = dims, degrees, num, den, base
        self.exps = list(itertools.product(*(range(d + 1) for d in degrees)))
        self.syms = [sympy.Symbol(d.name, positive=True, integer=True) for d in dims]
        self.monos = [sympy.Mul(*(s ** e for s, e in zip(self.syms, exp))) for exp in self.exps]
        report = base.report
        self.calls = report.calls
        self.ncalls = len(report.calls)
        self.hw, self.precision = report.hardware, report.precision
        self._time = None

    # column indices
    def flops_cols(self, pred=lambda c: True):
        return [3 * i for i, c in enumerate(self.calls) if pred(c)]

    def bytes_cols(self, pred=lambda c: True):
        return [3 * i + k for i, c in enumerate(self.calls) if pred(c) for k in (1, 2)]

    def saved_cols(self, pred=lambda node: True):
        return [3 * self.ncalls + j for j, n in enumerate(self.base.saved_keys) if pred(n)]

    def coeffs(self, cols) -> list[int]:
        return [sum(row[c] for c in cols) for row in self.num]

    def col(self, q: int) -> list[int]:
        return [row[q] for row in self.num]

    def expr(self, coeffs, scale=None) -> sympy.Expr:
        """A polynomial from integer numerators (exact), or from floats when ``scale`` is given."""
        terms = []
        for c, mono in zip(coeffs, self.monos):
            if c:
                coef = sympy.Rational(int(c), self.den) if scale is None else sympy.Float(c * scale, 15)
                terms.append(coef * mono)
        return sympy.Add(*terms) if terms else sympy.Integer(0)

    def mono_values(self, x: tuple) -> list[int]:
        return [math.prod(v ** e for v, e in zip(x, exp)) for exp in self.exps]

    def values_at(self, x: tuple) -> list[int]:
        """Every fitted quantity at sizes ``x`` (exact; raises if not an integer)."""
        out = []
        for v in _combine(self.mono_values(x), self.num):
            q, r = divmod(v, self.den)
            if r:
                raise AnalysisError(f"the fitted cost is not an integer at {dict(zip(self.names, x))}: those "
                                    f"sizes are off the lattice the formulas hold on ({self.lattice()})")
            out.append(q)
        return out

    @property
    def names(self):
        return [d.name for d in self.dims]

    def lattice(self) -> str:
        return ", ".join(f"{d.name} = {d.base} + {d.step}*j" for d in self.dims) + " (j >= 0)"

    def totals_at(self, x: tuple) -> dict:
        vals = self.values_at(x)
        n = self.ncalls
        flops, br, bw = vals[0:3 * n:3], vals[1:3 * n:3], vals[2:3 * n:3]
        step = sum(row_time(c, self.hw, self.precision, f, r + w).total_s
                   for c, f, r, w in zip(self.calls, flops, br, bw))
        matrix = sum(f for c, f in zip(self.calls, flops) if c.op_class in MATRIX_CLASSES)
        return {"flops": sum(flops), "matrix_flops": matrix, "bytes": sum(br) + sum(bw),
                "activation_bytes": sum(vals[3 * n:]), "kernels": sum(c.kernels for c in self.calls),
                "step_time_s": float(step),
                "mfu": matrix / (step * self.hw.bf16_peak) if step else 0.0}

    def _rates(self, i: int, c) -> tuple[float, float, float]:
        """The call's FLOP/s, bytes/s and fixed latency as the kernel model prices it at the example
        sizes. The kernel model's efficiencies depend on shape (tiles, waves, bandwidth ramp); a
        closed form freezes them at the example, so time formulas equal the report's GPU time there
        and approximate it elsewhere (small examples overprice large sizes: scale from an example near
        the sizes you care about). FLOPs, bytes and memory formulas stay exact."""
        bvals = self.base.values
        f, nbytes = float(bvals[3 * i]), float(bvals[3 * i + 1] + bvals[3 * i + 2])
        t = row_time(c, self.hw, self.precision, f, nbytes)
        peak = f / float(t.compute_s) if f and t.compute_s else \
            peak_for(c.op_class, c.dtype, self.hw, self.precision) / time_factor(c, self.hw)
        bw = nbytes / float(t.memory_s) if nbytes and t.memory_s else self.hw.memory_bandwidth
        return peak, bw, float(t.latency_s)

    def regime_coeffs(self, pred=lambda c: True) -> list[float]:
        """Float coefficients of the step time with each kernel at its bound at the example sizes."""
        out = [0.0] * len(self.exps)
        launch = 0.0
        bvals = self.base.values
        for i, c in enumerate(self.calls):
            if not pred(c):
                continue
            peak, bw, latency = self._rates(i, c)
            f, nbytes = bvals[3 * i], bvals[3 * i + 1] + bvals[3 * i + 2]
            compute, memory = (f / peak if f else 0.0), (nbytes / bw if nbytes else 0.0)
            if compute or memory:
                col, rate = (self.col(3 * i), peak) if compute >= memory else \
                    ([a + b for a, b in zip(self.col(3 * i + 1), self.col(3 * i + 2))], bw)
                out = [o + v / self.den / rate for o, v in zip(out, col)]
            launch += latency
        out[0] += launch
        return out

    def time_expr(self) -> sympy.Expr:
        """Exact time: identical kernels are grouped, so the sum stays readable-sized."""
        if self._time is None:
            groups: dict = {}
            launch = 0.0
            for i, c in enumerate(self.calls):
                peak, bw, latency = self._rates(i, c)
                fl = tuple(self.col(3 * i))
                nb = tuple(a + b for a, b in zip(self.col(3 * i + 1), self.col(3 * i + 2)))
                launch += latency
                if any(fl) or any(nb):
                    key = (fl, nb, peak, bw)
                    groups[key] = groups.get(key, 0) + 1
            terms = []
            for (fl, nb, peak, bw), count in groups.items():
                compute = self.expr(fl) / sympy.Float(peak, 15) if any(fl) else None
                memory = self.expr(nb) / sympy.Float(bw, 15) if any(nb) else None
                t = memory if compute is None else compute if memory is None else \
                    sympy.Max(compute, memory, evaluate=False)
                terms.append(count * t)
            terms.append(sympy.Float(launch, 15))
            self._time = sympy.Add(*terms)
        return self._time


def scaling(model: nn.Module | Captured, example_inputs=None, dims=("batch", "height", "width"), *,
            hardware=DEFAULT_PRESET, training: bool = True, dtype=None, optimizer: str | None = "sgd",
            step: dict | None = None, depth: int = 1) -> ScalingReport:
    """Formulas (sympy) for FLOPs, bytes, activation memory and step time in ``dims``.

    ``dims``: names from :data:`DIMS` (``batch`` = axis 0 of every input tensor, ``height``/``width``
    = axes -2/-1 of inputs of rank >= 4, ``side`` = both for square images, ``seq`` = axis 1, ...) or
    ``(name, axis)`` / ``(name, (axis, ...))`` pairs (every tensor input of sufficient rank).
    ``step``: the lattice step per dim; the formulas are exact on ``example + step * j``, ``j >= 0``. Default:
    1 for batch and sequence dims, the example size for spatial dims (sizes ``k * example``, which
    every stride of the model divides); e.g. ``step={"height": 32, "width": 32}`` for a network of
    total stride 32. ``depth``: module-path depth of the per-block formulas.
    """
    if isinstance(model, Captured):
        raise InputError("scaling() re-captures the model at several sizes: pass the nn.Module, not a Captured")
    if not isinstance(model, nn.Module):
        raise InputError(f"scaling() needs an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise InputError("scaling(model) needs example_inputs (a tensor, tuple or dict of kwargs)")
    args, kwargs = normalize_inputs(example_inputs)
    dims = _bind_dims(_parse_dims(dims), args, kwargs, step)
    cache: dict[tuple, _Sample] = {}
    unknown: set = set()

    def at(js: tuple) -> _Sample:
        if js not in cache:
            sizes = tuple(d.size(j) for d, j in zip(dims, js))
            a, k = _resize(args, kwargs, dims, sizes)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UnknownOpWarning)
                try:
                    report = analyze(model, k or a, hardware=hardware, training=training, dtype=dtype,
                                     optimizer=optimizer)
                except FxoptError as exc:
                    where = ", ".join(f"{d.name}={s}" for d, s in zip(dims, sizes))
                    raise _with_context(exc, f"scaling() analyzes the model at other sizes; at {where}: {exc}") from exc
            unknown.update(str(w.message) for w in caught if issubclass(w.category, UnknownOpWarning))
            s = _sample(report)
            if cache and s.keys != next(iter(cache.values())).keys:
                raise AnalysisError(
                    f"{type(model).__name__} runs different ATen calls at {dict(zip([d.name for d in dims], sizes))} "
                    f"than at the example sizes (the graph depends on the size), so its cost has no single "
                    f"formula; use fxopt.sweep over those sizes instead")
            cache[js] = s
        return cache[js]

    origin = (0,) * len(dims)
    at(origin)
    # 1. degree per dim, along its axis
    degrees = []
    for i, d in enumerate(dims):
        seq = [at(origin).values]
        deg = None
        while deg is None:
            if len(seq) > MAX_DEGREE + 1:
                raise AnalysisError(f"the cost of {type(model).__name__} is not a polynomial of degree <= "
                                    f"{MAX_DEGREE} in {d.name} on the lattice {d.base} + {d.step}*j: the "
                                    f"sizes may not divide the model's strides; pass step={{{d.name!r}: S}}")
            js = tuple(len(seq) if k == i else 0 for k in range(len(dims)))
            seq.append(at(js).values)
            deg = _degree(seq)
        degrees.append(deg)
    # 2. exact solve on the tensor-product grid (inverse = Kronecker product of 1-D Vandermonde inverses)
    inv1d = [_vandermonde_inverse([d.size(j) for j in range(deg + 1)]) for d, deg in zip(dims, degrees)]
    grid = list(itertools.product(*(range(deg + 1) for deg in degrees)))
    inv = [[math.prod((inv1d[k][e[k]][g[k]] for k in range(len(dims))), start=Fraction(1)) for g in grid]
           for e in grid]   # rows: monomial exponents e, columns: grid points g (same ordering)
    den = math.lcm(*(v.denominator for row in inv for v in row))
    inv_int = [[v.numerator * (den // v.denominator) for v in row] for row in inv]
    values = [at(g).values for g in grid]
    num = [_combine(row, values) for row in inv_int]
    fit = _Fit(dims, degrees, num, den, at(origin))
    # 3. check at one more size, off the grid in every dim
    check = tuple(deg + (1 if len(dims) > 1 else 2) for deg in degrees)
    got = at(check).values
    want = fit.values_at(tuple(d.size(j) for d, j in zip(dims, check)))
    if got != want:
        bad = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        raise AnalysisError(f"the polynomial fit of {type(model).__name__} does not hold at "
                            f"{dict(zip(fit.names, (d.size(j) for d, j in zip(dims, check))))} "
                            f"(quantity #{bad}: {got[bad]} vs fitted {want[bad]}); the cost is not a polynomial on "
                            f"the lattice {fit.lattice()}: choose a step that divides the model's strides")
    if unknown:
        warnings.warn(next(iter(unknown)), UnknownOpWarning, stacklevel=2)
    return _build_report(model, fit, cache, check, depth)


def _build_report(model, fit: _Fit, cache: dict, check: tuple, depth: int) -> ScalingReport:
    base = fit.base.report
    syms = dict(zip(fit.names, fit.syms))
    at_base = tuple(d.base for d in fit.dims)
    mono_base = fit.mono_values(at_base)
    nodes = base.nodes
    blocks = {}
    for c in fit.calls:
        blocks.setdefault(nodes[c.node].block(depth), None)
    for n in fit.base.saved_keys:
        blocks.setdefault(nodes[n].block(depth), None)
    out = []
    for b in blocks:
        in_block = lambda c, b=b: nodes[c.node].block(depth) == b
        fc = fit.coeffs(fit.flops_cols(in_block))
        bc = fit.coeffs(fit.bytes_cols(in_block))
        sc = fit.coeffs(fit.saved_cols(lambda n, b=b: nodes[n].block(depth) == b))
        tc = fit.regime_coeffs(in_block)
        term_vals = [Fraction(c * m, fit.den) for c, m in zip(fc, mono_base)]
        total = sum(term_vals, Fraction(0))
        nz = [i for i, c in enumerate(fc) if c]
        if nz:
            dom = max(nz, key=lambda i: term_vals[i])
            lead = max(nz, key=lambda i: (sum(fit.exps[i]), term_vals[i]))
            dominant = sympy.Rational(fc[dom], fit.den) * fit.monos[dom]
            leading = sympy.Rational(fc[lead], fit.den) * fit.monos[lead]
            share = float(term_vals[dom] / total) if total else 0.0
        else:
            dominant = leading = sympy.Integer(0)
            share = 0.0
        out.append((sum(t * m for t, m in zip(tc, mono_base)),
                    BlockScaling(b, fit.expr(fc), fit.expr(bc), fit.expr(sc), fit.expr(tc, 1.0), dominant, share,
                                 leading)))
    out.sort(key=lambda r: -r[0])
    samples = [dict(zip(fit.names, (d.size(j) for d, j in zip(fit.dims, js)))) for js in cache]
    return ScalingReport(
        model=type(model).__name__, hardware=base.hardware.name, symbols=syms,
        base={d.name: d.base for d in fit.dims}, step={d.name: d.step for d in fit.dims},
        degrees=dict(zip(fit.names, fit.degrees)),
        flops=fit.expr(fit.coeffs(fit.flops_cols())),
        matrix_flops=fit.expr(fit.coeffs(fit.flops_cols(lambda c: c.op_class in MATRIX_CLASSES))),
        bytes=fit.expr(fit.coeffs(fit.bytes_cols())), activation_bytes=fit.expr(fit.coeffs(fit.saved_cols())),
        kernels=sum(c.kernels for c in fit.calls), time_s_regime=fit.expr(fit.regime_coeffs(), 1.0),
        blocks=[b for _, b in out], samples=samples,
        checked_at=dict(zip(fit.names, (d.size(j) for d, j in zip(fit.dims, check)))), report=base, _fit=fit)
