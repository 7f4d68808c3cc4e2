"""``mixed-precision``: run an fp32 training graph in bf16 (or fp16) where it pays and is safe.

What the graph becomes (``mixed-precision{dtype=bf16}``):

* every node gets a policy from a table (:data:`POLICY`, keyed by ATen op name):
  ``low`` (conv, linear/matmul/addmm/bmm, attention: always 16-bit, inputs cast), ``norm``
  (layer/group/batch norm, softmax: 16-bit input and output, the kernels accumulate in fp32;
  batch norm keeps its affine parameters and running statistics fp32), ``fp32`` (losses,
  exp/log chains, var/std, vector norms, cumulative ops, and sum/mean over at least
  ``reduce_fp32_min`` elements: inputs cast up, fp32 out), ``follow`` (pointwise, views,
  pooling, cat, data movement: the dtype their inputs have), ``keep`` (anything without a
  policy: runs exactly as captured, on its captured dtypes);
* activations stay 16-bit from op to op: unlike ``torch.autocast``, which casts around every
  autocast op, a value is cast only where its consumer's policy needs another dtype;
* parameters stay fp32 master weights on the module; each ``get_attr`` is cast ONCE per step
  (one ``_to_copy``, shared by all its users; views of it are re-applied on the cast);
  floating graph inputs are cast once at entry, graph outputs back to their captured dtype, so
  the model's interface, ``state_dict`` and optimizer are unchanged;
* redundant cast pairs (``x -> fp32 -> bf16`` where ``x`` is bf16, casts to the dtype a value
  already has) are removed (:data:`CLEANUP_RULES`);
* a gather from fp32 weights by indices (an embedding) counts as an input: computed exact in
  fp32, cast once where a 16-bit consumer first needs it (not the whole table per step);
* weight-only values (``expand(learned_queries)``, ``weight * scale``) are computed as captured
  and cast where needed; a conv/matmul/norm on them is lowered like any other.

Options (``mixed-precision{dtype=bf16,keep_fp32=head.*;softmax}``):

* ``dtype``: ``bf16`` (default) or ``fp16``;
* ``keep_fp32``: glob patterns on a node's module path (any enclosing module in
  ``nn_module_stack``; ``head.*`` also matches ``head`` itself), its op name (``softmax``,
  ``aten.softmax.int``) or node name: those nodes run as captured (fp32);
* ``reduce_fp32_min`` (4096): sum/mean over at least this many elements per output stay fp32;
* ``estimate`` (true): price decisions with the cost model (one fake-tensor trace of the step);
* ``only_if_faster`` (false): keep the rewrite only if the estimated step time goes down; small,
  launch-bound graphs (where each cast is one more kernel launch) are then left fp32, with the
  estimate logged.

The graph module declares the precision it now computes in as
``gm.meta["fxopt.precision"]``, so the pass manager and :func:`fxopt.verify` judge it against
the original run under ``torch.autocast`` at that dtype (see :mod:`fxopt.verify`).

fp16 (``dtype=fp16``) has 5 exponent bits: train it with loss scaling (``torch.amp.GradScaler``);
the pass logs that as a decision. Every lowered conv/matmul/norm is logged with the cost model's
estimated gain (``roofline.call_time`` of its forward + backward calls at fp32 minus at 16 bits,
bytes halved), every cast with its estimated cost, and a summary with the net estimate; stats count
nodes per policy and dtype, casts by kind, removed casts and ``activation_bytes_saved``.
"""
from __future__ import annotations

import fnmatch
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx
from torch.utils._pytree import tree_leaves, tree_map

from fxopt.cost_models.ops import classify
from fxopt.errors import FxoptError

from .base import Option, Pass, PassContext, PassResult, register
from .opgroups import CASTS
from .provenance import insert_call
from .rewrite import GraphFacts, Rewrite, Rule, apply_rules, same_layout, val

__all__ = ["CastMixedPrecision", "MixedPrecisionError", "POLICY", "FP32_ARGS", "CLEANUP_RULES", "policy_of",
           "LOW", "NORM", "FOLLOW", "FP32", "KEEP", "PRECISION_KEY"]

aten = torch.ops.aten
from fxopt.cost_models.names import PRECISION_KEY, dtype_name  # noqa: E402  (meta key read by fxopt.verify and the manager)

LOW, NORM, FOLLOW, FP32, KEEP = "low", "norm", "follow", "fp32", "keep"
CAST, ASSERT, INPLACE = "cast", "assert", "inplace"  # structural classes, not policies a user sees

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
SUFFIX = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


class MixedPrecisionError(FxoptError, ValueError):
    """Bad options for ``mixed-precision`` (unknown dtype, malformed pattern list)."""


def _ops(policy: str, names: str) -> dict[str, str]:
    return {n: policy for n in names.split()}


#: ATen op name (overload packet) -> policy. Ops not listed: pointwise-tagged ops, views and
#: data-movement/pooling ops (by the cost model's op class) follow; anything else is ``keep``.
POLICY: dict[str, str] = {
    # tensor-core work: the whole point
    **_ops(LOW, "conv1d conv2d conv3d convolution _convolution conv_transpose1d conv_transpose2d "
                "conv_transpose3d linear matmul mm bmm addmm baddbmm addbmm addmv mv einsum "
                "scaled_dot_product_attention _scaled_dot_product_flash_attention "
                "_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention"),
    # kernels that read 16-bit and accumulate in fp32
    **_ops(NORM, "layer_norm native_layer_norm group_norm native_group_norm rms_norm _fused_rms_norm "
                 "batch_norm native_batch_norm _native_batch_norm_legit _native_batch_norm_legit_no_training "
                 "_native_batch_norm_legit_functional instance_norm softmax _softmax _safe_softmax"),
    # numerically sensitive: losses, exp/log chains, variance, norms, long accumulations
    **_ops(FP32, "exp exp2 expm1 log log2 log10 log1p log_softmax _log_softmax logsumexp logcumsumexp "
                 "logaddexp logaddexp2 xlogy special_xlog1py var std var_mean std_mean norm linalg_vector_norm "
                 "frobenius_norm nuclear_norm renorm dist cdist _cdist_forward pdist cosine_similarity "
                 "cumsum cumprod prod rsqrt reciprocal erfinv softplus acos asin cosh sinh tan "
                 "cross_entropy_loss nll_loss nll_loss_nd nll_loss_forward nll_loss2d nll_loss2d_forward "
                 "mse_loss l1_loss smooth_l1_loss huber_loss binary_cross_entropy "
                 "binary_cross_entropy_with_logits kl_div poisson_nll_loss cosine_embedding_loss "
                 "hinge_embedding_loss margin_ranking_loss multilabel_margin_loss soft_margin_loss "
                 "multilabel_soft_margin_loss triplet_margin_loss multi_margin_loss ctc_loss"),
    # exact in any dtype (no accumulation), or pure data movement
    **_ops(FOLLOW, "cat stack amax amin max min argmax argmin sort topk max_pool1d max_pool2d max_pool3d "
                   "max_pool2d_with_indices max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d "
                   "adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d _adaptive_avg_pool2d "
                   "adaptive_max_pool1d adaptive_max_pool2d pad constant_pad_nd reflection_pad1d "
                   "reflection_pad2d replication_pad1d replication_pad2d upsample_nearest1d upsample_nearest2d "
                   "upsample_nearest3d upsample_bilinear2d upsample_bicubic2d _upsample_nearest_exact2d "
                   "pixel_shuffle pixel_unshuffle channel_shuffle embedding dropout native_dropout "
                   "feature_dropout alpha_dropout clone contiguous flatten unflatten split split_with_sizes "
                   "chunk unbind tensor_split index index_select gather scatter scatter_add masked_fill "
                   "where repeat roll flip tile zeros_like ones_like empty_like full_like new_zeros "
                   "new_ones new_empty new_full"),
}

# sum/mean: fp32 when they reduce at least `reduce_fp32_min` elements, else follow
_REDUCTIONS = {"sum", "mean", "nansum", "nanmean"}

#: norm op -> argument positions that stay fp32: batch norm's weight, bias and running statistics
#: (fp32 buffers updated in place; cuDNN and ATen's kernels take them fp32 with 16-bit input)
FP32_ARGS: dict[str, tuple[int, ...]] = {
    "batch_norm": (1, 2, 3, 4), "native_batch_norm": (1, 2, 3, 4), "_native_batch_norm_legit": (1, 2, 3, 4),
    "_native_batch_norm_legit_no_training": (1, 2, 3, 4), "_native_batch_norm_legit_functional": (1, 2, 3, 4),
    "instance_norm": (1, 2, 3, 4),
}

REASONS = {
    LOW: "tensor-core op: 16-bit inputs, fp32 accumulation in the kernel",
    NORM: "reads 16-bit input and accumulates in fp32 inside the kernel; 16-bit output",
    FP32: "numerically sensitive",
    KEEP: "no mixed-precision policy for this op: runs on its captured dtypes",
    FOLLOW: "follows its inputs' dtype",
}

_CASTS = CASTS
_FOLLOW_CLASSES = ("pointwise", "view", "pooling", "memory", "random", "alloc")


def _name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def _concrete(x) -> int | float | None:
    """``x`` as a Python number, None when it is symbolic (never guards on a shape symbol)."""
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        x = x.node.maybe_as_int() if isinstance(x, torch.SymInt) else None
    return x if isinstance(x, (int, float)) else None


def _hinted(x) -> int | float | None:
    """``x`` as a number; a symbolic size at its example value (estimates only: never guards)."""
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        hint = x.node.hint
        return hint if isinstance(hint, (int, float)) else None
    return x if isinstance(x, (int, float)) else None


def _reduced_elements(node: fx.Node):
    """How many elements each output element of a reduction sums: the product of the reduced
    dimensions (all of them without a ``dim`` argument); "batch-dependent" when one is symbolic."""
    x = val(node.args[0]) if node.args else None
    if not isinstance(x, torch.Tensor):
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims) if isinstance(dims, (list, tuple)) and dims else \
        list(range(x.dim()))
    n = 1
    for d in dims:
        size = _concrete(x.shape[d]) if isinstance(d, int) and -x.dim() <= d < max(x.dim(), 1) else None
        if size is None:
            return "batch-dependent"
        n *= size
    return n


def _is_large(n, threshold: int) -> bool:
    return not isinstance(n, int) or n >= threshold  # a batch-sized reduction counts as large


def policy_of(node: fx.Node, reduce_fp32_min: int = 4096) -> tuple[str, str]:
    """The policy of one ``call_function`` node and why (see the module doc and :data:`POLICY`)."""
    t = node.target
    if node.op != "call_function":
        return KEEP, f"{node.op} {node.target}: not an ATen op, runs on its captured dtypes"
    if t is operator.getitem:
        return FOLLOW, "getitem"
    if not isinstance(t, torch._ops.OpOverload):
        return KEEP, f"{getattr(t, '__name__', t)} is not an ATen op: runs on its captured dtypes"
    name = _name(node)
    if t is aten._assert_tensor_metadata.default:
        return ASSERT, "export's dtype check follows its subject"
    if t in _CASTS:
        return CAST, "explicit cast"
    if name in _REDUCTIONS:
        n = _reduced_elements(node)
        if n is not None and _is_large(n, reduce_fp32_min):
            return FP32, f"{name} over {n} elements (>= reduce_fp32_min={reduce_fp32_min}): fp32 result"
        return FOLLOW, f"{name} over {n} elements"
    if name == "pow":
        e = node.args[1] if len(node.args) > 1 else None
        if isinstance(e, (int, float)) and float(e).is_integer() and 0 <= e <= 3:
            return FOLLOW, f"pow by {e}: a few exact-ish multiplications"
        return FP32, f"pow by {e!r}: numerically sensitive"
    if name in POLICY:
        p = POLICY[name]
        return p, REASONS[p] if p != FP32 else f"{name}: {_FP32_WHY.get(name, 'numerically sensitive')}"
    if t._schema.is_mutable:
        return INPLACE, "in-place op: writes into its argument, keeps that argument's dtype"
    if torch.Tag.pointwise in t.tags:
        return FOLLOW, "pointwise"
    if classify(t).op_class in _FOLLOW_CLASSES:
        return FOLLOW, classify(t).op_class
    return KEEP, REASONS[KEEP]


_FP32_WHY = {
    **{n: "exp/log chain" for n in "exp exp2 expm1 log log2 log10 log1p logaddexp logaddexp2 xlogy".split()},
    **{n: "log-softmax/logsumexp: exp/log chain" for n in "log_softmax _log_softmax logsumexp logcumsumexp".split()},
    **{n: "variance: difference of large sums" for n in "var std var_mean std_mean".split()},
    **{n: "long accumulation" for n in "cumsum cumprod prod norm linalg_vector_norm frobenius_norm".split()},
    **{n: "loss function" for n in ("cross_entropy_loss nll_loss nll_loss_nd nll_loss_forward nll_loss2d "
                                    "nll_loss2d_forward mse_loss l1_loss smooth_l1_loss huber_loss "
                                    "binary_cross_entropy binary_cross_entropy_with_logits kl_div").split()},
}


# ---------------------------------------------------------------------------------------------
# cleanup rules: redundant cast pairs


def _cast_dtype(node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _exact(src: torch.dtype, mid: torch.dtype) -> bool:
    """Does casting ``src`` to ``mid`` lose nothing (so casting back is the identity)?"""
    if src == mid:
        return True
    wider = {torch.bfloat16: (torch.float32, torch.float64), torch.float16: (torch.float32, torch.float64),
             torch.float32: (torch.float64,)}
    return mid in wider.get(src, ())


def _cast_roundtrip(node: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | None:
    """cast(cast(x, wider), x.dtype) -> x: a widening cast is exact, casting back restores x."""
    mid = node.args[0]
    if not (isinstance(mid, fx.Node) and mid.op == "call_function" and mid.target in _CASTS):
        return None
    x = mid.args[0]
    if not isinstance(x, fx.Node) or not same_layout(val(x), val(node)):
        return None
    if not _exact(_cast_dtype(x), _cast_dtype(mid)) or not facts.can_forward(node, x):
        return None
    d = SUFFIX.get(_cast_dtype(x), str(_cast_dtype(x)))
    return Rewrite(x, f"{x.name} is {d}; {d} -> {SUFFIX.get(_cast_dtype(mid))} -> {d} is the identity")


def _cast_noop(node: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | None:
    """A cast to the dtype, device and layout its input already has."""
    x = node.args[0]
    if not isinstance(x, fx.Node) or not same_layout(val(x), val(node)):
        return None
    if val(x).dtype not in (torch.bfloat16, torch.float16):
        return None  # fp32 no-op casts the model made are normalize's (noop-copy)
    if val(x).requires_grad != val(node).requires_grad or not facts.can_forward(node, x):
        return None
    return Rewrite(x, f"cast to the dtype it already has ({SUFFIX.get(_cast_dtype(x), _cast_dtype(x))})")


CLEANUP_RULES: list[Rule] = [
    Rule("cast-roundtrip", tuple(_CASTS), _cast_roundtrip, "cast(cast(x, wider), x.dtype) -> x"),
    Rule("cast-noop", tuple(_CASTS), _cast_noop, "cast of a 16-bit value to its own dtype -> the value"),
]


# ---------------------------------------------------------------------------------------------
# cost estimates


@dataclass
class _Estimates:
    """Roofline times (s) of one step's calls per node at fp32 and at 16 bits, and the cast cost model."""

    t32: dict
    t16: dict
    hw: Any = None
    training: bool = True

    def gain(self, name: str) -> float | None:
        if self.hw is None:
            return None
        return self.t32.get(name, 0.0) - self.t16.get(name, 0.0)  # a node without calls costs nothing

    def cast_cost(self, tensor, src: torch.dtype, dst: torch.dtype, backward: bool) -> float | None:
        """Forward (+ backward, casting the gradient back) of one cast of ``tensor``."""
        if self.hw is None:
            return None
        from fxopt.cost_models.roofline import call_time
        numel = _hinted(tensor.numel())
        if numel is None:
            return None
        nbytes = numel * (src.itemsize + dst.itemsize)
        t = call_time("memory", dtype_name(dst), 0, nbytes, 1, self.hw).total_s
        return float(t) * (2 if backward and self.training else 1)


def _estimate(gm: fx.GraphModule, ctx: PassContext, low: torch.dtype) -> _Estimates:
    """Trace one step of the captured (fp32) graph and price every call at fp32 and at ``low``."""
    empty = _Estimates({}, {}, None, ctx.training)
    try:
        from fxopt.cost_models.hardware import load_hardware
        from fxopt.cost_models.roofline import Precision, call_time
        from fxopt.cost_models.trace import trace_step
        hw, prec = load_hardware(ctx.hardware), Precision.from_torch()
        trace = trace_step(gm, training=ctx.training, optimizer=None)
    except Exception:  # a graph the cost model cannot trace still gets rewritten, without estimates
        return empty
    low_name = dtype_name(low)
    t32: Counter = Counter()
    t16: Counter = Counter()
    for r in trace.records:
        c = r.cost
        nbytes, flops = _hinted(c.bytes_read + c.bytes_written), _hinted(c.flops)
        if nbytes is None or flops is None:  # sizes without an example value: no numeric estimate
            return empty
        shape = {"gemms": c.gemms, "kind": c.kind}   # the same shape-aware price as the report's
        t32[r.node] += float(call_time(c.op_class, c.dtype, flops, nbytes, c.kernels, hw, prec, **shape).total_s)
        if c.dtype == "float32":
            t16[r.node] += float(call_time(c.op_class, low_name, flops, nbytes / 2, c.kernels, hw, prec,
                                           **shape).total_s)
        else:
            t16[r.node] += float(call_time(c.op_class, c.dtype, flops, nbytes, c.kernels, hw, prec, **shape).total_s)
    return _Estimates(dict(t32), dict(t16), hw, ctx.training)


# ---------------------------------------------------------------------------------------------
# the pass


def _float(v) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _fake_run(node: fx.Node):
    """``node``'s target on the fake values of its (new) arguments; raises what the op raises."""
    from torch._guards import detect_fake_mode
    args, kwargs = tree_map(val, (node.args, node.kwargs))
    leaves = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    mode = detect_fake_mode(leaves)
    if mode is None:
        raise RuntimeError("no fake values on the node's inputs")
    with mode:
        return node.target(*args, **kwargs)


def _dtypes(v):
    """The dtypes of a value (a tensor, or a tuple/list of them) as a hashable structure."""
    if isinstance(v, torch.Tensor):
        return v.dtype
    if isinstance(v, (list, tuple)):
        return tuple(_dtypes(x) for x in v)
    return None


def _structure(gm: fx.GraphModule) -> list[str]:
    """The graph without metadata: what "modified" means."""
    return [n.format_node() or "" for n in gm.graph.nodes]


def _patterns(value) -> list[str]:
    if value in (None, "", []):
        return []
    items = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(p, str) and p for p in items):
        raise MixedPrecisionError(f"keep_fp32 takes glob patterns separated by ';' "
                                  f"(keep_fp32=head.*;softmax), got {value!r}")
    return items


def _override(node: fx.Node, patterns: list[str]) -> str | None:
    """The keep_fp32 pattern (and what it matched) that covers ``node``, else None."""
    paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values() if p]
    names = [_name(node), str(node.target), node.name]
    for pat in patterns:
        for path in paths:
            if fnmatch.fnmatchcase(path, pat) or (pat.endswith(".*") and path == pat[:-2]):
                return f"keep_fp32 pattern {pat!r} matches module {path!r}"
        for n in names:
            if fnmatch.fnmatchcase(n, pat):
                return f"keep_fp32 pattern {pat!r} matches op {n!r}"
    return None


class _Rewriter:
    """One application of the policy table to one graph (state of a single run)."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, low: torch.dtype, est: _Estimates):
        self.gm, self.graph, self.ctx, self.low, self.est = gm, gm.graph, ctx, low, est
        opts = ctx.options
        self.patterns = _patterns(opts.get("keep_fp32"))
        self.reduce_min = int(opts.get("reduce_fp32_min", 4096))
        self.orig = {n: val(n) for n in self.graph.nodes}       # captured values (dtype before the pass)
        self.const = self._input_independent()
        self.changed: set = set()                                  # nodes whose value's dtype changed
        self.facts = GraphFacts(self.graph)
        self.cache: dict = {}                                      # (source node or attr target, dtype) -> node
        self.stats: Counter = Counter()
        self.cast_users: Counter = Counter()                       # cast node -> consumers served
        self.casts: list = []                                      # (source, cast, dtype, first consumer)

    # -- facts ---------------------------------------------------------------------------------
    def _input_independent(self) -> set:
        """Weight-like values: parameters, buffers, and what views/pointwise ops make of them without
        any graph input (``expand(queries)``, ``weight * scale``). They are computed as captured and
        cast where a 16-bit consumer needs them. A conv/matmul/norm on weights alone (learned queries
        through a layer norm) is real compute: it is lowered like any other."""
        const = set()
        for n in self.graph.nodes:  # shape values (sym_size of an input) carry no data: they do not count
            data = [a for a in n.all_input_nodes if not isinstance(self.orig.get(a), (torch.SymInt, int))]
            if n.op == "get_attr" or (n.op == "call_function" and all(a in const for a in data)
                                      and policy_of(n, self.reduce_min)[0] not in (LOW, NORM)):
                const.add(n)
        return const

    def orig_dtype(self, n: fx.Node):
        v = self.orig.get(n)
        return v.dtype if _float(v) else None

    def dtype(self, n: fx.Node):
        v = val(n)
        return v.dtype if _float(v) else None

    def is_entry(self, n: fx.Node) -> bool:
        """An fp32 value that enters the computation: a graph input, or a gather from weights by
        indices (embedding: its only floating inputs are weights). It counts as 16-bit and is cast
        once, where a 16-bit consumer first needs it; fp32 consumers read it exact."""
        if self.orig_dtype(n) != torch.float32 or n in self.const:
            return False
        if n.op == "placeholder":
            return True
        floats = [a for a in n.all_input_nodes if _float(self.orig.get(a))]
        return n.op == "call_function" and bool(floats) and all(a in self.const for a in floats) \
            and self.dtype(n) == torch.float32

    def act_dtype(self, n: fx.Node):
        """The dtype ``n`` carries as an activation in the new graph."""
        return self.low if self.is_entry(n) else self.dtype(n)

    # -- casts ---------------------------------------------------------------------------------
    def get(self, a: fx.Node, dtype, consumer: fx.Node) -> fx.Node:
        """A node holding ``a``'s value in ``dtype`` (``a`` itself when it has that dtype already)."""
        if dtype is None or self.dtype(a) in (None, dtype):
            return a
        written = self.facts.is_written(a)  # a value updated in place later cannot share one cast
        src = a.args[0] if a.op == "call_function" and a.target in _CASTS and a.args else None
        if (isinstance(src, fx.Node) and self.dtype(src) == dtype and _exact(dtype, self.dtype(a))
                and not written and not self.facts.is_written(src)):
            # x -> wider -> back to x's dtype is the identity: read x (x.to(bf16).float() fed to a conv)
            d, m = SUFFIX.get(dtype, dtype), SUFFIX.get(self.dtype(a), self.dtype(a))
            self.stats["removed_cast-roundtrip"] += 1
            self.ctx.decide(a, "bypass", f"{src.name} is {d}: {d} -> {m} -> {d} is the identity; "
                            f"{consumer.name} reads {src.name}")
            return src
        key = (a.target if a.op == "get_attr" else a, dtype)
        if not written and key in self.cache:
            self.cast_users[self.cache[key]] += 1
            return self.cache[key]
        src = a.args[0] if a.op == "call_function" and a.args else None
        if (a in self.const and isinstance(src, fx.Node) and src in self.const and not written
                and self._is_view(a)):
            # a view of a weight (t, permute, expand, ...): view the weight's single cast
            new = self._add(a.target, (self.get(src, dtype, consumer),) + tuple(a.args[1:]), dict(a.kwargs),
                            consumer, f"{a.name}_{SUFFIX.get(dtype, 'cast')}")
        else:
            new = self._add(aten._to_copy.default, (a,), {"dtype": dtype}, consumer,
                            f"{a.name}_{SUFFIX.get(dtype, 'cast')}", source=a)
            self.casts.append((a, new, dtype, consumer))
        if not written:
            self.cache[key] = new
        self.cast_users[new] += 1
        return new

    def _is_view(self, n: fx.Node) -> bool:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload) or n.target in _CASTS:
            return False  # (``to`` may alias, but re-applying a cast would undo the one we want)
        tensors = [a for a in n.all_input_nodes if isinstance(val(a), torch.Tensor)]
        return classify(n.target).op_class == "view" and tensors == [n.args[0]]

    def _add(self, target, args, kwargs, consumer: fx.Node, name: str, source: fx.Node | None = None) -> fx.Node:
        like = source if source is not None and source.op == "call_function" and consumer.op == "output" \
            else consumer
        return insert_call(self.graph, target, args, kwargs, before=consumer, like=like, name=name, fake=_fake_run)

    def log_casts(self) -> None:
        """One decision per cast that survived the cleanup, with its users and estimated cost."""
        for a, new, dtype, consumer in self.casts:
            if new.graph is not self.graph or getattr(new, "_erased", False) or not new.users:
                continue
            src = self.orig_dtype(a) if a in self.const or self.is_entry(a) else self.dtype(a)
            grad = self.ctx.training and bool(getattr(self.orig.get(a), "requires_grad", False) or a.op == "get_attr")
            cost = self.est.cast_cost(val(a), src, dtype, backward=grad)
            cost = -cost if cost is not None else None
            self.stats["casts_" + ("param" if a in self.const else "output" if consumer.op == "output"
                                   else "input" if self.is_entry(a) else "activation")] += 1
            s, d, n = SUFFIX.get(src, src), SUFFIX.get(dtype, dtype), len(new.users)
            users = f"{n} user{'s' if n != 1 else ''}"
            if a.op == "get_attr":
                why = f"fp32 master weight {a.target} cast to {d} once per step, shared by {users}"
                self.ctx.decide(a, "cast once", why, cost)
            elif self.is_entry(a):
                what = "graph input" if a.op == "placeholder" else f"{_name(a)} of fp32 weights"
                self.ctx.decide(a, "cast at entry", f"{what} cast {s} -> {d} once, shared by {users}", cost)
            elif consumer.op == "output":
                self.ctx.decide(a, "cast back", f"graph output keeps its captured dtype: {s} -> {d}", cost)
            elif a in self.const:
                self.ctx.decide(a, "cast once", f"constant computed from weights only, cast {s} -> {d} once per "
                                f"step, shared by {users}", cost)
            else:
                self.ctx.decide(a, "cast", f"{s} -> {d} for {consumer.name} ({users})", cost)

    # -- per node ------------------------------------------------------------------------------
    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op == "output":
                self._output(node)
            elif node.op in ("call_function", "call_module", "call_method") and node not in self.const:
                self._node(node)

    def _set(self, node: fx.Node, want: Callable[[int | str, fx.Node], Any]) -> None:
        """Replace every floating tensor input ``a`` (at arg position/kwarg name ``k``) by
        ``get(a, want(k, a))``; ``want`` returns the dtype wanted, or None for "as it is"."""
        def conv(k, a):
            if isinstance(a, fx.Node) and _float(self.orig.get(a)):
                return self.get(a, want(k, a), node)
            if isinstance(a, (list, tuple)) and any(isinstance(x, fx.Node) for x in a):
                return type(a)(conv(k, x) for x in a)
            return a
        node.args = tuple(conv(i, a) for i, a in enumerate(node.args))
        node.kwargs = {k: conv(k, a) for k, a in node.kwargs.items()}

    def _node(self, node: fx.Node) -> None:
        if _dtypes(self.orig.get(node)) is None and node.target is not aten._assert_tensor_metadata.default:
            return  # shape arithmetic (sym_size), asserts: no tensor to give a dtype
        policy, reason = policy_of(node, self.reduce_min)
        override = _override(node, self.patterns) if self.patterns and policy != ASSERT else None
        if override:
            policy, reason = KEEP, override
        name, low, fp32 = _name(node), self.low, torch.float32
        floats = [a for a in node.all_input_nodes if _float(self.orig.get(a))]
        before = (node.args, node.kwargs)

        if policy == ASSERT:  # export's dtype assertion states the dtype its subject has now
            subject = node.args[0] if node.args else None
            if isinstance(subject, fx.Node) and self.dtype(subject) is not None and "dtype" in node.kwargs:
                node.kwargs = {**node.kwargs, "dtype": self.dtype(subject)}
            return
        if policy in (LOW, NORM) and not any(self.orig_dtype(a) == fp32 for a in floats):
            policy = FOLLOW  # nothing fp32 to lower (already 16-bit, or float64 on purpose)
        if policy == LOW:
            self._set(node, lambda k, a: low if self.orig_dtype(a) == fp32 else None)
        elif policy == NORM:  # the input (and layer/group norm's affine weights) 16-bit; batch norm's
            keep = FP32_ARGS.get(name, ())  # weight, bias and running statistics stay the fp32 masters
            self._set(node, lambda k, a: self.orig_dtype(a) if k in keep else
                      (low if self.orig_dtype(a) == fp32 else None))
        elif policy in (FP32, KEEP):
            self._set(node, lambda k, a: self.orig_dtype(a))
        elif policy in (FOLLOW, CAST):
            self._follow(node, policy, floats)
        # INPLACE: the written argument and the others as they are; the result keeps self's dtype
        changed = self._refresh(node, before)
        if changed is None:
            return  # rejected the new dtypes: runs as captured (logged)
        if changed or policy == FP32 or (policy == KEEP and floats):
            self._log(node, policy, reason, changed)

    def _follow(self, node: fx.Node, policy: str, floats: list[fx.Node]) -> None:
        low = self.low
        if policy == CAST:
            src = node.args[0] if node.args else None
            if not (isinstance(src, fx.Node) and self.orig_dtype(src) is not None
                    and self.orig_dtype(src) == self.orig_dtype(node)):
                return  # a real cast in the model (bool -> float, fp32 -> fp64): keeps its target dtype
        acts = [a for a in floats if a not in self.const]
        if not acts:
            return  # nothing floating flows in from the inputs (embedding of a weight by ids): as captured
        kinds = {self.act_dtype(a) for a in acts}
        if kinds == {low}:  # all activations 16-bit: fp32 weights and constants join them
            self._set(node, lambda k, a: low if self.orig_dtype(a) == torch.float32 else None)
            target = low
        else:  # an fp32 activation is involved: type promotion keeps fp32, inputs stay exact
            self._set(node, lambda k, a: self.orig_dtype(a) if (a in self.const or self.is_entry(a)) else None)
            target = None
        if policy == CAST:
            self._set_cast_dtype(node, target or self.dtype(node.args[0]))

    @staticmethod
    def _set_cast_dtype(node: fx.Node, dtype) -> None:
        """A cast the model made to the dtype its value already had (a no-op in the captured
        graph, e.g. ``x.to(torch.float32)``) keeps being a no-op: it follows its input."""
        if dtype is None:
            return
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.name == "dtype":
                if i < len(node.args) and not arg.kwarg_only:
                    node.args = node.args[:i] + (dtype,) + node.args[i + 1:]
                elif "dtype" in node.kwargs:
                    node.kwargs = {**node.kwargs, "dtype": dtype}

    def _refresh(self, node: fx.Node, before) -> bool | None:
        """Recompute ``node``'s fake value. True if its inputs or dtype changed, False if not, None
        when the op rejected the new dtypes and now runs as captured (logged)."""
        if (node.args, node.kwargs) == before and not any(a in self.changed for a in node.all_input_nodes):
            return False
        if node.op != "call_function":
            return True
        try:
            node.meta["val"] = _fake_run(node)
        except Exception as exc:  # noqa: BLE001 - the op's own dtype check
            node.args, node.kwargs = before
            self._set(node, lambda k, a: self.orig_dtype(a))
            node.meta["val"] = _fake_run(node)
            self.stats["kept_fp32_rejected"] += 1
            self.ctx.decide(node, "keep fp32", f"{_name(node)} rejected 16-bit inputs "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); runs as captured")
            return None
        if _dtypes(val(node)) != _dtypes(self.orig.get(node)):
            self.changed.add(node)
        return True

    def _log(self, node: fx.Node, policy: str, reason: str, changed: bool) -> None:
        d, o = self.dtype(node), self.orig_dtype(node)
        low = SUFFIX[self.low]
        if policy in (LOW, NORM):
            self.stats[f"{policy}_{low}"] += 1
            self.ctx.decide(node, low, f"{_name(node)}: {reason}", self.est.gain(node.name))
        elif policy == FP32:
            self.stats["kept_fp32_policy"] += 1
            how = f"16-bit inputs cast up to {SUFFIX.get(o, o)}" if changed else "its inputs are fp32 already"
            self.ctx.decide(node, "keep fp32", f"{reason}; {how}")
        elif policy == KEEP:
            key = "kept_fp32_override" if reason.startswith("keep_fp32") else "kept_fp32_unknown"
            self.stats[key] += 1
            self.ctx.decide(node, "keep fp32", reason if key.endswith("override") else f"{_name(node)}: {reason}")
        elif d is not None and d != o:
            self.stats[f"follow_{low}"] += 1

    def _output(self, node: fx.Node) -> None:
        def back(a):
            if isinstance(a, fx.Node) and self.orig_dtype(a) is not None and self.dtype(a) != self.orig_dtype(a):
                return self.get(a, self.orig_dtype(a), node)
            return a
        node.args = tree_map(back, node.args)


@register
class CastMixedPrecision(Pass):
    name = "mixed-precision"
    summary = "bf16/fp16 compute with fp32 master weights: tensor-core ops and activations in 16 bits"
    options = {
        "dtype": Option((str, torch.dtype), "bf16", "the 16-bit compute dtype", choices=tuple(DTYPES)),
        "keep_fp32": Option(list, [], "glob patterns (module paths, op names) that stay fp32"),
        "reduce_fp32_min": Option(int, 4096, "sum/mean over at least this many elements stay fp32", minimum=1),
        "estimate": Option(bool, True, "price each decision with the cost model"),
        "only_if_faster": Option(bool, False, "keep the rewrite only when the predicted step gets faster"),
    }
    statistics = {
        "low_*": "kernels the policy runs in the low dtype (low_bf16, low_fp16)",
        "norm_*": "norms reading 16-bit input, accumulating in fp32", "follow_*": "ops following their inputs' dtype",
        "casts_*": "casts inserted, by what they convert (param, input, output, act)",
        "kept_fp32_*": "ops kept in fp32, by why (policy, override, unknown, rejected)",
        "nodes_*": "kernels by the dtype they run in", "removed_*": "casts the cleanup removed, by rule",
        "activation_bytes_saved": "activation bytes saved per step (a formula with a symbolic batch)",
        "precision": "the dtype the graph now declares (gm.meta[PRECISION_KEY])",
    }

    def requires(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self._low(ctx.options)
        _patterns(ctx.options.get("keep_fp32"))
        n = ctx.options.get("reduce_fp32_min", 4096)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise MixedPrecisionError(f"reduce_fp32_min must be a positive integer, got {n!r}")

    @staticmethod
    def _low(options) -> torch.dtype:
        d = options.get("dtype", "bf16")
        if isinstance(d, torch.dtype) and d in SUFFIX and d not in (torch.float32, torch.float64):
            return d
        if isinstance(d, str) and d.lower() in DTYPES:
            return DTYPES[d.lower()]
        raise MixedPrecisionError(f"mixed-precision{{dtype={d}}}: use dtype=bf16 (the default) or dtype=fp16")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from .graph_utils import propagate_meta, quiet_deepcopy as _quiet_deepcopy
        low = self._low(ctx.options)
        if any("val" not in n.meta for n in gm.graph.nodes if n.op in ("placeholder", "get_attr", "call_function")):
            propagate_meta(gm, ctx.example_args, ctx.example_kwargs)
        why_not = self._nothing_to_do(gm)
        if why_not:
            ctx.decide("graph", "no change", why_not)
            return PassResult(gm, False, {})
        if not ctx.options.get("only_if_faster"):
            return self._rewrite(gm, ctx, low)[0]
        # cost gate: rewrite a copy, keep it only if the cost model says the step gets faster
        mark = len(ctx.decisions)
        result, total = self._rewrite(_quiet_deepcopy(gm), ctx, low)
        if result.modified and (total is None or total <= 0):
            del ctx.decisions[mark:]
            why = "no cost estimate (estimate=false, or the cost model could not trace the graph)" \
                if total is None else \
                f"est. {-total * 1e6:.1f} us slower per step: the casts cost more than the 16-bit kernels save " \
                f"(launch- or cast-bound at this size)"
            ctx.decide("graph", "no change", f"only_if_faster: {why}; the graph stays fp32", total)
            return PassResult(gm, False, {})
        return result

    def _rewrite(self, gm: fx.GraphModule, ctx: PassContext, low: torch.dtype) -> tuple[PassResult, float | None]:
        """Apply the policy table to ``gm`` in place; the result and the estimated net gain (s)."""
        from .graph_utils import no_new_guards
        est = _estimate(gm, ctx, low) if ctx.options.get("estimate", True) else _Estimates({}, {}, None)
        structure = _structure(gm)
        rw = _Rewriter(gm, ctx, low, est)
        alive = {n for n in gm.graph.nodes if n.op == "call_function" and n.target in _CASTS and n.users}
        with no_new_guards(gm):
            rw.run()
            cleanup = apply_rules(gm, ctx, CLEANUP_RULES)
            removed = self._remove_dead_casts(gm, alive | set(rw.cast_users), rw.facts)
            rw.log_casts()
        if _structure(gm) == structure:
            ctx.decide("graph", "no change", "no float32 value feeds a conv, matmul, attention or norm")
            return PassResult(gm, False, {}), None
        stats = self._stats(gm, rw, low, cleanup, removed)
        total = self._summary(gm, rw, stats, low)
        if low == torch.float16:
            ctx.decide("graph", "note", "fp16 keeps 5 exponent bits: small gradients underflow to zero and "
                       "values above 65504 overflow; train with loss scaling (torch.amp.GradScaler), or use "
                       "dtype=bf16 (fp32's exponent range, no scaler needed)")
        gm.meta[PRECISION_KEY] = dtype_name(low)
        return PassResult(gm, True, stats), total

    @staticmethod
    def _summary(gm: fx.GraphModule, rw: _Rewriter, stats: dict, low: torch.dtype) -> float | None:
        """One decision for the whole graph: what runs in 16 bits, what it costs in casts, the net gain
        (returned: seconds per step, None without estimates)."""
        d = SUFFIX[low]
        gains = [rw.est.gain(n.name) for n in gm.graph.nodes
                 if n in rw.orig and rw.orig_dtype(n) == torch.float32 and rw.dtype(n) == low]
        casts = [c.est_gain_s for c in rw.ctx.decisions if c.action.startswith("cast")]
        total = None
        if rw.est.hw is not None and all(g is not None for g in gains + casts):
            total = sum(gains) + sum(casts)
        n_casts = sum(v for k, v in stats.items() if k.startswith("casts_"))
        mb = stats.get("activation_bytes_saved", 0)
        mb = f"{mb / 1e6:.3g} MB" if isinstance(mb, int) else f"{mb} bytes"
        rw.ctx.decide("graph", "summary",
                      f"{stats.get(f'nodes_{d}', 0)} kernels run in {d}, {stats.get('nodes_fp32', 0)} in fp32; "
                      f"{n_casts} casts inserted; forward activations {mb} smaller", total)
        return total

    @staticmethod
    def _nothing_to_do(gm: fx.GraphModule) -> str | None:
        fp32 = [n for n in gm.graph.nodes if _float(val(n)) and val(n).dtype == torch.float32
                and n.op != "get_attr"]
        if not fp32:
            return "no float32 activations (the graph already runs in another precision): nothing to lower"
        calls = [n for n in gm.graph.nodes if n.op == "call_function"]
        if not any(policy_of(n)[0] == LOW for n in calls):
            return ("no conv, matmul or attention: 16 bits would only round pointwise and reduction ops "
                    "that tensor cores do not run; the graph stays fp32")
        return None

    @staticmethod
    def _remove_dead_casts(gm: fx.GraphModule, candidates: set, facts: GraphFacts) -> int:
        """Casts (and views of casts) this pass made, or that the cleanup left without users."""
        removed = 0
        for node in reversed(list(gm.graph.nodes)):
            if node in candidates and not node.users and not facts.is_written(node):
                gm.graph.erase_node(node)
                removed += 1
        return removed

    @staticmethod
    def _stats(gm: fx.GraphModule, rw: _Rewriter, low: torch.dtype, cleanup: Counter, removed: int) -> dict:
        stats = Counter(rw.stats)
        by_dtype: Counter = Counter()
        saved = 0
        for n in gm.graph.nodes:
            v = val(n)
            if n.op != "call_function" or not _float(v) or not isinstance(n.target, torch._ops.OpOverload):
                continue
            if not classify(n.target).kernel or classify(n.target).op_class == "view":
                continue
            by_dtype[SUFFIX.get(v.dtype, str(v.dtype))] += 1
            o = rw.orig.get(n)
            if _float(o) and o.dtype == torch.float32 and v.dtype == low:
                numel = v.numel()
                saved = saved + numel * (4 - low.itemsize)
        for d, c in sorted(by_dtype.items()):
            stats[f"nodes_{d}"] = c
        for rule, c in cleanup.items():
            stats[f"removed_{rule}"] += c
        if removed:
            stats["removed_dead_casts"] = removed
        saved_int = _concrete(saved)
        stats["activation_bytes_saved"] = saved_int if saved_int is not None else str(saved.node.expr)
        stats["precision"] = dtype_name(low)
        return dict(stats)
