"""Every private torch API fxopt relies on, in one place, each with why it is needed.

torch is pinned to ``>=2.11,<2.15`` (pyproject.toml) because of these: when a torch release moves
one, this module is where it changes. The pytree helpers are re-exported here for modules to
import (today most still import ``torch.utils._pytree`` directly, in files other helpers own); the
table ``PRIVATE_APIS`` lists every use, inline ones included (``isinstance`` checks on ``torch._ops``
classes in a few passes), and ``tests/test_ecosystem.py`` checks that every private name used
anywhere in fxopt is listed and still exists in the installed torch.
"""
from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint

import torch
# pytree: flatten/map nested inputs and outputs. Public in spirit (torch.utils.pytree is its
# successor), used by every module that walks (args, kwargs).
from torch.utils._pytree import (  # noqa: F401
    GetAttrKey,
    MappingKey,
    SequenceKey,
    tree_flatten,
    tree_flatten_with_path,
    tree_leaves,
    tree_map,
)

# dotted name -> why fxopt needs it (checked by tests/test_ecosystem.py against the installed torch)
PRIVATE_APIS: dict[str, str] = {
    "torch.utils._pytree": "flatten/map nested (args, kwargs) and outputs (inputs, verify, bench, passes)",
    "torch.utils._python_dispatch.TorchDispatchMode":
        "cost_models/trace.py records every ATen call of a training step (forward, backward, optimizer)",
    "torch._subclasses.fake_tensor.FakeTensorMode":
        "cost on fake tensors: shapes and dtypes without memory or compute (cost_models, passes/manager.py)",
    "torch._subclasses.fake_tensor.FakeTensor": "tell fake graph constants from real ones (passes/manager.py)",
    "torch._subclasses.FakeTensor": "the same class, by its package path (passes/manager.py)",
    "torch._subclasses.fake_tensor.unset_fake_temporarily":
        "codegen runs a real meta-tensor oracle while a fake mode is active (fxopt/codegen/runtime.py)",
    "torch._guards.detect_fake_mode": "reuse the graph's fake mode when re-propagating node.meta['val']",
    "torch._ops.OpOverload": "tell ATen call targets from Python callables (graph text, passes)",
    "torch._ops.OpOverloadPacket": "print an op packet's name in the canonical graph text",
    "torch._ops.HigherOrderOperator": "print torch.cond / checkpoint higher-order ops in graph text",
    "torch._dynamo.exc.UserError": "export's usage errors are capture errors, not input errors (capture.py)",
    "torch._dynamo.mark_dynamic": "named in capture.py's hint for a specialized dynamic dimension",
    "torch._dynamo.reset": "benchmarks compile each region afresh (benchmarks/fuse_regions.py)",
    "torch._dynamo.backends.registry._BACKENDS":
        "make backend='fxopt' known on `import fxopt` without the entry point being installed",
    "torch._dynamo.backends.registry.register_backend": "the fallback registration if _BACKENDS moves",
}


def resolve(dotted: str):
    """The object a ``PRIVATE_APIS`` name refers to (ImportError/AttributeError if torch moved it)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def register_dynamo_backend(name: str, target: str) -> None:
    """Make ``torch.compile(backend=name)`` find ``target`` (``"module:function"``), the way the
    ``torch_dynamo_backends`` entry point does. Registering the function itself would make dynamo's
    later entry-point load fail with "duplicate name", so the name is entered as an entry point."""
    from torch._dynamo.backends import registry
    table = getattr(registry, "_BACKENDS", None)
    if isinstance(table, dict):
        table.setdefault(name, EntryPoint(name=name, value=target, group="torch_dynamo_backends"))
        return
    if name not in registry.list_backends(exclude_tags=()):  # pragma: no cover - a future torch
        module, _, attr = target.partition(":")
        registry.register_backend(getattr(importlib.import_module(module), attr), name=name)


def dynamo_placeholder_source(node: torch.fx.Node) -> str | None:
    """Where dynamo took a graph input from, e.g. ``L['self']._modules['bn']._buffers['running_mean']``
    (None when unknown). Dynamo records it as ``node.meta['grapharg'].source``."""
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else str(name)


# Warnings torch emits from its own internals while fxopt copies, exports or traces a model: not the
# user's business (nothing they can change), so fxopt's entry points hide them. (category, message regex)
TORCH_NOISE: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # deepcopy of an exported module
)


class quiet_torch_warnings:
    """Context manager hiding ``TORCH_NOISE`` and nothing else."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        for category, message in TORCH_NOISE:
            warnings.filterwarnings("ignore", message=message, category=category)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)
