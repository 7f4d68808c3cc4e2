"""``dce``: remove nodes whose results nobody uses and whose only effect is that result.

A dead node is kept when one rule of :data:`KEEP_RULES` gives a reason: it writes into an
argument (``add_`` on ``num_batches_tracked``, ``copy_`` into a buffer), updates batch-norm
running statistics (``batch_norm(..., training=True)`` does so without saying it in its
schema), draws random numbers (removing it would shift the random stream of every later
random op, so dropout masks would change), or torch marks it side-effecting (asserts,
profiler ranges, effectful ops). Unused ``get_attr`` nodes go; their parameters stay on the
module, so parameter names and ``state_dict`` do not change.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
from torch import fx

from .base import Option, Pass, PassContext, PassResult, register
from .rewrite import HIDDEN_WRITES, _writes

__all__ = ["DeadCodeElimination", "KEEP_RULES", "keep_reason"]


def _graph_boundary(node: fx.Node) -> str | None:
    return f"{node.op} is part of the graph's signature" if node.op in ("placeholder", "output") else None


def _writes_argument(node: fx.Node) -> str | None:
    written = _writes(node)
    if not written:
        return None
    if node.target in HIDDEN_WRITES:
        return f"updates running statistics {', '.join(w.name for w in written)} in place"
    return f"writes into {', '.join(w.name for w in written)} in place"


def _random(node: fx.Node) -> str | None:
    tags = getattr(node.target, "tags", ())
    if torch.Tag.nondeterministic_seeded in tags or getattr(node.target, "_nondeterministic_seeded", False):
        return "draws random numbers; removing it would change the random stream of later ops"
    return None


def _side_effect(node: fx.Node) -> str | None:
    if node.op == "call_function" and node.is_impure():
        return "torch marks it side-effecting (assert, profiler, effectful op)"
    return None


def _opaque_call(node: fx.Node) -> str | None:
    if node.op in ("call_module", "call_method"):
        return f"{node.op} {node.target!r}: fxopt cannot prove it has no side effect"
    return None


# (rule name, reason-or-None). Order is the order reasons are reported in.
KEEP_RULES: list[tuple[str, Callable[[fx.Node], str | None]]] = [
    ("graph-boundary", _graph_boundary),
    ("writes-argument", _writes_argument),
    ("random", _random),
    ("side-effect", _side_effect),
    ("opaque-call", _opaque_call),
]


def keep_reason(node: fx.Node) -> tuple[str, str] | None:
    """``(rule, reason)`` of the first keep rule that holds for ``node``, else None."""
    for name, rule in KEEP_RULES:
        reason = rule(node)
        if reason:
            return name, reason
    return None


@register
class DeadCodeElimination(Pass):
    name = "dce"
    summary = "remove unused side-effect-free nodes (keeps in-place updates, BN statistics, random ops)"
    options = {"log_kept": Option(bool, True, "log a decision for each dead node kept for a side effect")}
    statistics = {"removed": "dead nodes removed",
                  **{f"kept_{name}": f"dead nodes kept: {name}" for name, _ in KEEP_RULES}}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        graph = gm.graph
        stats: Counter = Counter()
        log = []  # (node name, action, reason, gain) collected users-first, logged in graph order
        for node in reversed(list(graph.nodes)):  # users before producers: chains go in one sweep
            if node.users:
                continue
            keep = keep_reason(node)
            if keep is not None:
                if node.op not in ("placeholder", "output"):
                    stats[f"kept_{keep[0]}"] += 1
                    if ctx.options.get("log_kept", True):
                        log.append((node.name, "keep", keep[1], None))
                continue
            reason = ("unused get_attr (the tensor stays on the module)" if node.op == "get_attr"
                      else f"result of {node.target} is never used")
            log.append((node.name, "remove", reason, ctx.node_time(node)))
            graph.erase_node(node)
            stats["removed"] += 1
        for entry in reversed(log):
            ctx.decide(*entry)
        return PassResult(gm, stats["removed"] > 0, dict(stats))
