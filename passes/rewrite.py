"""Small-rule rewriting: a rule looks at one node and returns a :class:`Rewrite` or ``None``.

Passes are tables of :class:`Rule` s applied by :func:`apply_rules`, plus the graph facts the
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
from torch.utils._pytree import tree_map

from .base import PassContext

__all__ = ["Rule", "Rewrite", "Call", "GraphFacts", "apply_rules", "add_call", "val", "same_layout",
           "PROVENANCE_KEYS"]

aten = torch.ops.aten

# meta keys that say where a node came from; copied from a replaced node to its replacement
PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn", "from_node",
                   "seq_nr", "custom")

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


def val(node) -> Any:
    """``node.meta["val"]`` of a node (None if absent); non-nodes are returned unchanged."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


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

    def __post_init__(self):
        self.written = {self.root(w) for n in self.graph.nodes for w in _writes(n)}

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
    """A node to build: ``target(*args, **kwargs)``."""

    target: Callable
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Rewrite:
    """What a rule wants: use ``replacement`` (an existing node, or a :class:`Call` to build)
    instead of the matched node, which is then erased."""

    replacement: fx.Node | Call
    reason: str
    action: str = ""  # default: "remove" when forwarding to an existing node, else "rewrite"


@dataclass(frozen=True)
class Rule:
    """A named rewrite rule for nodes whose target is one of ``targets``."""

    name: str
    targets: tuple
    fn: Callable[[fx.Node, GraphFacts, PassContext], Rewrite | None]
    doc: str = ""


def _fake_val(target, args, kwargs):
    """Run ``target`` on the fake ``val`` s of its arguments (None when that is not possible)."""
    from torch._guards import detect_fake_mode

    fargs, fkwargs = tree_map(val, (args, kwargs))
    leaves = [x for x in torch.utils._pytree.tree_leaves((fargs, fkwargs)) if isinstance(x, torch.Tensor)]
    mode = detect_fake_mode(leaves)
    if mode is None:
        return None
    try:
        with mode:
            return target(*fargs, **fkwargs)
    except Exception:  # the manager's propagation will report real problems
        return None


def add_call(graph: fx.Graph, call: Call, like: fx.Node) -> fx.Node:
    """Insert ``call`` before ``like``, with ``like``'s provenance meta and a fresh fake ``val``."""
    hint = call.target.overloadpacket.__name__ if isinstance(call.target, torch._ops.OpOverload) else None
    with graph.inserting_before(like):  # named like export names nodes: "permute", "permute_1", ...
        new = graph.create_node("call_function", call.target, tuple(call.args), dict(call.kwargs), name=hint)
    for key in PROVENANCE_KEYS:
        if key in like.meta:
            new.meta[key] = like.meta[key]
    fake = _fake_val(call.target, call.args, call.kwargs)
    if fake is not None:
        new.meta["val"] = fake
    return new


def apply_rules(gm: fx.GraphModule, ctx: PassContext, rules: list[Rule], max_sweeps: int = 8) -> Counter:
    """Apply ``rules`` to every node until nothing matches (at most ``max_sweeps`` sweeps).

    The first matching rule wins for a node. Every rewrite is logged with ``ctx.decide`` and
    counted under the rule's name in the returned Counter. :class:`GraphFacts` are computed once
    per sweep, so rules must not introduce in-place writes (forwarding a node to a value that is
    never written, or building a new out-of-place call, keeps the facts true).
    """
    by_target: dict = {}
    for rule in rules:
        for t in rule.targets:
            by_target.setdefault(t, []).append(rule)
    stats: Counter = Counter()
    graph = gm.graph
    costed = bool(ctx.node_times)
    for _ in range(max_sweeps):
        changed = False
        facts = GraphFacts(graph)
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in by_target or getattr(node, "_erased", False):
                continue
            for rule in by_target[node.target]:
                rw = rule.fn(node, facts, ctx)
                if rw is None:
                    continue
                if isinstance(rw.replacement, fx.Node):
                    new, action = rw.replacement, rw.action or "remove"
                    gain = ctx.node_time(node)
                else:
                    new, action = add_call(graph, rw.replacement, node), rw.action or "rewrite"
                    gain = 0.0 if costed else None
                ctx.decide(node, action, f"{rule.name}: {rw.reason}", gain)
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                stats[rule.name] += 1
                changed = True
                break
        if not changed:
            break
    return stats
