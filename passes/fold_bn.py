"""``fold-bn``: fold an inference-mode batch norm into the conv or linear that feeds it.

A batch norm that normalizes with its running statistics (every BN of an eval graph, and a
*frozen* BN inside a training graph: ``batch_norm(..., training=False)``, from a BN module put in
eval mode or ``F.batch_norm(..., training=False)``) is a per-channel affine map
``y = (x - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``. After a conv or linear it
folds into that layer (``b = 0`` when the layer has no bias)::

    w' = w * s   (per output channel)        b' = (b - mean) * s + beta

``w'`` and ``b'`` are computed IN THE GRAPH on every call, from the get_attr nodes of the conv
weight/bias and the BN weight, bias, running_mean and running_var: a handful of weight-sized ops
(add, rsqrt, mul, sub, addcmul, view) instead of an activation-sized BN pass forward (and backward, in
training). No parameter or buffer is written: state_dict names stay, ``load_state_dict`` keeps
working, and in training the gradients reach the conv weight/bias and BN gamma/beta through
``w'``/``b'`` exactly as they reached them through the BN (running statistics are buffers, they
get none). The estimated gain is the BN node's predicted time minus the roofline time of the
weight ops (forward and backward), minus the conv-bias gradient a bias-free conv now computes.
Where the graph is costed and that gain is negative (small activations: 5-6 weight-op launches
cost more than one small BN pass), the BN is kept and the decision says so; option
``profitable_only=false`` folds anyway. Uncosted or symbolic-batch graphs fold everything foldable.

A BN is left alone, with the reason logged (:data:`REFUSALS`, checked in order), when it
normalizes with batch statistics (``training=True``: its scale depends on the batch), has no
running statistics (``track_running_stats=False``), is not fed by a conv/linear, the conv output
has other users (they would read the folded values), BN's channel axis is not the layer's output
axis (a linear on ``[B, T, C]`` under ``BatchNorm1d`` normalizes ``T``), dtypes differ (run
before mixed precision), the BN tensors are written in place in the graph, or they are computed
after the conv. Transposed convolutions fold along weight axis 1 (``[C_in, C_out/groups, k...]``),
per group. Only ``aten.batch_norm`` is matched: a BN written out by hand (torchvision's
``FrozenBatchNorm2d`` computes ``x * scale + shift`` itself) is not.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import fx

from fxopt.cost_models.names import dtype_name

from .base import Option, Pass, PassContext, PassResult, register
from .rewrite import Call, Emit, GraphFacts, Refusal, Rewrite, Rule, apply_rules, val

__all__ = ["FoldBatchNorm", "Producer", "PRODUCERS", "REFUSALS", "RULES", "BNMatch"]

aten = torch.ops.aten


@dataclass(frozen=True)
class Producer:
    """How a layer op holds its weight: ``kind`` names it in messages; ``transposed`` is the name
    of the argument saying so (``aten.convolution``) or True for the conv_transpose ops."""

    kind: str
    transposed: bool | str = False


# op -> how its weight is laid out. Weight and bias are the schema arguments "weight"/"bias".
PRODUCERS: dict = {
    **{op: Producer("conv") for op in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                                       aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding)},
    **{op: Producer("conv_transpose", True) for op in (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                                                       aten.conv_transpose3d.input)},
    aten.convolution.default: Producer("convolution", "transposed"),
    aten.linear.default: Producer("linear"),
}


# ---------------------------------------------------------------------------------------------
# schema-aware argument access


def _index(node: fx.Node, name: str) -> int:
    return [a.name for a in node.target._schema.arguments].index(name)


def arg(node: fx.Node, name: str):
    """Argument ``name`` of an ATen call node, from args, kwargs or the schema default."""
    i = _index(node, name)
    if i < len(node.args):
        return node.args[i]
    if name in node.kwargs:
        return node.kwargs[name]
    return node.target._schema.arguments[i].default_value


def _set_arg(node: fx.Node, name: str, value) -> None:
    i = _index(node, name)
    if i < len(node.args):
        node.update_arg(i, value)
    else:
        node.update_kwarg(name, value)


# ---------------------------------------------------------------------------------------------
# the match and its refusal rules


@dataclass
class BNMatch:
    """A batch_norm node and what it reads."""

    bn: fx.Node
    layer: fx.Node | None
    facts: GraphFacts

    @property
    def producer(self) -> Producer | None:
        return PRODUCERS.get(self.layer.target) if self.layer is not None else None

    def bn_tensors(self) -> dict:
        return {k: arg(self.bn, k) for k in ("weight", "bias", "running_mean", "running_var")}

    def transposed(self) -> bool:
        t = self.producer.transposed
        return bool(arg(self.layer, t)) if isinstance(t, str) else t

    def groups(self) -> int:
        return int(arg(self.layer, "groups")) if self.producer.kind != "linear" else 1


def _batch_statistics(m: BNMatch) -> str | None:
    if arg(m.bn, "running_mean") is None or arg(m.bn, "running_var") is None:
        return ("no running statistics (track_running_stats=False): BN normalizes with batch "
                "statistics in every mode, nothing constant to fold")
    if arg(m.bn, "training") is not False:
        return ("BN normalizes with batch statistics (training=True): its scale depends on the batch; "
                "only eval-mode or frozen BN (training=False) folds")
    return None


def _no_layer(m: BNMatch) -> str | None:
    if m.producer is None:
        src = arg(m.bn, "input")
        what = f"{src.target}" if isinstance(src, fx.Node) and src.op == "call_function" else \
            (src.op if isinstance(src, fx.Node) else repr(src))
        return f"input comes from {what}, not a conv or linear"
    return None


def _other_users(m: BNMatch) -> str | None:
    others = [u.name for u in m.layer.users if u is not m.bn]
    if others:
        return (f"{m.layer.name}'s output is also read by {', '.join(others)}: folding would change "
                f"what they read")
    return None


def _channel_axis(m: BNMatch) -> str | None:
    out, w = val(m.layer), val(arg(m.layer, "weight"))
    if not (isinstance(out, torch.Tensor) and isinstance(w, torch.Tensor)):
        return f"{m.layer.name} has no shape information (run fxopt.capture)"
    if m.producer.kind == "linear":
        if out.dim() != 2:
            return (f"BN normalizes axis 1 of the linear output {list(out.shape)}, not its output-feature "
                    f"axis: no per-output-channel scale to fold")
    elif out.dim() != w.dim():
        return f"unbatched convolution (output {list(out.shape)}): BN's axis 1 is not the channel axis"
    return None


def _dtypes(m: BNMatch) -> str | None:
    tensors = {"input": m.layer, "weight": arg(m.layer, "weight"), "conv bias": arg(m.layer, "bias"),
               **m.bn_tensors()}
    dtypes = {k: val(v).dtype for k, v in tensors.items() if isinstance(val(v), torch.Tensor)}
    if len(set(dtypes.values())) > 1:
        text = ", ".join(f"{k} {dtype_name(d)}" for k, d in dtypes.items())
        return f"mixed dtypes ({text}): fold before casting (run fold-bn before mixed-precision)"
    return None


def _written(m: BNMatch) -> str | None:
    tensors = [arg(m.layer, "weight"), arg(m.layer, "bias"), *m.bn_tensors().values()]
    written = [t.name for t in tensors if isinstance(t, fx.Node) and m.facts.is_written(t)]
    if written:
        return f"{', '.join(written)} written in place in this graph: the fold would read another value"
    return None


def _order(m: BNMatch) -> str | None:
    late = [t.name for t in m.bn_tensors().values()
            if isinstance(t, fx.Node) and m.facts.order[t] > m.facts.order[m.layer]]
    if late:
        return f"{', '.join(late)} computed after {m.layer.name}: the folded weight could not be built before it"
    return None


# (rule name, check): the first check returning a reason refuses the fold.
REFUSALS: list[tuple[str, Callable[[BNMatch], str | None]]] = [
    ("batch-statistics", _batch_statistics),
    ("no-layer", _no_layer),
    ("other-users", _other_users),
    ("channel-axis", _channel_axis),
    ("dtype", _dtypes),
    ("written-in-place", _written),
    ("order", _order),
]


# ---------------------------------------------------------------------------------------------
# building the folded weight and bias


def _build(put: Emit, m: BNMatch) -> tuple[list[fx.Node], fx.Node, fx.Node, str]:
    """Insert the nodes computing the folded weight and bias before ``m.layer``, named
    ``<layer>_<what>``. Returns the new nodes, the folded weight and bias, and which weight axis
    was scaled."""
    bn, layer = m.bn, m.layer
    t = m.bn_tensors()
    eps = float(arg(bn, "eps"))
    w, b = arg(layer, "weight"), arg(layer, "bias")
    wv = val(w)
    nodes: list[fx.Node] = []

    def emit(target, args: tuple, suffix: str, **kwargs) -> fx.Node:
        nodes.append(put(Call(target, args, kwargs, name=f"{layer.name}_{suffix}"), before=layer))
        return nodes[-1]
    rstd = emit(aten.rsqrt.default, (emit(aten.add.Tensor, (t["running_var"], eps), "bn_var_eps"),), "bn_rstd")
    scale = emit(aten.mul.Tensor, (t["weight"], rstd), "bn_scale") if t["weight"] is not None else rstd
    n, shape = wv.dim(), [1] * wv.dim()
    groups = m.groups()
    if not m.transposed():
        shape[0] = -1
        w2 = emit(aten.mul.Tensor, (w, emit(aten.view.default, (scale, shape), "bn_scale_w")), "w_folded")
        axis = "weight axis 0 (output channels)"
    elif groups == 1:
        shape[1] = -1
        w2 = emit(aten.mul.Tensor, (w, emit(aten.view.default, (scale, shape), "bn_scale_w")), "w_folded")
        axis = "weight axis 1 (transposed conv: [C_in, C_out, k...])"
    else:  # [C_in, C_out/g, k...] -> [g, C_in/g, C_out/g, k...]; output channel = group * C_out/g + j
        cin, cout_g = int(wv.shape[0]), int(wv.shape[1])
        kernel = [int(s) for s in wv.shape[2:]]
        wg = emit(aten.view.default, (w, [groups, cin // groups, cout_g, *kernel]), "w_groups")
        sg = emit(aten.view.default, (scale, [groups, 1, cout_g] + [1] * (n - 2)), "bn_scale_w")
        w2 = emit(aten.view.default, (emit(aten.mul.Tensor, (wg, sg), "w_folded_groups"),
                                      [int(s) for s in wv.shape]), "w_folded")
        axis = f"weight axis 1 per group (transposed conv, groups={groups})"
    mean, beta = t["running_mean"], t["bias"]
    if b is not None:  # b' = beta + (b - mean) * s
        shift = emit(aten.sub.Tensor, (b, mean), "b_minus_mean")
        b2 = emit(aten.addcmul.default, (beta, shift, scale), "b_folded") if beta is not None else \
            emit(aten.mul.Tensor, (shift, scale), "b_folded")
    elif beta is not None:  # b' = beta - mean * s
        b2 = emit(aten.addcmul.default, (beta, mean, scale), "b_folded", value=-1)
    else:  # b' = -mean * s
        b2 = emit(aten.neg.default, (emit(aten.mul.Tensor, (mean, scale), "mean_scaled"),), "b_folded")
    return nodes, w2, b2, axis


# ---------------------------------------------------------------------------------------------
# cost estimate


def _weight_ops_time(nodes: list[fx.Node], hw, precision, training: bool) -> tuple[float, int]:
    """Roofline time and kernel count of the new weight-sized ops: one pointwise kernel each
    (views are free), doubled in training for their backward."""
    from fxopt.cost_models.roofline import call_time
    total, kernels = 0.0, 0
    for node in nodes:
        out = val(node)
        if node.target is aten.view.default or not isinstance(out, torch.Tensor):
            continue
        ins = [val(a) for a in node.args if isinstance(val(a), torch.Tensor)]
        nbytes = (out.numel() + sum(i.numel() for i in ins)) * out.element_size()
        total += call_time("pointwise", dtype_name(out.dtype), out.numel(), nbytes, 1, hw, precision).total_s
        kernels += 1
    return total * (2 if training else 1), kernels


def _bias_grad_time(layer: fx.Node, hw, precision) -> float:
    """A bias-free conv that gets a folded bias also computes the bias gradient in training: one
    reduction over its output gradient."""
    from fxopt.cost_models.roofline import call_time
    out = val(layer)
    return call_time("reduction", dtype_name(out.dtype), out.numel(),
                     out.numel() * out.element_size(), 1, hw, precision).total_s


def _us(t: float) -> str:
    return f"{t * 1e6:.2f} us"


def _fold(bn: fx.Node, facts: GraphFacts, ctx: PassContext) -> Rewrite | Refusal:
    """The fold of one batch norm, or the first refusal (:data:`REFUSALS`, then the options)."""
    src = arg(bn, "input")
    m = BNMatch(bn, src if isinstance(src, fx.Node) and src.op == "call_function" else None, facts)
    refusal = next(((name, why) for name, check in REFUSALS if (why := check(m))), None)
    if refusal is None and ctx.training and not ctx.options.get("frozen_in_training", True):
        refusal = ("option", "frozen BN in a training graph, and frozen_in_training=false")
    if refusal is not None:
        return Refusal(f"{refusal[0]}: {refusal[1]}", counter=f"kept_{refusal[0]}")
    hw, bn_time, done = ctx.hw, ctx.node_time(bn), {}

    def build(emit: Emit) -> fx.Node | Refusal:
        new_nodes, w2, b2, axis = _build(emit, m)
        extra, kernels = _weight_ops_time(new_nodes, hw, ctx.precision, ctx.training)
        if ctx.training and arg(m.layer, "bias") is None and isinstance(val(m.layer).numel(), int):
            extra += _bias_grad_time(m.layer, hw, ctx.precision)
        gain = None if bn_time is None else bn_time - extra
        mode = "frozen BN in training, fwd+bwd" if ctx.training else "eval, fwd"
        cost = (f"one activation-sized BN pass ({mode})"
                f"{'' if bn_time is None else f', est. {_us(bn_time)},'} for {kernels} weight-sized kernels"
                f"{' (+ their backward)' if ctx.training else ''}"
                f"{'' if bn_time is None else f', est. {_us(extra)}'}")
        if gain is not None and gain < 0 and ctx.options.get("profitable_only", True):
            return Refusal(f"slower: folding would trade {cost} (profitable_only=true; set it false to fold "
                           f"anyway)", counter="kept_slower", gain=gain)
        _set_arg(m.layer, "weight", w2)
        _set_arg(m.layer, "bias", b2)
        done["reason"] = (f"folded into {m.layer.name} ({m.producer.kind}, {axis}): w' = w*s, b' = (b-mean)*s+beta "
                          f"with s = gamma*rsqrt(var+eps), computed in the graph; trades {cost}")
        done["gain"] = gain
        return m.layer  # the layer's users read it instead of the BN

    return Rewrite(build, lambda _: done["reason"], "fold", gain=lambda _: done["gain"], counters=("folded",))


RULES = [Rule("fold-bn", (aten.batch_norm.default,), _fold, "fold an eval-mode/frozen BN into its conv/linear",
              tagged=False)]


@register
class FoldBatchNorm(Pass):
    name = "fold-bn"
    summary = "fold eval-mode/frozen batch norm into the preceding conv/linear weights, computed in the graph"
    # profitable_only: tiny layers' weight ops can cost more launches than a small BN pass saves
    options = {
        "frozen_in_training": Option(bool, True, "also fold BN called with training=False inside a training graph"),
        "profitable_only": Option(bool, True, "where the graph is costed, keep BNs whose fold is predicted slower"),
    }

    before = {"mixed-precision": "a BN folds only into a layer of its own dtype (fold, then cast once)"}
    statistics = dict(folded="batch norms folded into the layer before them",
                      kept_slower="folds predicted slower (profitable_only=true)",
                      kept_option="frozen BNs in a training graph with frozen_in_training=false",
                      **{f"kept_{name}": f"refused: {name}" for name, _ in REFUSALS})

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stats = apply_rules(gm, ctx, RULES, max_sweeps=1)
        return PassResult(gm, stats["folded"] > 0, dict(stats))
