"""``epilogue``: fuse a bias add or an activation into the GEMM before it, where a library kernel does it.

fxopt's eager backend only uses kernels ATen already has. What ATen offers (torch 2.13, read in
``aten/src/ATen/native/cuda/Blas.cpp`` and ``LinearAlgebra.cpp`` and checked here):

* ``addmm(bias, a, b)`` with a contiguous 1-D bias runs the cuBLASLt bias epilogue on CUDA: one
  kernel, the product never round-trips through memory. ``linear`` with a bias already calls it
  (contiguous input). So fxopt rewrites a GEMM followed by a separate bias add:

  - ``mm(a, b) + bias[N]`` -> ``addmm(bias, a, b)``            (rule ``mm-bias``)
  - ``matmul(x, W) + bias[N]`` with a 2-D ``W`` -> ``linear(x, W^T, bias)``; ``W`` given as a
    transpose/permute of a weight ``[N, K]`` uses that weight directly  (rule ``matmul-bias``)

  Both have derivative formulas, so they apply in training and eval graphs. The sum is the same
  (bias added once, in fp32 accumulation on GPUs); only the rounding order of the last add may
  differ.
  A ``[1, ..., 1, N]`` bias is viewed as ``[N]`` (free).
* Refused, with the reason: an addend that is not a per-column vector (``[M, N]`` residuals,
  ``[M, 1]``): addmm then copies it into the output before a ``beta=1`` GEMM
  (non-Lt path): the same kernels and bytes as mm + add. ``bmm + add`` -> ``baddbmm``: ATen's
  baddbmm meta function copies the addend into the output and runs the batched GEMM with
  ``beta=1``: again the same kernels and bytes, no gain. Batched ``matmul`` (both operands >= 3-D)
  + add likewise (baddbmm is its only bias-taking kernel).
* ``aten._addmm_activation(bias, a, b, use_gelu)`` fuses ReLU or GELU into the cuBLASLt epilogue
  (rule ``gemm-activation``, on ``linear``/``addmm`` with a 1-D bias followed by ``relu``/``gelu``,
  optionally through one view). It has NO derivative formula in torch 2.13: its autograd kernel
  raises "derivative for aten::_addmm_activation is not implemented". So it is used in eval
  graphs only; in training graphs the pass keeps the pair and says why (checked at run time on
  meta tensors, so a torch that adds the formula gets the fusion in training too). An eval graph
  run under autograd (differentiating through an eval-mode model) would fail on backward with
  that error: use ``epilogue{activation=false}`` for such models.
* Which GELU ``use_gelu`` computes depends on the device: on CUDA the tanh approximation (the
  cuBLASLt GELU epilogue, and ``gelu_(.., "tanh")`` on its fallback path); on the CPU the exact erf
  GELU (measured: max difference 0 against ``F.gelu``, 4e-4 against the tanh form). A GELU is
  fused only where it is the same function on the graph's device: ``nn.GELU()`` (exact, the
  default, e.g. ViT's MLP) on CPU graphs only; ``nn.GELU(approximate="tanh")`` on CUDA graphs only;
  neither on meta or other devices. ReLU is the same everywhere. (On the CPU the kernel is addmm
  followed by the in-place activation: the same numbers, no speed-up; the rewrite is there so that
  CPU tests exercise the graph a GPU runs.)
* Not fused, said so: SiLU, sigmoid, tanh, leaky ReLU, hardswish, ELU, Mish after a GEMM (no ATen
  GEMM epilogue computes them), and activations after a conv (``cudnn_convolution_relu`` exists but
  is CUDA-only, has no derivative and no meta kernel; a conv's bias is already one op). GPT-2's
  hand-written tanh GELU (``0.5 * x * (1 + tanh(...))``) is not recognized as a GELU.

Every rewrite reads its operands at the position of the add/activation instead of the GEMM's, so a
match is refused when an operand is written in place anywhere in the graph. The GEMM must have no
other user. Estimated gain: the removed pointwise node's predicted time (the epilogue is free).
"""
from __future__ import annotations

import functools

import torch
from torch import fx

from .base import Option, Pass, PassContext, PassResult, register
from .opgroups import CONVS, RESHAPES, TRANSPOSES
from .rewrite import Call, GraphFacts, Refusal, Rewrite, Rule, _known, apply_rules, rule_statistics, val

__all__ = ["FuseEpilogues", "RULES", "addmm_activation_differentiable", "GELU_OF_ADDMM_ACTIVATION"]

aten = torch.ops.aten

# Which GELU ``_addmm_activation(use_gelu=True)`` computes, by device type (see the docstring).
GELU_OF_ADDMM_ACTIVATION = {"cuda": "tanh", "cpu": "none"}

VIEWS = RESHAPES  # an activation is fused through one reshape-only view
UNFUSABLE = (aten.silu.default, aten.sigmoid.default, aten.tanh.default, aten.leaky_relu.default,
             aten.hardswish.default, aten.elu.default, aten.mish.default)


# ---------------------------------------------------------------------------------------------
# helpers


def _fused(ctx: PassContext, node: fx.Node, build, reason: str, dead) -> Rewrite:
    """The fusion of ``node`` into the GEMM before it; saves ``node``'s time (the epilogue is free)."""
    return Rewrite(build, reason, "fuse", dead=tuple(dead), gain=ctx.node_time(node))


def _shape(node) -> list | None:
    v = val(node)
    return list(v.shape) if isinstance(v, torch.Tensor) else None


def _same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(_known(x == y) for x, y in zip(a, b))


def _gemm_and_addend(add: fx.Node, targets) -> tuple[fx.Node, object] | None:
    """``(gemm, other)`` when ``add`` is ``gemm + other`` or ``other + gemm`` with alpha 1."""
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return None
    a, b = add.args
    for gemm, other in ((a, b), (b, a)):
        if isinstance(gemm, fx.Node) and gemm.op == "call_function" and gemm.target in targets:
            return gemm, other
    return None


def _common_refusal(add: fx.Node, gemm: fx.Node, other, facts: GraphFacts) -> str | None:
    """Why ``gemm + other`` cannot become one GEMM call, or None."""
    if not isinstance(other, fx.Node) or not isinstance(val(other), torch.Tensor):
        return "the addend is not a tensor"
    if len(gemm.users) > 1:
        return f"{gemm.name} is also read by {', '.join(u.name for u in gemm.users if u is not add)}"
    if not _same_shape(_shape(add), _shape(gemm)):
        return f"the add broadcasts the product {_shape(gemm)} up to {_shape(add)}"
    if val(add).dtype != val(gemm).dtype or val(other).dtype != val(gemm).dtype:
        return f"dtypes differ ({val(gemm).dtype} product, {val(other).dtype} addend): the add promotes"
    written = [n.name for n in (*gemm.all_input_nodes, other) if facts.is_written(n)]
    if written:
        return f"{', '.join(written)} written in place in this graph: the fused call would read it later"
    return None


def _per_column(other: fx.Node, n) -> bool:
    shape = _shape(other)
    return shape is not None and len(shape) == 1 and _known(shape[0] == n)


def _row_vector(other: fx.Node, n) -> bool:
    """``[1, ..., 1, N]``: a per-column bias that a free view turns into ``[N]``."""
    shape = _shape(other)
    return shape is not None and len(shape) > 1 and _known(shape[-1] == n) and all(_known(s == 1) for s in shape[:-1])


def _bias_vector(bias: fx.Node, n, emit) -> fx.Node:
    return bias if _per_column(bias, n) else emit(Call(aten.view.default, (bias, [n])))


def _transposed_weight(w: fx.Node) -> fx.Node | None:
    """The ``[N, K]`` tensor of which ``w`` (``[K, N]``) is the transpose, if ``w`` is one."""
    if not (isinstance(w, fx.Node) and w.op == "call_function" and w.target in TRANSPOSES):
        return None
    src = w.args[0]
    if not isinstance(src, fx.Node) or len(_shape(src) or []) != 2:
        return None
    if w.target is aten.permute.default and list(w.args[1]) not in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
        return None
    if w.target is aten.transpose.int and sorted(d % 2 for d in w.args[1:3]) != [0, 1]:
        return None
    return src


# ---------------------------------------------------------------------------------------------
# bias rules (consumer: add.Tensor)


def _bias_add(add: fx.Node, facts: GraphFacts, targets) -> tuple[fx.Node, fx.Node] | Refusal | None:
    """``(gemm, addend)`` of ``gemm + addend`` with a GEMM in ``targets``, or why it cannot fuse."""
    found = _gemm_and_addend(add, targets)
    if found is None:
        return None
    why = _common_refusal(add, *found, facts)
    return Refusal(why) if why else found


def _mm_bias(add: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | Refusal | None:
    found = _bias_add(add, facts, (aten.mm.default,))
    if not isinstance(found, tuple):
        return found
    mm, bias = found
    n = _shape(mm)[1]
    if not (_per_column(bias, n) or _row_vector(bias, n)):
        return Refusal(f"the addend {_shape(bias)} is not a per-column bias [{n}]: addmm would copy it into the "
                       f"output before a beta=1 GEMM (no cuBLASLt bias epilogue), the same kernels and bytes")
    a, b = mm.args
    return _fused(ctx, add, lambda emit: emit(Call(aten.addmm.default, (_bias_vector(bias, n, emit), a, b))),
                  f"mm + bias{_shape(bias)} -> addmm (cuBLASLt bias epilogue; has a derivative)", [mm])


def _matmul_bias(add: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | Refusal | None:
    found = _bias_add(add, facts, (aten.matmul.default,))
    if not isinstance(found, tuple):
        return found
    mm, bias = found
    x, w = mm.args
    xs, ws = _shape(x), _shape(w)
    if ws is None or xs is None:
        return None
    if len(ws) > 2:
        return Refusal(f"batched matmul {xs} @ {ws}: its only bias-taking kernel, baddbmm (3-D), copies the addend "
                       f"into the output before a beta=1 GEMM, the same kernels and bytes")
    if len(ws) != 2:
        return Refusal(f"matrix-vector product {xs} @ {ws}: no bias epilogue")
    n = ws[1]
    if not (_per_column(bias, n) or _row_vector(bias, n)):
        return Refusal(f"the addend {_shape(bias)} is not a per-column bias [{n}]: no bias epilogue takes it")
    src = _transposed_weight(w)

    def build(emit):
        weight = src if src is not None else emit(Call(aten.permute.default, (w, [1, 0])))
        return emit(Call(aten.linear.default, (x, weight, _bias_vector(bias, n, emit))))
    how = f"the weight {src.name} directly" if src is not None else "a permuted view of the weight"
    return _fused(ctx, add, build, f"matmul(x, W[K, {n}]) + bias{_shape(bias)} -> linear(x, W^T, bias) with {how} "
                                   f"(addmm with the cuBLASLt bias epilogue; has a derivative)",
                  [mm] + ([w] if src is not None else []))  # the transpose goes too when nothing else reads it


def _bmm_bias(add: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | Refusal | None:
    found = _gemm_and_addend(add, (aten.bmm.default, aten.baddbmm.default))
    if found is None or not isinstance(found[1], fx.Node):
        return None
    return Refusal("bmm + add stays: baddbmm copies the addend into the output and runs the batched GEMM with "
                   "beta=1 (ATen's baddbmm meta function), the same kernels and bytes as bmm + add")


# ---------------------------------------------------------------------------------------------
# activation rule (consumer: relu / gelu / unfusable activations)


@functools.lru_cache(maxsize=None)
def addmm_activation_differentiable() -> bool:
    """Does ``aten._addmm_activation`` have a derivative in this torch? (a backward on meta tensors)"""
    try:
        x = torch.empty(2, 3, device="meta", requires_grad=True)
        y = aten._addmm_activation(torch.empty(4, device="meta"), x, torch.empty(3, 4, device="meta"))
        y.sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _gemm_behind(act: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """``(gemm, view)``: the linear/addmm feeding ``act``, through at most one view."""
    src = act.args[0] if act.args else None
    view = None
    if isinstance(src, fx.Node) and src.op == "call_function" and src.target in VIEWS:
        view, src = src, src.args[0]
    if isinstance(src, fx.Node) and src.op == "call_function" and \
            src.target in (aten.linear.default, aten.addmm.default):
        return src, view
    return None, None


def _activation(act: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | Refusal | None:
    src = act.args[0] if act.args else None
    if isinstance(src, fx.Node) and src.op == "call_function" and src.target in CONVS:
        return Refusal(f"{act.target.__name__.split('.')[0]} after a conv stays: ATen's only conv epilogue kernel, "
                       f"cudnn_convolution_relu (relu only), is CUDA-only, has no derivative and no meta kernel; "
                       f"the conv bias is already in the conv")
    gemm, view = _gemm_behind(act)
    if gemm is None:
        return None
    name = str(act.target.overloadpacket).split(".")[-1]
    if act.target in UNFUSABLE:
        return Refusal(f"no ATen GEMM epilogue computes {name} (_addmm_activation takes relu or gelu only)")
    if not ctx.options.get("activation", True):
        return Refusal("activation epilogues disabled (activation=false)")
    if ctx.training and not addmm_activation_differentiable():
        return Refusal("training graph: aten._addmm_activation has no derivative in this torch (autograd raises "
                       "'derivative for aten::_addmm_activation is not implemented'); fused in eval graphs only")
    chain = [gemm] + ([view] if view is not None else [])
    for node in chain:
        if len(node.users) > 1:
            others = ", ".join(u.name for u in node.users if u not in chain + [act])
            return Refusal(f"{node.name} is also read by {others}")
    if gemm.target is aten.linear.default:
        x, w = gemm.args[0], gemm.args[1]
        bias = gemm.args[2] if len(gemm.args) > 2 else gemm.kwargs.get("bias")
    else:
        bias, x, w = gemm.args[:3]
        if any(gemm.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return Refusal("addmm with beta/alpha != 1")
    if bias is None:
        return Refusal(f"{gemm.name} has no bias: _addmm_activation's epilogue needs one")
    out = val(gemm)
    n = out.shape[-1]
    if not _per_column(bias, n):
        return Refusal(f"the bias {_shape(bias)} is not a contiguous vector [{n}]: no cuBLASLt epilogue")
    device = out.device.type
    use_gelu = act.target is aten.gelu.default
    if use_gelu:
        approx = act.kwargs.get("approximate", act.args[1] if len(act.args) > 1 else "none")
        kernel = GELU_OF_ADDMM_ACTIVATION.get(device)
        if kernel is None:
            return Refusal(f"graph on {device}: which GELU _addmm_activation computes there is unknown")
        if approx != kernel:
            return Refusal(f"gelu(approximate={approx!r}) differs from the GELU _addmm_activation computes on "
                           f"{device} (approximate={kernel!r}): not the same function")
    written = [n_.name for n_ in (x, w, bias) if isinstance(n_, fx.Node) and facts.is_written(n_)]
    if written:
        return Refusal(f"{', '.join(written)} written in place in this graph")
    xs = _shape(x)
    lead = None
    if gemm.target is aten.linear.default and len(xs) != 2:
        if not val(x).is_contiguous() or not all(isinstance(s, int) for s in list(out.shape)[1:]) or len(xs) < 2:
            return Refusal(f"linear input {xs} is not a contiguous N-D tensor with static inner sizes: "
                           f"it cannot be flattened to 2-D without a copy")
        lead = [-1] + list(out.shape)[1:]
    k = xs[-1]

    def build(emit):
        mat1 = x if lead is None else emit(Call(aten.view.default, (x, [-1, k])))
        mat2 = w if gemm.target is aten.addmm.default else emit(Call(aten.permute.default, (w, [1, 0])))
        fused = emit(Call(aten._addmm_activation.default, (bias, mat1, mat2), {"use_gelu": use_gelu}))
        if lead is not None:
            fused = emit(Call(aten.view.default, (fused, lead)))
        if view is not None:
            fused = emit(Call(view.target, (fused, *view.args[1:])))
        return fused
    what = f"gelu(approximate={GELU_OF_ADDMM_ACTIVATION[device]!r}), the one _addmm_activation computes on " \
           f"{device}" if use_gelu else "relu"
    op = gemm.target.__name__.split('.')[0]
    return _fused(ctx, act, build, f"{op} + {what} -> _addmm_activation (the cuBLASLt epilogue on CUDA; "
                                   f"{'eval graph' if not ctx.training else 'differentiable in this torch'})",
                  [n_ for n_ in (view, gemm) if n_ is not None])


RULES: list[Rule] = [
    Rule("mm-bias", (aten.add.Tensor,), _mm_bias, "mm(a, b) + bias[N] -> addmm(bias, a, b)"),
    Rule("matmul-bias", (aten.add.Tensor,), _matmul_bias, "matmul(x, W) + bias[N] -> linear(x, W^T, bias)"),
    Rule("bmm-bias", (aten.add.Tensor,), _bmm_bias, "bmm + add: kept (baddbmm = copy + GEMM)"),
    Rule("gemm-activation", (aten.relu.default, aten.gelu.default, *UNFUSABLE), _activation,
         "relu/gelu(linear/addmm with bias) -> _addmm_activation (eval graphs)"),
]


@register
class FuseEpilogues(Pass):
    name = "epilogue"
    summary = "fuse bias adds and relu/gelu into the GEMM before them where an ATen kernel does it (addmm, linear)"
    options = {
        "bias": Option(bool, True, "fuse bias adds into the GEMM (addmm, linear)"),
        "activation": Option(bool, True, "fuse relu/gelu into the GEMM (_addmm_activation; eval graphs in torch 2.13)"),
    }

    statistics = rule_statistics(RULES)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        rules = [r for r in RULES if ctx.options.get("bias", True) or r.name == "gemm-activation"]
        # one sweep in graph order: a fused bias feeds the activation rule
        stats = apply_rules(gm, ctx, rules, max_sweeps=1)
        return PassResult(gm, any(v for k, v in stats.items() if not k.startswith("kept_")), dict(stats))
