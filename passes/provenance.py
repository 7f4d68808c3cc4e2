"""Inserting a call node on behalf of another node: the one helper passes build nodes with.

A node a pass adds (a cast, a layout conversion, a replacement op) carries the provenance meta of
the node it stands for (:data:`~.rewrite.PROVENANCE_KEYS`: ``nn_module_stack``, ``stack_trace``,
...), so reports, roll-ups and error messages still name the user's module and source line, and a
fake ``meta["val"]``, so the rest of the same pass can read its shape and dtype before the manager
re-propagates every ``val``.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import fx

__all__ = ["insert_call"]


def insert_call(graph: fx.Graph, target, args: tuple, kwargs: dict, *, before: fx.Node, like: fx.Node,
                name: str | None = None, fake: Callable[[fx.Node], Any] | None = None) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` before ``before``, with ``like``'s provenance meta and a
    fake ``val``: ``fake(new_node)``, or by default the target run on its arguments' fake values
    (no ``val`` when that is not possible)."""
    from .rewrite import PROVENANCE_KEYS, _fake_val  # here, so that rewrite.py can build on this module

    with graph.inserting_before(before):
        new = graph.create_node("call_function", target, tuple(args), dict(kwargs), name=name)
    for key in PROVENANCE_KEYS:
        if key in like.meta:
            new.meta[key] = like.meta[key]
    v = fake(new) if fake is not None else _fake_val(target, args, kwargs)
    if v is not None:
        new.meta["val"] = v
    return new
