"""Graph utilities every pass-running component needs: copies, fake-tensor metadata, real runs.

The manager, the verification glue and passes that re-cost a candidate (mixed-precision) use these;
they hold no pipeline state.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any

import torch
from torch import fx, nn

from .base import PassError

__all__ = ["propagate_meta", "no_new_guards", "run_graph", "AsModule", "without_dtype_asserts", "quiet_deepcopy"]


def quiet_deepcopy(obj):
    with warnings.catch_warnings():  # torch's pytree spec copy warns about LeafSpec deprecation
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(obj)


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The placeholder values for ``gm(*args, **kwargs)`` (export graphs flatten by their in_spec)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        from torch.fx._pytree import tree_flatten_spec
        return list(tree_flatten_spec((tuple(args), dict(kwargs)), spec))
    return list(args) + list(kwargs.values())


class _FakeProp(torch.fx.Interpreter):
    """Interpret a graph on fake tensors: placeholders give their ``val``, attributes are
    converted to fakes of the same mode, every node's ``val`` is replaced by a fresh snapshot."""

    def __init__(self, gm, mode):
        super().__init__(gm, garbage_collect_values=False)
        self.mode = mode

    def placeholder(self, target, args, kwargs):
        node = self.current_node
        return node.meta["val"]

    def get_attr(self, target, args, kwargs):
        attr = super().get_attr(target, args, kwargs)
        if isinstance(attr, torch.Tensor) and not isinstance(attr, torch._subclasses.FakeTensor):
            return self.mode.from_tensor(attr, static_shapes=True)
        return attr

    def run_node(self, n):
        from torch._subclasses.fake_tensor import FakeTensor
        from torch.fx.experimental.proxy_tensor import snapshot_fake
        self.current_node = n
        result = super().run_node(n)
        if n.op == "output":
            return result

        def extract(obj):
            if isinstance(obj, FakeTensor):
                return snapshot_fake(obj)
            if isinstance(obj, torch.Tensor):
                return snapshot_fake(self.mode.from_tensor(obj, static_shapes=True))
            if isinstance(obj, (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool)):
                return obj
            return None

        meta = torch.fx.node.map_aggregate(result, extract)
        if meta is not None:
            n.meta["val"] = meta
            if isinstance(meta, torch.Tensor):
                from torch.fx.passes.shape_prop import _extract_tensor_metadata
                try:
                    n.meta["tensor_meta"] = _extract_tensor_metadata(meta)
                except Exception:
                    n.meta.pop("tensor_meta", None)
            else:
                n.meta.pop("tensor_meta", None)
        return result


def no_new_guards(gm: fx.GraphModule):
    """A context in which fake-tensor work on ``gm`` adds no guards to its shape env.

    The shape env is shared by every graph copied from one capture: a guard some op's meta
    function adds (upsample specializes the batch symbol of the driving model to its example
    value) would otherwise turn ``[s34, ...]`` into ``[2, ...]`` in the captured graph too.
    """
    from torch._guards import detect_fake_mode
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None or mode.shape_env is None:
        return contextlib.nullcontext()
    return mode.shape_env.suppress_guards()


def propagate_meta(gm: fx.GraphModule, example_args: tuple = (), example_kwargs: dict | None = None) -> None:
    """Recompute ``meta["val"]`` (and ``tensor_meta``) of every node on fake tensors.

    Placeholders keep their ``val`` (export's fake tensors, symbolic sizes included); those
    without one get a fake of the matching example input, in a fresh fake mode.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if any(v is None for v in vals):
        mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
        flat = _flat_inputs(gm, example_args, example_kwargs or {})
        if len(flat) != len(placeholders):
            raise PassError(f"cannot propagate metadata: {len(placeholders)} placeholders but {len(flat)} "
                            f"example inputs; capture the model with fxopt.capture")
        for n, x in zip(placeholders, flat):
            if n.meta.get("val") is None:
                n.meta["val"] = mode.from_tensor(x) if isinstance(x, torch.Tensor) else x
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    prop = _FakeProp(gm, mode)
    with mode, no_new_guards(gm), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        prop.run(*[n.meta["val"] for n in placeholders])


def run_graph(gm: fx.GraphModule, args: tuple, kwargs: dict, seed: int = 0, record: bool = False):
    """Run a deep copy of ``gm`` on real inputs with a fixed seed (BN statistics of ``gm`` stay
    untouched). Returns the flat outputs, and with ``record`` also {node name: value snapshot}."""
    work = quiet_deepcopy(gm)
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if record and n.op != "output":
                values[n.name] = torch.utils._pytree.tree_map(
                    lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, out)
            return out

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = Recorder(work, garbage_collect_values=not record).run(*_flat_inputs(work, args, kwargs))
    return (out, values) if record else out


class AsModule(nn.Module):
    """A graph module seen as a plain nn.Module with the same parameter names.

    Exported graph modules refuse ``.train()``/``.eval()``; this wrapper shares the submodules,
    parameters and buffers of ``state`` (default: the graph module's own; an optimized module's
    live graph reads the source model's), so names and tensors are the same, while its own
    ``train()`` only touches the (plain) submodules. What verify compares by name.
    """

    def __init__(self, gm, state: nn.Module | None = None):
        super().__init__()
        state = gm if state is None else state
        self._modules, self._parameters, self._buffers = state._modules, state._parameters, state._buffers
        object.__setattr__(self, "_gm", gm)
        object.__setattr__(self, "_state", state)

    def forward(self, *args, **kwargs):
        return self._gm(*args, **kwargs)

    def __deepcopy__(self, memo):
        gm = copy.deepcopy(self._gm, memo)
        return AsModule(gm, None if self._state is self._gm else copy.deepcopy(self._state, memo))


def without_dtype_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without export's ``_assert_tensor_metadata`` checks, so that it runs when
    verify casts it to float64 (its float64 reference copy)."""
    work = quiet_deepcopy(gm)
    for node in list(work.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default \
                and not node.users:
            work.graph.erase_node(node)
    work.recompile()
    return work
