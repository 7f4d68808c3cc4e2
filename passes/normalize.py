"""``normalize``: rewrite equivalent spellings into one canonical form, drop no-op ops.

Later passes match one form only, because brittle pattern matching is what users of other
graph optimizers report most. The canonical forms:

* scaling by a constant is ``mul(x, c)``: ``div(x, s)`` with a Python number ``s`` becomes
  ``mul(x, 1/s)``. Exact when ``s`` is a power of two (``/ math.sqrt(16)``); otherwise
  ``1/s`` is rounded once, a difference of at most about one ulp per element (option
  ``div_exact_only=true`` keeps those divisions);
* axis swaps are ``permute``: ``transpose(x, a, b)`` and ``t(x)`` become ``permute(x, perm)``;
* no-op ops are removed: ``view``/``reshape`` to the shape they already have, ``clone`` that
  keeps the layout, ``_to_copy``/``to`` to the same dtype, device and layout, and dropout that
  is the identity (``p == 0`` or ``train=False``; ATen returns the input itself then, no random
  numbers are drawn).

A removal forwards the node's users to its input; it is refused when either storage is written
in place anywhere (a ``clone`` before ``add_`` must stay) or a graph output would start to alias
an input, a parameter or another output. Each rule is a small function in :data:`RULES`.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from fxopt.cost_models.names import dtype_name

from .base import Option, Pass, PassContext, PassResult, register
from .rewrite import Call, GraphFacts, Rewrite, Rule, _known, apply_rules, rule_statistics, same_layout, val

__all__ = ["Normalize", "RULES"]

aten = torch.ops.aten


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _div_by_constant(node: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    x, s = node.args
    xv = val(x)
    if not (_number(s) and s != 0 and math.isfinite(s) and isinstance(xv, torch.Tensor)
            and xv.is_floating_point()):
        return None
    m, _ = math.frexp(abs(s))
    exact = m == 0.5  # |s| is a power of two: 1/s is exact and x * (1/s) == x / s bit for bit
    if not exact and ctx.options.get("div_exact_only", False):
        return None
    note = "exact (power of two)" if exact else "1/s rounded once (<= ~1 ulp)"
    return Rewrite(Call(aten.mul.Tensor, (x, 1.0 / s)), f"div by {s!r} -> mul by {1.0 / s!r}, {note}")


def _perm_of_transpose(node: fx.Node) -> list[int] | None:
    xv = val(node.args[0])
    if not isinstance(xv, torch.Tensor):
        return None
    n = xv.dim()
    if node.target is aten.t.default:
        if n < 2:
            return None  # t() of a 0-D/1-D tensor is the identity: leave it to other rules
        a, b = 0, 1
    else:
        a, b = node.args[1], node.args[2]
        if not (isinstance(a, int) and isinstance(b, int)) or not (-n <= a < max(n, 1) and -n <= b < max(n, 1)):
            return None
        a, b = a % max(n, 1), b % max(n, 1)
    perm = list(range(n))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _transpose_to_permute(node: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | None:
    perm = _perm_of_transpose(node)
    if perm is None or (node.kwargs and node.target is not aten.t.default):
        return None
    return Rewrite(Call(aten.permute.default, (node.args[0], perm)), f"{node.target} -> permute {perm}")


def _noop_view(node: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | None:
    x = node.args[0]
    xv, yv = val(x), val(node)
    if not (isinstance(x, fx.Node) and isinstance(xv, torch.Tensor) and isinstance(yv, torch.Tensor)):
        return None
    if xv.dim() != yv.dim() or not all(_known(a == b) for a, b in zip(xv.shape, yv.shape)):
        return None
    if not same_layout(xv, yv) or not facts.can_forward(node, x):
        return None
    return Rewrite(x, f"{node.target} to the shape it already has {list(xv.shape)}")


def _noop_copy(node: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | None:
    """clone / _to_copy / to.* whose result has the input's dtype, device, layout and strides."""
    x = node.args[0]
    if not isinstance(x, fx.Node):
        return None
    xv, yv = val(x), val(node)
    if not same_layout(xv, yv):
        return None
    if xv.requires_grad != yv.requires_grad:
        return None  # .to(...) or clone that detaches/attaches autograd is not a no-op
    if not facts.can_forward(node, x):
        return None
    what = "clone keeps the layout" if node.target is aten.clone.default else \
        f"same dtype {dtype_name(xv.dtype)}, device and layout"
    return Rewrite(x, f"{node.target}: {what}")


def _identity_dropout(node: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | None:
    x = node.args[0]
    p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    if not isinstance(x, fx.Node) or not (_number(p) and isinstance(train, bool)):
        return None
    if not (p == 0 or train is False):
        return None
    if not facts.can_forward(node, x):
        return None
    why = "p=0" if p == 0 else "train=False"
    return Rewrite(x, f"{node.target} is the identity ({why})")


RULES: list[Rule] = [
    Rule("div-to-mul", (aten.div.Tensor, aten.div.Scalar), _div_by_constant,
         "div(x, s) -> mul(x, 1/s) for a Python number s"),
    Rule("transpose-to-permute", (aten.transpose.int, aten.t.default), _transpose_to_permute,
         "transpose(x, a, b) / t(x) -> permute(x, perm)"),
    Rule("noop-view", (aten.view.default, aten.reshape.default, aten._unsafe_view.default),
         _noop_view, "view/reshape to the same shape -> its input"),
    Rule("noop-copy", (aten.clone.default, aten._to_copy.default, aten.to.dtype, aten.to.device,
                       aten.to.dtype_layout, aten.to.other),
         _noop_copy, "clone/_to_copy/to with no effect on dtype, device, layout or strides -> its input"),
    Rule("identity-dropout", (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                              aten.feature_alpha_dropout.default),
         _identity_dropout, "dropout with p=0 or train=False -> its input"),
]


@register
class Normalize(Pass):
    name = "normalize"
    summary = "canonical forms (div->mul, transpose->permute) and removal of no-op view/clone/to/dropout"
    options = {
        "div_exact_only": Option(bool, False, "div(x, s) -> mul(x, 1/s) only where 1/s is exact (s a power of two)"),
        "rules": Option(list, "all", "the rules to apply: all, or rule names (normalize{rules=identity-dropout;})",
                        choices=("all",) + tuple(r.name for r in RULES)),
    }
    statistics = rule_statistics(RULES)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = apply_rules(gm, ctx, select_rules(ctx.options.get("rules", "all")))
        return PassResult(gm, sum(stats.values()) > 0, dict(stats))


def select_rules(selection) -> list[Rule]:
    """The rules named by the ``rules`` option ("all", one name, or a list of names)."""
    if selection == "all":
        return list(RULES)
    names = [selection] if isinstance(selection, str) else list(selection)
    known = {r.name: r for r in RULES}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown normalize rule(s) {unknown}; rules: {', '.join(known)}")
    return [r for r in RULES if r.name in names]
