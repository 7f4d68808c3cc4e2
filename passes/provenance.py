"""Inserting a call node on behalf of another node: the one helper passes build nodes with.

A node a pass adds (a cast, a layout conversion, a replacement op) carries the provenance meta of
the node it stands for (:data:`PROVENANCE_KEYS`: ``nn_module_stack``, ``stack_trace``,
...), so reports, roll-ups and error messages still name the user's module and source line, and a
fake ``meta["val"]``, so the rest of the same pass can read its shape and dtype before the manager
re-propagates every ``val``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx
from torch.utils._pytree import tree_map

__all__ = ["insert_call", "fake_val", "val", "PROVENANCE_KEYS"]

# meta keys that say where a node came from; copied from a replaced node to its replacement
PROVENANCE_KEYS = ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn", "from_node",
                   "seq_nr", "custom")


def fake_val(target, args, kwargs):
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


def val(node) -> Any:
    """``node.meta["val"]`` of a node (None if absent); non-nodes are returned unchanged."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def insert_call(graph: fx.Graph, target, args: tuple, kwargs: dict, *, before: fx.Node, like: fx.Node,
                name: str | None = None, fake: Callable[[fx.Node], Any] | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``before``, with ``like``'s provenance meta and a
    fake ``val``: ``fake(new_node)``, or by default the target run on its arguments' fake values
    (no ``val`` when that is not possible)."""
    with graph.inserting_before(before):
        new = graph.create_node("call_function", target, tuple(args), dict(kwargs), name=name)
    for key in PROVENANCE_KEYS:
        if key in like.meta:
            new.meta[key] = like.meta[key]
    v = fake(new) if fake is not None else fake_val(target, args, kwargs)
    if v is not None:
        new.meta["val"] = v
    return new
