"""What each fusible ATen op computes on one element, as a sympy expression.

The fused kernels and their backward are built from these expressions: forward code is printed
from them, and the backward is their symbolic derivative (``sympy.diff``), so no op needs a
hand-written gradient. Non-smooth ops are sympy functions whose ``fdiff`` states the
subgradient torch uses (ReLU's is 0 at 0, ``maximum`` splits the gradient on ties).
Ops whose derivative is cheapest from their result (ReLU, sigmoid, tanh, exp) state it in terms
of the result, so the backward can read the saved output instead of recomputing the input.

Two printers turn an expression into code: Triton (``tl.*``) for the kernels and torch for the
reference path (the same program run with ATen ops, used where Triton cannot run and in tests).
"""
from __future__ import annotations

import math

import sympy as sp
from sympy.printing.str import StrPrinter

__all__ = ["POINTWISE", "symbol", "print_expr", "flop_count", "Relu", "Step", "Sigmoid", "Tanh", "Where",
           "Gt", "IsEq", "Clamp", "ClampOpen", "InRange", "InOpen", "Abs", "Sign", "Round"]


class _Fn(sp.Function):
    is_real = True


class Step(_Fn):
    """1 where x > 0, else 0 (also at 0, as torch's ReLU backward)."""
    nargs = 1

    def fdiff(self, argindex=1):
        return sp.S.Zero


class Relu(_Fn):
    nargs = 1

    def fdiff(self, argindex=1):
        return Step(self)  # relu(x) > 0 exactly where x > 0: readable from the output


class Sigmoid(_Fn):
    nargs = 1

    def fdiff(self, argindex=1):
        return self * (1 - self)


class Tanh(_Fn):
    nargs = 1

    def fdiff(self, argindex=1):
        return 1 - self ** 2


class Gt(_Fn):
    """1 where a > b, else 0."""
    nargs = 2

    def fdiff(self, argindex=1):
        return sp.S.Zero


class Where(_Fn):
    """``a`` where ``c`` is non-zero, else ``b``."""
    nargs = 3

    def fdiff(self, argindex=1):
        c = self.args[0]
        return (sp.S.Zero, Where(c, 1, 0), Where(c, 0, 1))[argindex - 1]


class IsEq(_Fn):
    """1 where a == b, else 0 (marks the arg-max of a row in the backward of a max)."""
    nargs = 2

    def fdiff(self, argindex=1):
        return sp.S.Zero


class InRange(_Fn):
    """1 where lo <= x <= hi (torch's clamp backward passes the gradient on the bounds)."""
    nargs = 3

    def fdiff(self, argindex=1):
        return sp.S.Zero


class Clamp(_Fn):
    nargs = 3

    def fdiff(self, argindex=1):
        return InRange(*self.args) if argindex == 1 else sp.S.Zero


class InOpen(_Fn):
    """1 where lo < x < hi (hardtanh, relu6, hardsigmoid and hardswish give 0 on their bounds)."""
    nargs = 3

    def fdiff(self, argindex=1):
        return sp.S.Zero


class ClampOpen(_Fn):
    """clamp whose gradient is 0 on the bounds, as torch's hardtanh family."""
    nargs = 3

    def fdiff(self, argindex=1):
        return InOpen(*self.args) if argindex == 1 else sp.S.Zero


class Sign(_Fn):
    nargs = 1

    def fdiff(self, argindex=1):
        return sp.S.Zero


class Abs(_Fn):
    nargs = 1

    def fdiff(self, argindex=1):
        return Sign(self.args[0])


class Round(_Fn):
    """Rounding to a narrower float (a cast inside a region); the gradient passes through, as
    for ``x.to(dtype)``. The second argument names the dtype: 16 for fp16, 8 for bf16."""
    nargs = 2

    def fdiff(self, argindex=1):
        return sp.S.One if argindex == 1 else sp.S.Zero


ROUND_CODES = {"torch.float16": 16, "torch.bfloat16": 8}


def symbol(name: str) -> sp.Symbol:
    return sp.Symbol(name, real=True)


def _num(v):
    if isinstance(v, bool):
        return sp.Integer(int(v))
    if isinstance(v, int):
        return sp.Integer(v)
    if isinstance(v, float):
        return sp.oo if v == math.inf else -sp.oo if v == -math.inf else sp.Float(v)
    return v


def _exponent(e):
    """An integral or half exponent exactly (``x ** 3.0`` is ``x*x*x``: defined for negative x)."""
    if isinstance(e, float) and (2 * e).is_integer():
        return sp.Rational(int(2 * e), 2)
    return _num(e)


def _maximum(a, b):
    return Where(Gt(a, b), a, Where(Gt(b, a), b, (a + b) / 2))


def _gelu(x, approximate="none"):
    if approximate == "tanh":
        return x / 2 * (1 + Tanh(sp.sqrt(2 / sp.pi) * (x + sp.Float(0.044715) * x ** 3)))
    return x / 2 * (1 + sp.erf(x / sp.sqrt(2)))


def _clamp(x, lo=None, hi=None, fn=Clamp):
    return fn(x, -sp.oo if lo is None else _num(lo), sp.oo if hi is None else _num(hi))


def _hard(x, lo, hi):
    return _clamp(x, lo, hi, ClampOpen)


def _cast(x, dtype=None, **kw):
    code = ROUND_CODES.get(str(dtype))
    return x if code is None else Round(x, code)


# ATen overload -> the expression of its result, given its arguments (sympy for tensors)
POINTWISE = {
    "aten.add.Tensor": lambda a, b, alpha=1: a + _num(alpha) * b,
    "aten.add.Scalar": lambda a, b, alpha=1: a + _num(alpha) * _num(b),
    "aten.sub.Tensor": lambda a, b, alpha=1: a - _num(alpha) * b,
    "aten.sub.Scalar": lambda a, b, alpha=1: a - _num(alpha) * _num(b),
    "aten.rsub.Scalar": lambda a, b, alpha=1: _num(b) - _num(alpha) * a,
    "aten.mul.Tensor": lambda a, b: a * b,
    "aten.mul.Scalar": lambda a, b: a * _num(b),
    "aten.div.Tensor": lambda a, b: a / b,
    "aten.div.Scalar": lambda a, b: a / _num(b),
    "aten.neg.default": lambda a: -a,
    "aten.relu.default": lambda a: Relu(a),
    "aten.gelu.default": _gelu,
    "aten.silu.default": lambda a: a * Sigmoid(a),
    "aten.sigmoid.default": lambda a: Sigmoid(a),
    "aten.tanh.default": lambda a: Tanh(a),
    "aten.exp.default": lambda a: sp.exp(a),
    "aten.log.default": lambda a: sp.log(a),
    "aten.sqrt.default": lambda a: sp.sqrt(a),
    "aten.rsqrt.default": lambda a: 1 / sp.sqrt(a),
    "aten.reciprocal.default": lambda a: 1 / a,
    "aten.square.default": lambda a: a ** 2,
    "aten.abs.default": lambda a: Abs(a),
    "aten.erf.default": lambda a: sp.erf(a),
    "aten.pow.Tensor_Scalar": lambda a, e: a ** _exponent(e),
    "aten.maximum.default": _maximum,
    "aten.minimum.default": lambda a, b: -_maximum(-a, -b),
    "aten.clamp.default": _clamp,
    "aten.clamp_min.default": lambda a, lo: _clamp(a, lo, None),
    "aten.clamp_max.default": lambda a, hi: _clamp(a, None, hi),
    "aten.hardtanh.default": lambda a, lo=-1.0, hi=1.0: _hard(a, lo, hi),
    "aten.relu6.default": lambda a: _hard(a, 0.0, 6.0),
    "aten.leaky_relu.default": lambda a, slope=0.01: Where(Gt(a, 0), a, _num(slope) * a),
    "aten.hardswish.default": lambda a: a * _hard(a + 3, 0.0, 6.0) / 6,
    "aten.hardsigmoid.default": lambda a: _hard(a + 3, 0.0, 6.0) / 6,
    "aten.where.self": lambda c, a, b: Where(c, a, b),
    "aten._to_copy.default": _cast,
    "aten.to.dtype": lambda x, dtype, *a, **kw: _cast(x, dtype),
    "aten.type_as.default": lambda x, other: x,   # cast to other's dtype: decided by the output dtype
    "aten.clone.default": lambda x, memory_format=None: x,
    "aten.alias.default": lambda x: x,
    "aten.dropout.default": lambda x, p, train: x,  # eval only: the lowering refuses train=True
}


def flop_count(expr: sp.Expr) -> int:
    """Arithmetic operations per element (sympy's own count; transcendental calls count one)."""
    return int(sp.count_ops(expr, visual=False))


# ---- printing ------------------------------------------------------------------------------

# printer dialect -> function name -> template ({0}, {1}, ... are the printed arguments)
_CALLS = {
    "triton": {
        "exp": "tl.exp({0})", "log": "tl.log({0})", "erf": "tl.erf({0})", "sqrt": "tl.sqrt({0})",
        "rsqrt": "tl.rsqrt({0})", "Sigmoid": "tl.sigmoid({0})",
        "Tanh": "(2.0 * tl.sigmoid(2.0 * ({0})) - 1.0)",
        "Relu": "tl.maximum({0}, 0.0)", "Step": "tl.where(({0}) > 0, 1.0, 0.0)",
        "Gt": "tl.where(({0}) > ({1}), 1.0, 0.0)", "IsEq": "tl.where(({0}) == ({1}), 1.0, 0.0)", "Where": "tl.where(({0}) != 0, {1}, {2})",
        "Clamp": "tl.minimum(tl.maximum({0}, {1}), {2})", "ClampOpen": "tl.minimum(tl.maximum({0}, {1}), {2})",
        "InRange": "tl.where((({0}) >= ({1})) & (({0}) <= ({2})), 1.0, 0.0)",
        "InOpen": "tl.where((({0}) > ({1})) & (({0}) < ({2})), 1.0, 0.0)",
        "Abs": "tl.abs({0})", "Sign": "tl.where(({0}) > 0, 1.0, tl.where(({0}) < 0, -1.0, 0.0))",
        "Round16": "({0}).to(tl.float16).to(CT)", "Round8": "({0}).to(tl.bfloat16).to(CT)",
        "pow": "tl.exp2(({1}) * tl.log2({0}))",
    },
    "torch": {
        "exp": "torch.exp({0})", "log": "torch.log({0})", "erf": "torch.erf({0})", "sqrt": "torch.sqrt({0})",
        "rsqrt": "torch.rsqrt({0})", "Sigmoid": "torch.sigmoid({0})", "Tanh": "torch.tanh({0})",
        "Relu": "torch.clamp_min({0}, 0.0)", "Step": "_where(({0}) > 0, 1.0, 0.0)",
        "Gt": "_where(({0}) > ({1}), 1.0, 0.0)", "IsEq": "_where(({0}) == ({1}), 1.0, 0.0)", "Where": "_where(({0}) != 0, {1}, {2})",
        "Clamp": "torch.clamp({0}, {1}, {2})", "ClampOpen": "torch.clamp({0}, {1}, {2})",
        "InRange": "_where((({0}) >= ({1})) & (({0}) <= ({2})), 1.0, 0.0)",
        "InOpen": "_where((({0}) > ({1})) & (({0}) < ({2})), 1.0, 0.0)",
        "Abs": "torch.abs({0})", "Sign": "torch.sign({0})",
        "Round16": "({0}).to(torch.float16).to(CT)", "Round8": "({0}).to(torch.bfloat16).to(CT)",
        "pow": "torch.pow({0}, {1})",
    },
}


class _Printer(StrPrinter):
    def __init__(self, dialect: str):
        super().__init__()
        self.calls = _CALLS[dialect]

    def _call(self, name: str, *args) -> str:
        return self.calls[name].format(*(self._print(a) for a in args))

    def _print_Symbol(self, e):
        return e.name

    def _print_Float(self, e):
        return repr(float(e))

    def _print_Rational(self, e):
        return repr(float(e))

    _print_Integer = _print_Rational

    def _print_NumberSymbol(self, e):
        return repr(float(e))

    _print_Pi = _print_Exp1 = _print_NumberSymbol

    def _print_Infinity(self, e):
        return "float('inf')"

    def _print_NegativeInfinity(self, e):
        return "float('-inf')"

    def _print_Pow(self, e, rational=False):
        base, ex = e.args
        if ex == sp.S.Half:
            return self._call("sqrt", base)
        if ex == -sp.S.Half:
            return self._call("rsqrt", base)
        if (2 * ex).is_Integer and 1 <= abs(int(2 * ex)) <= 8:   # x**3, x**-2, x**1.5: mul and sqrt
            whole, half = divmod(abs(int(2 * ex)), 2)
            factors = [f"({self._print(base)})"] * whole + ([self._call("sqrt", base)] if half else [])
            prod = " * ".join(factors)
            return f"({prod})" if ex > 0 else f"(1.0 / ({prod}))"
        return self._call("pow", base, ex)

    def _print_exp(self, e):
        return self._call("exp", e.args[0])

    def _print_log(self, e):
        return self._call("log", e.args[0])

    def _print_erf(self, e):
        return self._call("erf", e.args[0])

    def _print_Function(self, e):
        name = type(e).__name__
        if name == "Round":
            return self.calls[f"Round{int(e.args[1])}"].format(self._print(e.args[0]))
        if name not in self.calls:
            raise NotImplementedError(f"no printer for {name}")
        return self._call(name, *e.args)

    def _print_Mul(self, e):
        return f"({super()._print_Mul(e)})"

    def _print_Add(self, e, order=None):
        return f"({super()._print_Add(e)})"


_PRINTERS = {d: _Printer(d) for d in _CALLS}


def _fold(e):
    """Constant subexpressions (``sqrt(2/pi)``) become one float: kernels take no math on scalars."""
    if not e.args or e.is_Number:
        return e
    if not e.free_symbols:
        return sp.Float(e.evalf())
    return e.func(*(_fold(a) for a in e.args))


def print_expr(expr: sp.Expr, dialect: str) -> str:
    """The expression as Triton (``dialect="triton"``) or torch source code."""
    return _PRINTERS[dialect].doprint(_fold(sp.sympify(expr)))
