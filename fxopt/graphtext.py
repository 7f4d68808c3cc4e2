"""Canonical, deterministic text of an fx graph: what goldens store and pass diffs compare.

One line per node, in graph order::

    name = target(args, kwargs)  # shape dtype [channels_last]

* ``name`` is the node's name. Export's names are already deterministic (op name plus a
  counter in order of appearance, parameters named after their FQN), checked by capturing the
  same model in two processes (``tests/test_passes.py``), so they are kept: they are the names
  users see in reports and error messages.
* ``target`` is ``aten.op.overload`` for ATen ops, ``module.function`` for Python callables
  (``operator.getitem``), ``placeholder``, ``get_attr(fqn)``, ``output``.
* arguments print node names bare, Python values with ``repr`` (memory addresses removed).
* the comment is read from ``node.meta["val"]``: ``[2, 8, 16, 16] float32``, symbolic sizes as
  their expression (``[s77, 8, 16, 16]``), ``channels_last`` when a 4-D (or 5-D) tensor is laid
  out that way and not also plain contiguous; tuples of tensors as ``(..., ...)``; SymInts as
  ``sym <expr>``. Nodes without ``val`` get no comment.

No ids, addresses, file paths or stack traces appear, so the text is identical across runs and
machines for the same model, inputs and torch version.
"""
from __future__ import annotations

import difflib
import re

import torch
from torch import fx

from .cost_models.names import dtype_name

__all__ = ["canonical_text", "node_text", "unified_diff", "target_name", "val_text"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def target_name(node: fx.Node) -> str:
    """How a node's target prints: ``aten.add.Tensor``, ``operator.getitem``, ``get_attr(a.b)``."""
    t = node.target
    if node.op in ("placeholder", "output"):
        return node.op
    if node.op == "get_attr":
        return f"get_attr({t})"
    if node.op == "call_module":
        return f"call_module({t})"
    if node.op == "call_method":
        return f"method.{t}"
    if isinstance(t, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(t)  # "aten.view.default"
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"higher_order.{t.name()}"
    module = getattr(t, "__module__", None) or ""
    module = {"_operator": "operator", "builtins": ""}.get(module, module)
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or repr(t)
    return f"{module}.{name}" if module else name


def _arg_text(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, tuple):
        inner = ", ".join(_arg_text(x) for x in a)
        return f"({inner},)" if len(a) == 1 else f"({inner})"
    if isinstance(a, list):
        return "[" + ", ".join(_arg_text(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{_arg_text(k)}: {_arg_text(v)}" for k, v in a.items()) + "}"
    if isinstance(a, (torch.dtype, torch.memory_format, torch.layout)):
        return str(a)
    if isinstance(a, torch.device):
        return f"device({a})"
    if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(a.node.expr)
    if isinstance(a, torch.Tensor):  # a constant tensor inlined as an argument: metadata only
        return f"tensor({_shape(a)} {dtype_name(a.dtype)})"
    return _ADDRESS.sub("", repr(a))


def _dim(d) -> str:
    return str(d.node.expr) if isinstance(d, torch.SymInt) else str(d)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(_dim(d) for d in t.shape) + "]"


def _memory_format(t: torch.Tensor) -> str:
    """``channels_last`` for a 4-D (``channels_last_3d`` for 5-D) tensor in that layout only."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if fmt is None or t.layout != torch.strided:
        return ""
    try:
        cl = guard_or_false(t.is_contiguous(memory_format=fmt))
        plain = guard_or_false(t.is_contiguous())
    except Exception:  # symbolic strides that cannot be decided: say nothing
        return ""
    return (" channels_last" if t.dim() == 4 else " channels_last_3d") if cl and not plain else ""


def val_text(val) -> str:
    """The comment text of one ``meta["val"]`` (tensor, tuple of tensors, SymInt, number)."""
    if isinstance(val, torch.Tensor):
        return f"{_shape(val)} {dtype_name(val.dtype)}{_memory_format(val)}"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(val_text(v) for v in val) + ")"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"sym {val.node.expr}"
    if val is None:
        return "None"
    if isinstance(val, (bool, int, float)):
        return f"{type(val).__name__} {val!r}"
    return type(val).__name__


def node_text(node: fx.Node) -> str:
    """One canonical line for ``node``."""
    if node.op == "placeholder":
        call = f"{node.name} = placeholder()"
    elif node.op == "get_attr":
        call = f"{node.name} = {target_name(node)}"
    elif node.op == "output":
        call = f"output({', '.join(_arg_text(a) for a in node.args)})"
    else:
        parts = [_arg_text(a) for a in node.args]
        parts += [f"{k}={_arg_text(v)}" for k, v in node.kwargs.items()]
        call = f"{node.name} = {target_name(node)}({', '.join(parts)})"
    if node.op != "output" and "val" in node.meta:
        call += f"  # {val_text(node.meta['val'])}"
    return call


def canonical_text(gm: fx.GraphModule | fx.Graph) -> str:
    """The whole graph, one :func:`node_text` line per node, ending with a newline."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    return "".join(node_text(n) + "\n" for n in graph.nodes)


def unified_diff(before_text: str, after_text: str, name: str, context: int = 3) -> str:
    """A unified diff of two canonical texts (``--- name (before)`` / ``+++ name (after)``).

    Empty when the texts are equal.
    """
    lines = difflib.unified_diff(before_text.splitlines(keepends=True), after_text.splitlines(keepends=True),
                                 fromfile=f"{name} (before)", tofile=f"{name} (after)", n=context)
    out = "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    return out
