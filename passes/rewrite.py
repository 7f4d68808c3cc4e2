"""The one rule engine: a rule matches a (possibly multi-node) pattern anchored at one node and
returns a :class:`Rewrite`, a :class:`Refusal` with its reason, or ``None``.

Passes are tables of :class:`Rule` s applied by :func:`apply_rules` (normalize, epilogue, sdpa,
fold-bn), plus the graph facts the
rules need to stay sound (which storages are written in place, what aliases what), and
:func:`add_call`, which inserts a node carrying the replaced node's provenance
(``nn_module_stack``, ``stack_trace``) and a fake ``meta["val"]`` so later rules in the same pass
can read shapes. The manager re-propagates every ``val`` after the pass anyway.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx

from fxopt.errors import FxoptError

from .base import PassContext
from .provenance import PROVENANCE_KEYS, insert_call, val  # noqa: F401  (PROVENANCE_KEYS, val re-exported)

__all__ = ["Rule", "Rewrite", "Refusal", "Call", "Emit", "GraphFacts", "apply_rules", "rule_statistics", "add_call", "val",
           "same_layout", "PROVENANCE_KEYS"]

aten = torch.ops.aten

# ops whose schema does not say so but which write into arguments: (op, arg index of the
# ``training`` flag, arg indices written when it is true). Batch norm in training mode updates
# ``running_mean``/``running_var`` in place.
HIDDEN_WRITES: dict[Any, tuple[int, tuple[int, ...]]] = {
    aten.batch_norm.default: (5, (3, 4)),
    aten.native_batch_norm.default: (5, (3, 4)),
    aten._batch_norm_impl_index.default: (5, (3, 4)),
    aten.cudnn_batch_norm.default: (5, (3, 4)),
    aten.miopen_batch_norm.default: (5, (3, 4)),
    aten.instance_norm.default: (5, (3, 4)),  # use_input_stats with running stats
}


def _known(x) -> bool:
    from torch.fx.experimental.symbolic_shapes import guard_or_false
    return bool(guard_or_false(x)) if isinstance(x, torch.SymBool) else bool(x)


def same_layout(a, b) -> bool:
    """Two fake tensors with provably equal shape, strides, dtype, device and layout."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if (a.dtype, a.device, a.layout) != (b.dtype, b.device, b.layout) or a.dim() != b.dim():
        return False
    if a.layout != torch.strided:
        return False
    return all(_known(x == y) for x, y in zip(list(a.shape) + list(a.stride()), list(b.shape) + list(b.stride())))


def _writes(node: fx.Node) -> list[fx.Node]:
    """The node arguments ``node`` writes into (schema ``Tensor(a!)`` or :data:`HIDDEN_WRITES`)."""
    if node.op != "call_function":
        return []
    target, out = node.target, []
    schema = getattr(target, "_schema", None)
    if schema is not None and schema.is_mutable:
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                v = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                out += [x for x in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(x, fx.Node)]
    if target in HIDDEN_WRITES:
        flag, idx = HIDDEN_WRITES[target]
        if len(node.args) > flag and node.args[flag] is True:
            out += [node.args[i] for i in idx if i < len(node.args) and isinstance(node.args[i], fx.Node)]
    return out


def _alias_source(node: fx.Node) -> fx.Node | None:
    """The argument ``node``'s output may alias (views, ``to`` that may return self, ``alias``)."""
    if node.op != "call_function":
        return None
    if node.target is torch.ops.aten.dropout.default:  # returns its input when it is the identity
        return node.args[0] if isinstance(node.args[0], fx.Node) else None
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    ret = schema.returns[0].alias_info
    if ret.is_write:
        return None  # in-place ops: their result is the written argument, handled by _writes
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and set(arg.alias_info.before_set) & set(ret.before_set):
            v = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            return v if isinstance(v, fx.Node) else None
    return None


@dataclass
class GraphFacts:
    """Aliasing and mutation facts of one graph, computed once per rule sweep."""

    graph: fx.Graph
    written: set = field(default_factory=set)  # alias roots written in place somewhere
    order: dict = field(default_factory=dict)  # node -> position at the start of the sweep

    def __post_init__(self):
        self.written = {self.root(w) for n in self.graph.nodes for w in _writes(n)}
        self.order = {n: i for i, n in enumerate(self.graph.nodes)}

    @staticmethod
    def root(node: fx.Node) -> fx.Node:
        """Follow views/aliases back to the node that owns the storage."""
        seen = set()
        while node not in seen:
            seen.add(node)
            src = _alias_source(node)
            if src is None:
                return node
            node = src
        return node

    def is_written(self, node: fx.Node) -> bool:
        """Is the storage of ``node`` (or of anything it aliases) written in place anywhere?"""
        return self.root(node) in self.written

    def can_forward(self, node: fx.Node, to: fx.Node) -> bool:
        """May every use of ``node`` read ``to`` instead? (no in-place writes to either storage,
        and no graph output made to alias an input, a parameter or another output)."""
        if self.is_written(node) or self.is_written(to):
            return False
        outputs = [u for u in node.users if u.op == "output"]
        if outputs and self.root(node) is not self.root(to):  # a fresh output would become an alias
            out_node = outputs[0]
            flat = [a for a in torch.utils._pytree.tree_leaves(out_node.args) if isinstance(a, fx.Node)]
            r = self.root(to)
            if r.op in ("placeholder", "get_attr") or any(self.root(a) is r for a in flat if a is not node):
                return False
        return True


@dataclass(frozen=True)
class Call:
    """A node to build: ``target(*args, **kwargs)``, named ``name`` (default: like export names it)."""

    target: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)
    name: str | None = None


#: ``emit(call, before=None) -> Node``: what a multi-node rewrite builds with (see :class:`Rewrite`)
Emit = Callable[..., fx.Node]


@dataclass(frozen=True)
class Rewrite:
    """What a rule wants: the matched node replaced by ``replacement`` and then erased.

    ``replacement``: an existing node (forwarding), a :class:`Call` to build, or for multi-node
    rewrites a builder ``build(emit) -> Node`` whose ``emit(Call, before=None)`` inserts each new
    node before the replaced one (or ``before``) with the replaced node's provenance; a builder may
    still return a :class:`Refusal` once it has built (a cost known only then): what it emitted
    is removed. ``replaces``: the node whose users move to the new one and which is erased
    (default: the matched node; attention is matched at its softmax and replaces its last matmul).
    ``dead``: nodes erased afterwards when nothing reads them (the GEMM of a fused epilogue);
    ``after``: a function called last, to erase the rest of a matched chain. ``reason`` and ``gain`` may be functions of the new node (known only once built).
    ``gain``: the estimated seconds saved (default: the node's time when forwarding, 0 when a
    call replaces it). ``counters``: the statistics this rewrite counts (default: the rule's name).
    """

    replacement: fx.Node | Call | Callable[[Emit], fx.Node]
    reason: str | Callable[[fx.Node], str]
    action: str = ""  # default: "remove" when forwarding to an existing node, else "rewrite"
    replaces: fx.Node | None = None
    dead: tuple = ()
    after: Callable[[], None] | None = None
    gain: float | None | str | Callable[[fx.Node], float | None] = "default"
    counters: tuple = ()


class Refusal(FxoptError):
    """A match a rule declines, with the reason: returned by a rule, or raised from deep inside a
    multi-node matcher. ``counter``: the statistic it counts (default ``kept_<rule name>``);
    ``gain``: the estimate that decided it, when a cost did."""

    def __init__(self, reason: str, counter: str = "", gain: float | None = None):
        super().__init__(reason)
        self.reason, self.counter, self.gain = reason, counter, gain


@dataclass(frozen=True)
class Rule:
    """A named rule for nodes whose target is one of ``targets``: ``fn(node, facts, ctx)`` returns
    a :class:`Rewrite`, a :class:`Refusal`, or None (no match). ``tagged``: decisions start with
    the rule's name (off for passes with one rule whose reasons say it all)."""

    name: str
    targets: tuple
    fn: Callable[[fx.Node, "GraphFacts", PassContext], "Rewrite | Refusal | None"]
    doc: str = ""
    tagged: bool = True


def rule_statistics(rules, **extra: str) -> dict[str, str]:
    """The named counters a rule table can produce (rewrites under the rule's name, refusals under
    ``kept_<name>``), plus ``extra`` ones: what a rule-based pass declares as its ``statistics``."""
    out = {}
    for rule in rules:
        out[rule.name] = rule.doc or rule.name
        out[f"kept_{rule.name}"] = f"{rule.name}: matches refused, each with its reason"
    return {**out, **extra}


def add_call(graph: fx.Graph, call: Call, like: fx.Node, before: fx.Node | None = None) -> fx.Node:
    """Insert ``call`` before ``like`` (or ``before``), with ``like``'s provenance and a fake ``val``;
    named ``call.name`` or like export names nodes ("permute", "permute_1", ...)."""
    hint = call.name or (call.target.overloadpacket.__name__ if isinstance(call.target, torch._ops.OpOverload)
                         else None)
    return insert_call(graph, call.target, call.args, call.kwargs, before=before if before is not None else like,
                       like=like, name=hint)


def apply_rules(gm: fx.GraphModule, ctx: PassContext, rules: list[Rule], max_sweeps: int = 8) -> Counter:
    """The one rule driver: apply ``rules`` to every node until nothing changes (at most
    ``max_sweeps`` sweeps; 1 for passes whose rewrites feed later rules in the same sweep).

    The first rule that matches a node decides it: a :class:`Rewrite` is applied, a
    :class:`Refusal` (returned or raised) is logged as ``keep`` once. Every decision goes through
    ``ctx.decide`` with its reason and estimated gain, and is counted in the returned Counter
    (see :func:`rule_statistics`). :class:`GraphFacts` are computed once per sweep, so rules must not
    introduce in-place writes (forwarding to a value that is never written, or building new
    out-of-place calls, keeps the facts true).
    """
    by_target: dict = {}
    for rule in rules:
        for t in rule.targets:
            by_target.setdefault(t, []).append(rule)
    stats: Counter = Counter()
    graph = gm.graph
    refused: set = set()
    for _ in range(max_sweeps):
        changed = False
        facts = GraphFacts(graph)
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in by_target or getattr(node, "_erased", False):
                continue
            for rule in by_target[node.target]:
                try:
                    out = rule.fn(node, facts, ctx)
                    if isinstance(out, Rewrite):
                        _apply(graph, node, rule, out, ctx, stats)
                        changed = True
                except Refusal as exc:
                    out = exc
                if isinstance(out, Refusal):
                    if (node, rule.name) not in refused:
                        refused.add((node, rule.name))
                        ctx.decide(node, "keep", _tag(rule, out.reason), out.gain)
                        stats[out.counter or f"kept_{rule.name}"] += 1
                if out is not None:
                    break
        if not changed:
            break
    return stats


def _tag(rule: Rule, reason: str) -> str:
    return f"{rule.name}: {reason}" if rule.tagged else reason


def _apply(graph: fx.Graph, node: fx.Node, rule: Rule, rw: Rewrite, ctx: PassContext, stats: Counter) -> None:
    """Apply one rewrite (see :class:`Rewrite`); a builder's Refusal is raised once its nodes are gone."""
    emitted: list[fx.Node] = []
    old = rw.replaces if rw.replaces is not None else node  # the decision stays with the matched node
    if isinstance(rw.replacement, fx.Node):
        new, action, gain = rw.replacement, rw.action or "remove", ctx.node_time(old)
    else:
        def emit(call: Call, before: fx.Node | None = None) -> fx.Node:
            emitted.append(add_call(graph, call, old, before))
            return emitted[-1]
        new = emit(rw.replacement) if isinstance(rw.replacement, Call) else rw.replacement(emit)
        if isinstance(new, Refusal):
            for n in reversed(emitted):
                graph.erase_node(n)
            raise new
        action, gain = rw.action or "rewrite", (0.0 if ctx.node_times else None)
    if rw.gain != "default":
        gain = rw.gain(new) if callable(rw.gain) else rw.gain
    ctx.decide(node, action, _tag(rule, rw.reason(new) if callable(rw.reason) else rw.reason), gain)
    old.replace_all_uses_with(new)
    graph.erase_node(old)
    for dead in rw.dead:
        if not dead.users and not getattr(dead, "_erased", False):
            graph.erase_node(dead)
    if rw.after is not None:
        rw.after()
    for counter in rw.counters or (rule.name,):
        stats[counter] += 1
