"""Activation checkpointing survives capture: regions stay regions, recomputed in backward.

``torch.export`` (non-strict) runs ``torch.utils.checkpoint``'s function inline, so the captured
graph saves every activation the user checkpointed away. During capture fxopt tags the nodes each
non-reentrant checkpoint call creates (``node.meta[AC_KEY]``, a region number; nested checkpoints
belong to the outermost one); after the passes, ``checkpoint_regions`` replaces each tagged span by
one call of ``torch.utils.checkpoint.checkpoint(region, *inputs, use_reentrant=False)`` on a
sub-graph, so the backward recomputes it as in eager. Reentrant checkpointing
(``use_reentrant=True``) cannot be captured: it is refused with what to change.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import operator
from unittest import mock

import torch
import torch.utils.checkpoint as _ckpt
from torch import fx

from .errors import CaptureError

log = logging.getLogger(__name__)

AC_KEY = "fxopt.ac_region"  # node.meta key: the checkpoint region a node was traced in
_KEEP_OUT = ("placeholder", "get_attr", "output")


class ReentrantCheckpointError(CaptureError):
    """The model uses reentrant activation checkpointing, which export cannot trace."""


class _RefuseReentrant:
    """Stands in for ``CheckpointFunction`` while capturing: a clear error instead of a trace failure."""

    @staticmethod
    def apply(function, *args):
        name = getattr(function, "__qualname__", type(function).__name__)
        raise ReentrantCheckpointError(
            f"{name} is checkpointed with use_reentrant=True (or without use_reentrant, whose default is "
            f"reentrant); its backward runs outside autograd's graph, so it cannot be captured. Pass "
            f"use_reentrant=False to torch.utils.checkpoint.checkpoint (HF: "
            f"model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={{'use_reentrant': False}}))")


@contextlib.contextmanager
def tag_checkpoint_regions():
    """While active, each outermost non-reentrant checkpoint call tags the graph nodes it traces."""
    counter = itertools.count()
    depth = [0]

    def tagging(fn, *args, **kwargs):  # replaces _checkpoint_without_reentrant_generator
        from torch.fx.experimental.proxy_tensor import get_proxy_mode
        mode = get_proxy_mode()
        if mode is None or depth[0]:  # not tracing, or inside an outer region: run inline
            yield
            return
        graph = mode.tracer.graph
        last = next(reversed(graph.nodes), None)
        region = next(counter)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1
        nodes = list(graph.nodes)
        start = nodes.index(last) + 1 if last is not None else 0
        for node in nodes[start:]:
            if node.op not in _KEEP_OUT:
                node.meta[AC_KEY] = region

    with mock.patch.object(_ckpt, "_checkpoint_without_reentrant_generator", tagging), \
            mock.patch.object(_ckpt, "CheckpointFunction", _RefuseReentrant):
        yield


def _checkpointed(region: fx.GraphModule, *args):
    return _ckpt.checkpoint(region, *args, use_reentrant=False)


def regions_of(graph: fx.Graph) -> dict[int, list[fx.Node]]:
    """Region number -> its nodes: every computing node from the region's first to its last tagged
    node (a node a pass inserted inside the span belongs to it)."""
    nodes = list(graph.nodes)
    spans: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        if AC_KEY in node.meta:
            spans.setdefault(node.meta[AC_KEY], [i, i])[1] = i
    return {r: [n for n in nodes[a:b + 1] if n.op not in _KEEP_OUT] for r, (a, b) in spans.items()}


def checkpoint_regions(gm: fx.GraphModule) -> int:
    """Replace each tagged region of ``gm`` (in place) by a checkpointed call of a sub-graph; returns
    how many regions were wrapped."""
    regions = regions_of(gm.graph)
    for region, nodes in regions.items():
        inside = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        sub = fx.Graph()
        env = {a: sub.placeholder(a.name) for a in inputs}
        for n in nodes:
            env[n] = sub.node_copy(n, lambda a: env[a])
        sub.output(tuple(env[o] for o in outputs))
        name = f"_fxopt_ac_region{region}"
        gm.add_submodule(name, fx.GraphModule(torch.nn.Module(), sub, class_name="CheckpointRegion"))
        with gm.graph.inserting_before(nodes[0]):
            fn = gm.graph.get_attr(name)
            call = gm.graph.call_function(_checkpointed, (fn, *inputs))
            for i, o in enumerate(outputs):
                got = gm.graph.call_function(operator.getitem, (call, i))
                got.meta = dict(o.meta)
                o.replace_all_uses_with(got)
        for n in reversed(nodes):
            gm.graph.erase_node(n)
        log.info("checkpoint region %d: %d nodes recomputed in backward (%d inputs, %d outputs)",
                 region, len(nodes), len(inputs), len(outputs))
    if regions:
        gm.graph.lint()
        gm.recompile()
    return len(regions)
