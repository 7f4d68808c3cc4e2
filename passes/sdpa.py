"""``sdpa``: replace attention written out by hand with ``aten.scaled_dot_product_attention``.

Why: ``softmax(q @ k.T * s + mask) @ v`` written out runs five or more kernels forward and more
backward, and moves the L x S score and probability tensors through memory several times each
way; the fused kernel a GPU runs (flash / memory-efficient / cuDNN) keeps them on chip and
recomputes the scores in backward. Each decision carries the cost model's estimate of the gain.

Canonical form first: the pass applies normalize's rules (:data:`fxopt.passes.normalize.RULES`)
to the whole graph before matching (``div`` by a number -> ``mul``, ``transpose``/``t`` ->
``permute``, no-op views/casts and identity dropout removed), so it matches one spelling. After
``normalize`` this step changes nothing; ``canonicalize=false`` skips it (then ``/ s`` is not
recognised as a scale). Every softmax is an anchor, and the dataflow around it is walked::

    scores = matmul | bmm | einsum(q, k)                      (..., L, S); k through any permute
    scores = scores * c | + mask | masked_fill(m, -inf) | where(keep, scores, -inf) | cast
                                                              (any number, any order)
    p      = softmax(scores, -1)      (also dtype=float32, _softmax(half_to_float), _safe_softmax)
    p      = dropout(p, p_drop) | cast                        (any order)
    out    = matmul | bmm | einsum(p, v)

becomes ``scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, scale=c)`` with the
scale always explicit. Scales folded into q or k (``q * c`` before the matmul, through views) are
moved into ``scale`` when nothing else reads the scaled tensor.

Refused, with the reason logged (``keep``): an intermediate (scores, probabilities) with another
user, e.g. probabilities returned for visualization; a softmax not over the last axis; shapes
other than 4-D (B, H, L, D) or 3-D (B*H, L, D) (3-D runs as (1, B*H, L, D)); q/k/v batch
dimensions that broadcast; q, k, v or the output in different dtypes; an additive mask in
another dtype than q or broadcasting the scores up; ``masked_fill`` with a finite value unless the
mask is provably causal; a scale that is a tensor; an estimated gain below ``min_gain_us`` (default
0: the fused kernel must be predicted faster).

Masks: ``masked_fill(m, -inf)`` -> boolean ``attn_mask = ~m`` (SDPA's True means attend),
additive masks pass as they are (times any scale applied after them); several masks of one kind
are combined. A mask computed in the graph from constants only (``tril(ones)``, ``triu(full(-inf),
1)``, arange comparisons) is evaluated at pass time: SDPA's causal mask (``tril(ones(L, L))``,
square scores only) becomes ``is_causal=True``; an all-zero additive or all-true keep mask is
dropped (HF's eager BERT without an attention_mask adds one). A mask read from a buffer or an
input is data (a checkpoint may change it) and is passed as is. Rows that are masked entirely
give NaN in the original and 0 in SDPA's math kernel.

Dropout: ``dropout(p, train=True)`` becomes ``dropout_p`` (an eval capture has none). On the CPU
SDPA's math kernel draws the same mask as ``aten.dropout``, so training verification matches; a
GPU's fused kernel draws a different, equally distributed mask: verify such graphs with
``training=False`` or use ``fuse_dropout=false``.
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx

from fxopt.cost_models.names import dtype_name

from .base import Option, Pass, PassContext, PassResult, PipelineError, register
from . import opgroups
from .normalize import RULES as NORMALIZE_RULES
from .opgroups import CHECKS, DROPOUTS
from .rewrite import Call, Emit, GraphFacts, Refusal, Rewrite, Rule, _known, apply_rules, val
from fxopt.cost_models.hardware import DEFAULT_PRESET

__all__ = ["FuseAttention", "Attention", "Refusal", "match_attention", "estimate_gain"]

aten = torch.ops.aten

# a finite fill at or below this acts as -inf where no row is masked entirely (causal masks):
# exp(fill - rowmax) underflows to exactly 0 in every float dtype for |scores| < 1e29
NEG_AS_INF = -1e30
MAX_CONST_NODES = 200          # constant mask subgraphs larger than this are not evaluated
MAX_CONST_ELEMS = 1 << 22

# casts on the score/probability path change the floating dtype only (``type_as`` too; a device move is no cast here)
CASTS = (opgroups.CASTS - {aten.to.device}) | {aten.type_as.default}
VIEWS = opgroups.SHAPE_VIEWS


# ---------------------------------------------------------------------------------------------
# small helpers


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _users(node: fx.Node) -> list[fx.Node]:
    """Real users of ``node`` (export's ``_assert_tensor_metadata`` checks do not count)."""
    return [u for u in node.users if u.target not in CHECKS]


def _shape(node) -> list:
    v = val(node)
    return list(v.shape) if isinstance(v, torch.Tensor) else []


def _same_sizes(a, b) -> bool:
    return len(a) == len(b) and all(_known(x == y) for x, y in zip(a, b))


def _only_user(node: fx.Node, what: str) -> fx.Node:
    users = _users(node)
    if len(users) != 1 or users[0].op == "output":
        names = ", ".join("a graph output" if u.op == "output" else u.name for u in users) or "nothing"
        raise Refusal(f"the {what} ({node.name}) are used by {len(users)} nodes ({names}); SDPA never "
                      f"materializes them, so nothing else may read them")
    return users[0]


def _cast(node: fx.Node) -> torch.dtype | None:
    """The dtype a pure floating cast (same shape and device) converts to, else None."""
    if node.target not in CASTS or not isinstance(node.args[0], fx.Node):
        return None
    x, y = val(node.args[0]), val(node)
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
        return None
    if x.device != y.device or not _same_sizes(x.shape, y.shape):
        return None
    return y.dtype if x.is_floating_point() and y.is_floating_point() else None


def _module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _perm(src: str, dst: str) -> list[int]:
    """The permute that lays axes lettered ``src`` out as ``dst``."""
    return [src.index(c) for c in dst]


def _identity(p) -> bool:
    return list(p) == list(range(len(p)))


# ---------------------------------------------------------------------------------------------
# rule tables: matmul-like ops, softmaxes, score steps


def _matmul_letters(node: fx.Node):
    """(a, b, letters of a, of b, of the output): matmul/bmm as einsum-style letters."""
    a, b = node.args[0], node.args[1]
    na, nb = len(_shape(a)), len(_shape(b))
    if na != nb or na < 3:
        raise Refusal(f"{node.name}: {node.target} of {na}-D and {nb}-D operands is not a batched "
                      f"attention matmul (needs equal batch dimensions)")
    batch = string.ascii_uppercase[:na - 2]
    return a, b, batch + "ij", batch + "jk", batch + "ik"


def _einsum_letters(node: fx.Node):
    equation, operands = node.args[0], node.args[1]
    if not (isinstance(equation, str) and len(operands) == 2 and "->" in equation):
        raise Refusal(f"{node.name}: einsum {equation!r} is not a two-operand einsum with an explicit output")
    lhs, out = equation.replace(" ", "").split("->")
    terms = lhs.split(",")
    ndims = [len(_shape(o)) for o in operands]
    fresh = iter(c for c in string.ascii_letters if c not in equation)
    n_ell = {nd - (len(t) - 3) for t, nd in zip(terms, ndims) if "..." in t}
    if len(n_ell) > 1:
        raise Refusal(f"{node.name}: einsum {equation!r} broadcasts '...' over different ranks")
    ell = "".join(next(fresh) for _ in range(n_ell.pop() if n_ell else 0))
    terms, out = [t.replace("...", ell) for t in terms], out.replace("...", ell)
    if any(len(t) != nd or len(set(t)) != len(t) for t, nd in zip(terms, ndims)) or len(set(out)) != len(out):
        raise Refusal(f"{node.name}: einsum {equation!r} repeats a letter or does not fit its operands")
    return operands[0], operands[1], terms[0], terms[1], out


# target -> fn(node) -> (left, right, letters_left, letters_right, letters_out)
MATMULS: dict = {
    aten.matmul.default: _matmul_letters,
    aten.bmm.default: _matmul_letters,
    aten.einsum.default: _einsum_letters,
}


def _softmax_input_dim(node):  # softmax(x, dim[, dtype]), _softmax(x, dim, half_to_float)
    return node.args[0], node.args[1]


# target -> fn(node) -> (input, dim); an upcast (dtype=, half_to_float) shows in the node's val
SOFTMAXES: dict = {
    aten.softmax.int: _softmax_input_dim,
    aten._softmax.default: _softmax_input_dim,
    aten._safe_softmax.default: _softmax_input_dim,  # 0 for rows masked entirely, as SDPA's math kernel
}


@dataclass(frozen=True)
class Step:
    """One op between the score matmul and the softmax."""

    node: fx.Node
    kind: str                  # "scale" | "add" (additive mask) | "fill" (bool, True = masked) | "keep" | "cast"
    value: float = 1.0         # the scale, or the value written where masked
    mask: fx.Node | None = None

    def text(self) -> str:
        if self.kind == "scale":
            return f"mul({self.value:.6g})"
        if self.kind == "cast":
            return f"to({dtype_name(val(self.node).dtype)})"
        return {"add": f"add({self.mask.name})", "fill": f"masked_fill({self.mask.name}, {self.value:g})",
                "keep": f"where({self.mask.name}, {self.value:g})"}[self.kind]


def _mul_step(node):
    a, b = node.args[0], node.args[1]
    x, c = (a, b) if isinstance(a, fx.Node) else (b, a)
    if isinstance(c, fx.Node):
        raise Refusal(f"{node.name}: the scores are multiplied by a tensor ({c.name}), not a Python number; "
                      f"SDPA's scale is a number")
    if not (_number(c) and math.isfinite(c) and c != 0):
        raise Refusal(f"{node.name}: scale {c!r} is not a finite non-zero number")
    return [(x, Step(node, "scale", float(c)))]


def _add_step(node):
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        raise Refusal(f"{node.name}: add with alpha is not an additive mask")
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        raise Refusal(f"{node.name}: adds a number to the scores, not a mask")
    return [(a, Step(node, "add", mask=b)), (b, Step(node, "add", mask=a))]


def _masked_fill_step(node):
    x, m, v = node.args[0], node.args[1], node.args[2]
    if not _number(v):
        raise Refusal(f"{node.name}: masked_fill with a tensor value")
    return [(x, Step(node, "fill", float(v), m))]


def _where_keep_step(node):  # where(keep, scores, value)
    cond, x, v = node.args
    if not _number(v):
        raise Refusal(f"{node.name}: where() fills with a tensor, not a number")
    return [(x, Step(node, "keep", float(v), cond))]


def _where_fill_step(node):  # where(masked, value, scores)
    cond, v, x = node.args
    if not _number(v):
        raise Refusal(f"{node.name}: where() fills with a tensor, not a number")
    return [(x, Step(node, "fill", float(v), cond))]


def _cast_step(node):
    if _cast(node) is None:
        raise Refusal(f"{node.name}: {node.target} changes more than the floating dtype")
    return [(node.args[0], Step(node, "cast"))]


# target -> fn(node) -> [(the scores operand, Step)], alternatives tried in order
SCORE_STEPS: dict[object, Callable] = {
    aten.mul.Tensor: _mul_step,
    aten.add.Tensor: _add_step,
    aten.masked_fill.Scalar: _masked_fill_step,
    aten.where.ScalarOther: _where_keep_step,
    aten.where.ScalarSelf: _where_fill_step,
    **{t: _cast_step for t in CASTS},
}


# ---------------------------------------------------------------------------------------------
# matching


@dataclass
class Operand:
    """An SDPA input: ``permute(node, perm)`` (no permute when ``perm`` is the identity)."""

    node: fx.Node
    perm: list[int]
    folds: list = field(default_factory=list)  # (mul node, factor) scales moved into SDPA's scale

    def shape(self) -> list:
        s = _shape(self.node)
        return [s[i] for i in self.perm]


@dataclass
class Attention:
    """A matched attention: everything needed to build the SDPA call, and what it replaces."""

    softmax: fx.Node
    qk: fx.Node
    pv: fx.Node
    q: Operand
    k: Operand
    v: Operand
    out_perm: list[int]
    scale: float
    masks: list                # (Step, factor applied after it)
    dropout_p: float
    steps: list                # Steps between qk and the softmax
    prob_chain: list           # casts and dropouts between the softmax and pv
    pattern: str
    is_causal: bool = False
    dropped_masks: list = field(default_factory=list)  # (mask node, why)

    @property
    def ndim(self) -> int:
        return len(_shape(self.qk))

    @property
    def chain(self) -> list[fx.Node]:
        """The nodes the SDPA call replaces, in graph order."""
        return [self.qk] + [s.node for s in self.steps] + [self.softmax] + self.prob_chain + [self.pv]


def _walk_scores(x: fx.Node, depth: int = 0) -> tuple[fx.Node, list[Step]]:
    """From the softmax input back to the score matmul; Steps in forward order."""
    _only_user(x, "scores")
    if x.target in MATMULS:
        return x, []
    if depth > 16 or x.op != "call_function" or x.target not in SCORE_STEPS:
        what = x.target if x.op == "call_function" else x.op
        raise Refusal(f"the softmax input comes from {x.name} ({what}), which is not a q @ k^T matmul or a "
                      f"scale, mask or cast of one")
    first = None
    for source, step in SCORE_STEPS[x.target](x):
        if not isinstance(source, fx.Node):
            continue
        try:
            qk, steps = _walk_scores(source, depth + 1)
            return qk, steps + [step]
        except Refusal as exc:
            first = first or exc
    raise first or Refusal(f"{x.name}: no operand leads to a score matmul")


def _fold_scales(node: fx.Node) -> list:
    """Scales by a number on an operand's path, through views, that only this path reads."""
    folds, x = [], node
    for _ in range(12):
        if len(_users(x)) != 1 or x.op != "call_function":
            break
        if x.target is aten.mul.Tensor:
            a, b = x.args[0], x.args[1]
            src, c = (a, b) if isinstance(a, fx.Node) else (b, a)
            if not (isinstance(src, fx.Node) and _number(c) and math.isfinite(c) and c != 0
                    and getattr(val(src), "dtype", None) == getattr(val(x), "dtype", False)):
                break
            folds.append((x, float(c)))
            x = src
        elif x.target in VIEWS and isinstance(x.args[0], fx.Node):
            x = x.args[0]
        else:
            break
    return folds


def _qk_operands(qk: fx.Node) -> tuple[Operand, Operand, str]:
    a, b, la, lb, lo = MATMULS[qk.target](qk)
    l, s, batch = lo[-2], lo[-1], lo[:-2]
    contracted = (set(la) & set(lb)) - set(lo)
    if len(contracted) != 1:
        raise Refusal(f"{qk.name}: the score matmul contracts {len(contracted)} axes, not one head dimension")
    d = contracted.pop()
    if sorted(la) != sorted(batch + l + d) or sorted(lb) != sorted(batch + s + d):
        raise Refusal(f"{qk.name}: operands are not (batch, L, D) and (batch, S, D) up to a permutation")
    return Operand(a, _perm(la, batch + l + d)), Operand(b, _perm(lb, batch + s + d)), lo


def _pv_operands(pv: fx.Node, p: fx.Node) -> tuple[Operand, list[int]]:
    a, b, la, lb, lo = MATMULS[pv.target](pv)
    if a is not p:
        raise Refusal(f"{pv.name}: the probabilities are the right operand of {pv.target}, not (p @ v)")
    bl, l, s = la[:-2], la[-2], la[-1]  # the probabilities' axes, positionally the scores'
    extra = set(lb) - set(la)
    if (set(la) & set(lb)) - set(lo) != {s} or len(extra) != 1:
        raise Refusal(f"{pv.name}: {pv.target} does not contract the key axis of the probabilities with v")
    e = extra.pop()
    if sorted(lb) != sorted(bl + s + e) or sorted(lo) != sorted(bl + l + e):
        raise Refusal(f"{pv.name}: v or the output is not (batch, S, E) / (batch, L, E) up to a permutation")
    return Operand(b, _perm(lb, bl + s + e)), _perm(bl + l + e, lo)


def _walk_probs(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node], float, list[str]]:
    """From the softmax forward to the value matmul: (pv, chain, dropout_p, op texts)."""
    p, chain, dropout_p, texts = softmax, [], 0.0, []
    for _ in range(16):
        u = _only_user(p, "attention probabilities")
        if u.target in MATMULS:
            return u, chain, dropout_p, texts
        if u.target in DROPOUTS:
            prob = u.args[1] if len(u.args) > 1 else u.kwargs.get("p", 0.5)
            train = u.args[2] if len(u.args) > 2 else u.kwargs.get("train", True)
            if not (_number(prob) and isinstance(train, bool)):
                raise Refusal(f"{u.name}: dropout probability or train flag is not a constant")
            if train and prob > 0:
                if dropout_p:
                    raise Refusal(f"{u.name}: a second dropout on the probabilities")
                dropout_p = float(prob)
            texts.append(f"dropout({prob:g})")
        elif _cast(u) is not None:
            texts.append(f"to({dtype_name(_cast(u))})")
        else:
            raise Refusal(f"the probabilities feed {u.name} ({u.target}), not the value matmul (p @ v)")
        chain.append(u)
        p = u
    raise Refusal("no value matmul within 16 ops of the softmax")


def match_attention(softmax: fx.Node, facts: GraphFacts | None = None) -> Attention:
    """Match the attention around ``softmax``; raises :class:`Refusal` saying why not."""
    x, dim = SOFTMAXES[softmax.target](softmax)
    qk, steps = _walk_scores(x)
    scores = _shape(qk)
    n = len(scores)
    if not isinstance(dim, int) or dim % max(n, 1) != n - 1:
        raise Refusal(f"softmax over dim {dim} of {n}-D scores: attention normalizes over the last (key) axis")
    q, k, lo = _qk_operands(qk)
    pv, prob_chain, dropout_p, prob_texts = _walk_probs(softmax)
    v, out_perm = _pv_operands(pv, prob_chain[-1] if prob_chain else softmax)
    if n not in (3, 4):
        raise Refusal(f"{n}-D attention {scores}: SDPA's fused kernels take 4-D (B, H, L, D) or 3-D "
                      f"(B*H, L, D) inputs; reshape to (B, H, L, D) first")
    for step in steps:
        if not _same_sizes(_shape(step.node), scores):
            raise Refusal(f"{step.node.name}: {step.text()} broadcasts the scores {scores} to {_shape(step.node)}")
    qs, ks, vs = q.shape(), k.shape(), v.shape()
    if not (_same_sizes(qs[:-2], scores[:-2]) and _same_sizes(ks[:-2], scores[:-2])
            and _same_sizes(vs[:-2], scores[:-2]) and _same_sizes(vs[-2:-1], ks[-2:-1])):
        raise Refusal(f"q {qs}, k {ks}, v {vs} broadcast their batch dimensions; SDPA needs them equal")
    dtypes = {str(val(o.node).dtype) for o in (q, k, v)} | {str(val(pv).dtype)}
    if len(dtypes) != 1 or not val(q.node).is_floating_point():
        raise Refusal(f"q, k, v and the output have dtypes {sorted(dtypes)}; SDPA needs one floating dtype")
    if facts is not None:  # SDPA reads q, k and the masks where the value matmul was
        written = [x.name for x in [q.node, k.node, v.node] + [s.mask for s in steps if s.mask is not None]
                   if facts.is_written(x)]
        if written:
            raise Refusal(f"{', '.join(written)} written in place; SDPA would read it at another point")

    scale, masks, after = 1.0, [], 1.0
    for step in reversed(steps):  # a mask added before a scale is scaled by it
        if step.kind == "scale":
            scale *= step.value
            after *= step.value
        elif step.kind != "cast":
            masks.append((step, after))
    masks.reverse()
    for op in (q, k):
        op.folds = _fold_scales(op.node)
        for _, c in op.folds:
            scale *= c
    pattern = " -> ".join([f"{qk.target.overloadpacket.__name__}"] + [s.text() for s in steps] + ["softmax"]
                          + prob_texts + [pv.target.overloadpacket.__name__])
    folds = [f"{m.name} (x{c:.6g})" for op in (q, k) for m, c in op.folds]
    if folds:
        pattern = f"{pattern}; scale folded from {', '.join(folds)}"
    att = Attention(softmax, qk, pv, q, k, v, out_perm, scale, masks, dropout_p, steps, prob_chain, pattern)
    _resolve_masks(att, val(q.node).dtype)
    return att


# ---------------------------------------------------------------------------------------------
# masks: constant evaluation, causal proof


def _constant(node: fx.Node) -> torch.Tensor | None:
    """The value of ``node`` when it is computed from constants only (no inputs, no attributes)."""
    order, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op != "call_function" or len(seen) > MAX_CONST_NODES:
            return None
        if torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ()):
            return None
        order.append(n)
        stack.extend(n.all_input_nodes)
    index = {n: i for i, n in enumerate(node.graph.nodes)}
    env: dict = {}
    try:
        with torch.no_grad():
            for n in sorted(order, key=index.get):
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
                env[n] = n.target(*args, **kwargs)
                if not isinstance(env[n], torch.Tensor) or env[n].numel() > MAX_CONST_ELEMS:
                    return None
    except Exception:  # symbolic sizes, unsupported ops: not provable, the mask is passed through
        return None
    return env[node]


def _masked_positions(step: Step, factor: float, value: torch.Tensor) -> torch.Tensor | None:
    """Bool tensor: True where the mask removes a key (contributes exactly 0 probability, given that
    no row is masked entirely), False where it leaves the score unchanged; None when neither holds."""
    if step.kind in ("fill", "keep"):
        masked = value.bool() if step.kind == "fill" else ~value.bool()
        acts_as_inf = factor > 0 and step.value * factor <= NEG_AS_INF
        return masked if acts_as_inf or not bool(masked.any()) else None
    v = value.double() * factor
    removed, kept = v <= NEG_AS_INF, v == 0
    return removed if bool((removed | kept).all()) else None


def _resolve_masks(att: Attention, dtype: torch.dtype) -> None:
    """Drop masks that provably change nothing, detect the causal mask, refuse unsafe ones."""
    L, S = _shape(att.qk)[-2:]
    static = isinstance(L, int) and isinstance(S, int)
    # is_causal only for L == S: SDPA documents a top-left tril(ones(L, S)) for L != S, but fused
    # kernels have aligned it bottom-right; for square scores both are the same mask
    causal = torch.ones(L, S, dtype=torch.bool).tril().logical_not() if static and L == S else None
    kept, causal_steps = [], []
    for step, factor in att.masks:
        value = _constant(step.mask) if static else None
        masked = _masked_positions(step, factor, value) if value is not None else None
        if masked is not None and not bool(masked.any()):
            att.dropped_masks.append((step.mask, "provably masks nothing"))
            continue
        if causal is not None and masked is not None and masked.shape[-2:] == (L, S) \
                and bool((masked == causal).all()):
            causal_steps.append(step)
        kept.append((step, factor))
    if len(kept) == 1 and causal_steps:
        att.is_causal = True
        att.dropped_masks.append((kept[0][0].mask, "provably causal: is_causal=True"))
        att.masks = []
        return
    for step, factor in kept:
        if step.kind in ("fill", "keep"):
            if not (math.isinf(step.value) and step.value < 0):
                raise Refusal(f"{step.node.name}: {step.text()} fills {step.value:g}, not -inf, and the mask is not "
                              f"provably causal; SDPA's boolean mask means -inf, and rows masked entirely would "
                              f"differ (use float('-inf'))")
            if factor <= 0:
                raise Refusal(f"{step.node.name}: a -inf mask scaled by {factor:g} after it")
            if val(step.mask).dtype != torch.bool:
                raise Refusal(f"{step.node.name}: the mask {step.mask.name} is not boolean")
        else:
            mv = val(step.mask)
            if mv.dtype == torch.bool or mv.dtype != dtype:
                raise Refusal(f"{step.node.name}: the additive mask {step.mask.name} is "
                              f"{dtype_name(mv.dtype)} but q is {dtype_name(dtype)}; "
                              f"SDPA needs them equal and rounding the mask would change it")
    if len({s.kind == "add" for s, _ in kept}) > 1:
        raise Refusal("a boolean and an additive mask on the same scores; combine them into one mask first")
    att.masks = kept


# ---------------------------------------------------------------------------------------------
# cost estimate


def _elems(shape) -> int:
    return math.prod(int(s) for s in shape)


def estimate_gain(att: Attention, hardware: str = DEFAULT_PRESET, training: bool = True,
                  node_times: dict | None = None) -> float | None:
    """Predicted seconds saved per step by the fused kernel (forward, plus backward when training);
    None when shapes are symbolic.

    Unfused: with ``node_times`` (the manager's per-node step times of this graph) the time of
    the replaced nodes; otherwise a roofline estimate: the two matmuls (one GEMM forward, two
    backward), one pointwise kernel per scale/mask/cast, softmax and dropout, each reading and
    writing the L x S score tensor, and their backward (copies of non-contiguous operands are
    not counted, so this is a lower bound). Fused: one kernel reading q, k, v (and the mask),
    writing the output and the row log-sum-exp; backward reads those and dO and writes dq, dk,
    dv, recomputing the scores (torch's SDPA FLOP formulas); both with roofline.call_time."""
    from fxopt.cost_models import Precision, call_time, load_hardware
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    shapes = [_shape(att.qk), att.q.shape(), att.k.shape(), att.v.shape()]
    shapes += [_shape(s.mask) for s in att.steps if s.mask is not None]
    if not all(isinstance(d, int) for s in shapes for d in s):
        return None  # symbolic sizes: int() would specialize them
    scores, qs, ks, vs = shapes[:4]
    try:
        hw = load_hardware(hardware)
    except Exception:
        return None
    dtype = dtype_name(val(att.q.node).dtype)
    es = val(att.q.node).element_size()
    prec = Precision.from_torch()
    n = _elems(scores)
    batch = _elems(scores[:-2])
    L, S, D, E = scores[-2], scores[-1], qs[-1], vs[-1]
    q_b, k_b, v_b, o_b = _elems(qs) * es, _elems(ks) * es, _elems(vs) * es, batch * L * E * es
    mask_b = sum(_elems(_shape(s.mask)) * val(s.mask).element_size() for s, _ in att.masks)
    step_b = [2 * n * es + (_elems(_shape(s.mask)) * val(s.mask).element_size() if s.mask is not None else 0)
              for s in att.steps]  # each step reads and writes the scores (and reads its mask)
    casts = [u for u in att.prob_chain if u.target not in DROPOUTS]

    def t(cls, flops, nbytes, kernels=1):
        return call_time(cls, dtype, flops, nbytes, kernels, hw, prec).total_s

    qk_f, pv_f = 2 * batch * L * S * D, 2 * batch * L * S * E
    pointwise = sum(t("pointwise", n, b) for b in step_b) + sum(t("pointwise", n, 2 * n * es) for _ in casts)
    unfused = (t("matmul", qk_f, q_b + k_b + n * es) + t("matmul", pv_f, n * es + v_b + o_b)
               + t("softmax", 5 * n, 2 * n * es) + pointwise)
    if att.dropout_p:  # draw the mask, apply it
        unfused += t("random", n, n) + t("pointwise", n, n * (2 * es + 1))
    q4, k4, v4 = ([1] * (4 - len(s)) + s for s in (qs, ks, vs))
    o4 = q4[:-1] + [E]
    lse = batch * L * 4
    fused = t("attention", sdpa_flop_count(q4, k4, v4), q_b + k_b + v_b + o_b + mask_b + lse)
    if training:
        unfused += (t("matmul", pv_f, o_b + n * es + v_b) + t("matmul", pv_f, n * es + o_b + v_b)  # dP, dV
                    + t("softmax", 4 * n, 3 * n * es) + pointwise
                    + t("matmul", qk_f, n * es + k_b + q_b) + t("matmul", qk_f, n * es + q_b + k_b))  # dQ, dK
        if att.dropout_p:
            unfused += t("pointwise", n, n * (2 * es + 1))
        fused += t("attention", sdpa_backward_flop_count(o4, q4, k4, v4),
                   2 * (q_b + k_b + v_b) + 2 * o_b + mask_b + lse)
    replaced = att.chain + [m for op in (att.q, att.k) for m, _ in op.folds]
    if node_times and all(n.name in node_times for n in replaced):
        try:
            unfused = sum(float(node_times[n.name]) for n in replaced)
        except TypeError:  # a formula (symbolic batch): keep the roofline estimate
            pass
    return unfused - fused


# ---------------------------------------------------------------------------------------------
# rewriting


def _erase(graph: fx.Graph, node: fx.Node) -> None:
    for check in [u for u in node.users if u.target in CHECKS]:
        graph.erase_node(check)
    graph.erase_node(node)


def _erase_if_dead(graph: fx.Graph, nodes) -> None:
    """Erase the nodes (and, transitively, their producers) nobody uses any more, when pure."""
    from .dce import keep_reason
    stack = list(nodes)
    while stack:
        n = stack.pop()
        if getattr(n, "_erased", False) or _users(n) or n.op != "call_function" or keep_reason(n):
            continue
        inputs = n.all_input_nodes
        _erase(graph, n)
        stack.extend(inputs)


def _permuted(emit: Emit, node: fx.Node, perm: list[int]) -> fx.Node:
    """``permute(node, perm)``, composed with ``node`` when it is itself a permute; no op for identity."""
    if _identity(perm):
        return node
    if node.target is aten.permute.default:
        node, perm = node.args[0], [node.args[1][i] for i in perm]
        if _identity(perm):
            return node
    return emit(Call(aten.permute.default, (node, perm)))


def _build_mask(emit: Emit, att: Attention) -> fx.Node | None:
    if not att.masks:
        return None
    terms = []
    for step, factor in att.masks:
        m = step.mask
        if step.kind == "fill":
            if m.target in (aten.logical_not.default, aten.bitwise_not.default) and val(m.args[0]).dtype == torch.bool:
                m = m.args[0]
            else:
                m = emit(Call(aten.logical_not.default, (m,)))
        elif step.kind == "add" and factor != 1.0:
            m = emit(Call(aten.mul.Tensor, (m, factor)))
        terms.append(m)
    combine = aten.add.Tensor if att.masks[0][0].kind == "add" else aten.logical_and.default
    mask = terms[0]
    for m in terms[1:]:
        mask = emit(Call(combine, (mask, m)))
    return mask


def _build(emit: Emit, graph: fx.Graph, att: Attention) -> tuple[fx.Node, fx.Node]:
    """The SDPA call replacing the matched attention (emitted before ``att.pv``): (sdpa, output).
    Scales folded into q/k are removed first (``scale`` carries them)."""
    for op in (att.q, att.k):
        for mul, _ in op.folds:
            src = mul.args[0] if isinstance(mul.args[0], fx.Node) else mul.args[1]
            if op.node is mul:
                op.node = src
            mul.replace_all_uses_with(src)
            _erase(graph, mul)
    q, k, v = (_permuted(emit, o.node, o.perm) for o in (att.q, att.k, att.v))
    if att.ndim == 3:  # the fused kernels take 4-D: run as (1, B*H, L, D)
        q, k, v = (emit(Call(aten.unsqueeze.default, (t, 0))) for t in (q, k, v))
    mask = _build_mask(emit, att)
    sdpa = emit(Call(aten.scaled_dot_product_attention.default,
                     (q, k, v, mask, att.dropout_p, att.is_causal), {"scale": att.scale}))
    out = sdpa
    if att.ndim == 3:
        out = emit(Call(aten.squeeze.dim, (out, 0)))
    return sdpa, _permuted(emit, out, att.out_perm)


def _consumed(graph: fx.Graph, att: Attention, operands: list[fx.Node]) -> None:
    """Erase the rest of the matched chain (``att.pv`` is gone) and what only it read (``operands``:
    q, k, v as they are once scale folds are removed)."""
    for node in reversed(att.chain[:-1]):
        _erase(graph, node)
    _erase_if_dead(graph, operands + [m for m, _ in att.dropped_masks] + [s.mask for s, _ in att.masks])


def _fuse_attention(softmax: fx.Node, facts: GraphFacts, ctx: PassContext, node_times) -> Rewrite | Refusal:
    """The one rule of the pass, anchored at a softmax: the attention around it, or why not."""
    opts = ctx.options
    min_gain = opts.get("min_gain_us", 0.0)
    where = f" in {_module(softmax)}" if _module(softmax) else ""
    try:
        att = match_attention(softmax, facts)
    except Refusal as exc:
        return Refusal(f"not fused{where}: {exc.reason}", counter="kept")
    gain = estimate_gain(att, ctx.hardware, ctx.training, node_times)
    if att.dropout_p and not opts.get("fuse_dropout", True):
        return Refusal(f"not fused{where}: dropout {att.dropout_p:g} on the probabilities and fuse_dropout=false",
                       counter="kept")
    if gain is not None and gain < min_gain * 1e-6:
        return Refusal(f"not fused{where}: {att.pattern}: est. gain {gain * 1e6:+.2f} us is below "
                       f"min_gain_us={min_gain:g}", counter="kept")
    shape = _shape(att.qk)
    notes = "".join(f"; mask {m.name} dropped: {why}" for m, why in att.dropped_masks)
    if gain is None:
        notes += "; no time estimate (symbolic sizes)"
    graph, built = softmax.graph, {}

    def build(emit: Emit) -> fx.Node:
        built["sdpa"], out = _build(emit, graph, att)
        return out

    def reason(_) -> str:
        sdpa = built["sdpa"]
        mask = sdpa.args[3].name if isinstance(sdpa.args[3], fx.Node) else "None"
        return (f"{att.pattern} -> {sdpa.name}(scale={att.scale:.6g}, attn_mask={mask}, dropout_p={att.dropout_p:g}, "
                f"is_causal={att.is_causal}) on scores {shape}{where}{notes}")

    return Rewrite(build, reason, "fuse", gain=gain, counters=("fused", "causal") if att.is_causal else ("fused",),
                   replaces=att.pv, after=lambda: _consumed(graph, att, [att.q.node, att.k.node, att.v.node]))


@register
class FuseAttention(Pass):
    name = "sdpa"
    summary = "hand-written attention (matmul, scale, mask, softmax, dropout, matmul) -> scaled_dot_product_attention"
    options = {
        "canonicalize": Option(bool, True, "apply normalize's rules first"),
        "fuse_dropout": Option(bool, True, "fuse attention with active dropout (its mask then comes from SDPA's kernel)"),
        "min_gain_us": Option(float, 0.0, "refuse a fusion the cost model predicts to gain less (us)"),
    }

    statistics = dict(fused="attentions fused into scaled_dot_product_attention",
                      causal="of those, with is_causal=True", kept="softmaxes left as they were, each with why",
                      normalized="canonical-form rewrites applied first (normalize's rules)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = ctx.options
        if not _number(opts.get("min_gain_us", 0.0)) or not isinstance(opts.get("canonicalize", True), bool) \
                or not isinstance(opts.get("fuse_dropout", True), bool):
            raise PipelineError(f"sdpa options: canonicalize and fuse_dropout are true/false, min_gain_us a "
                                f"number of microseconds; got {opts}")
        normalized = sum(apply_rules(gm, ctx, NORMALIZE_RULES).values()) if opts.get("canonicalize", True) else 0
        # the manager's node times name the graph before this pass: usable when canonicalizing changed nothing
        times = None if normalized else ctx.node_times
        rule = Rule("sdpa", tuple(SOFTMAXES), lambda n, f, c: _fuse_attention(n, f, c, times), tagged=False)
        stats = {"normalized": normalized, **apply_rules(gm, ctx, [rule], max_sweeps=1)}
        stats = {k: v for k, v in stats.items() if v}
        return PassResult(gm, bool(stats.get("fused") or stats.get("normalized")), stats)
