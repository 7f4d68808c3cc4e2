"""What keeps an ``OptimizedModule`` honest about the module tree it was captured from.

A captured graph is specialized to the module tree at capture: which submodules exist, their modes,
the shapes of their tensors, the Python attributes forward read, the hooks that existed. fxopt
keeps the graph *reading* parameters and buffers from the live tree at every call (so
``load_state_dict(assign=True)``, ``m.weight = nn.Parameter(...)``, ``functional_call`` and FSDP's
unsharded parameters are used), and checks the rest cheaply on each call (identity and metadata
comparisons, like ``torch.compile``'s guards): a change recaptures, a hook that the graph cannot
run is refused with what to do.
"""
from __future__ import annotations

import logging
import operator
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.utils.hooks import RemovableHandle

from .cost_models.names import dtype_name
from .errors import FxoptError, InputError

log = logging.getLogger(__name__)

LIVE = "_fxopt_live"  # attribute of a run graph module: the live module tree its get_attr nodes read

# Per-module hook dicts that a captured graph never calls (it calls no submodules).
HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
# Everything that makes up a module's call hooks; the root's move to the OptimizedModule.
ROOT_HOOK_STATE = HOOK_DICTS + ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
                                "_forward_hooks_always_called", "_is_full_backward_hook")
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")


class HookError(FxoptError, ValueError):
    """A module hook the captured graph would never call."""


def _hook_name(hook) -> str:
    fn = getattr(hook, "__func__", hook)
    code = getattr(fn, "__code__", None)
    where = f" ({code.co_filename}:{code.co_firstlineno})" if code else ""
    return f"{getattr(fn, '__qualname__', type(hook).__name__)}{where}"


def foreign_hooks(root: nn.Module, prefix: str = "") -> list[str]:
    """'kind on name: hook' for every hook on a submodule of ``root`` (not ``root`` itself) that the
    graph would not call."""
    found = []
    for name, module in root.named_modules():
        if module is root:
            continue
        for kind in HOOK_DICTS:
            for hook in getattr(module, kind, {}).values():
                found.append(f"{kind.strip('_')[:-1]} on {prefix}{name}: {_hook_name(hook)}")
    return found


def refuse_foreign_hooks(root: nn.Module, when: str) -> None:
    found = foreign_hooks(root)
    if not found:
        return
    fsdp = any(type(m).__name__.startswith("FSDP") for _, m in root.named_modules() if m is not root)
    advice = ("fully_shard the OptimizedModule as one unit (fully_shard(opt)), not its submodules: the "
              "optimized graph does not call submodules, so per-layer FSDP hooks cannot run"
              if fsdp else
              "remove them, or register them on the OptimizedModule itself, whose hooks run as in eager")
    raise HookError(f"{when}, the model has hooks on submodules, which the optimized graph never calls "
                    f"(it runs one captured graph, not the submodules): {'; '.join(found[:5])}"
                    f"{f' (and {len(found) - 5} more)' if len(found) > 5 else ''}. To fix: {advice}.")


def move_root_hooks(source: nn.Module, target: nn.Module) -> None:
    """The root's hooks run around the graph (on ``target``) as eager runs them around forward; they
    leave ``source`` so capture does not trace them into the graph as well."""
    for attr in ROOT_HOOK_STATE:
        if hasattr(source, attr):
            object.__setattr__(target, attr, getattr(source, attr))
            object.__setattr__(source, attr, type(getattr(source, attr))())


def warn_global_hooks(state: dict) -> None:
    import torch.nn.modules.module as mm
    if not state.get("warned_global") and any(getattr(mm, g, None) for g in _GLOBAL_HOOKS):
        state["warned_global"] = True
        warnings.warn("global module hooks (torch.nn.modules.module.register_module_forward_hook, ...) "
                      "fire for the OptimizedModule only, not for its submodules: the optimized graph "
                      "does not call them", stacklevel=3)


def refuse_wrapped(model: nn.Module) -> None:
    """Sharded or wrapped models are optimized from the inside: their parameters are DTensors or
    their wrapper's hooks gather them, which a private copy cannot reproduce."""
    from torch.nn.parallel import DistributedDataParallel
    wrapped = [name or type(model).__name__ for name, m in model.named_modules()
               if type(m).__name__.startswith("FSDP") or isinstance(m, DistributedDataParallel)
               or "FullyShardedDataParallel" in type(m).__name__]
    dtensor = any(type(p).__name__ == "DTensor" for p in model.parameters())
    if wrapped or dtensor:
        raise InputError(
            f"optimize() got a sharded or distributed-wrapped model ({', '.join(wrapped) or 'DTensor parameters'}). "
            f"Optimize the plain model first, then wrap the OptimizedModule: "
            f"opt = fxopt.optimize(model, x); fully_shard(opt) or DistributedDataParallel(opt)")


def live_graph(gm: fx.GraphModule, source: nn.Module) -> fx.GraphModule:
    """A copy of ``gm`` whose ``get_attr`` nodes read ``source``'s tensors at every call: each target
    that names a tensor of ``source`` becomes ``_fxopt_live.<target>``, ``_fxopt_live`` being
    ``source`` itself (a plain attribute, so the graph module holds no copy of the weights;
    ``ExportedProgram.module()`` holds copies)."""
    run = _copy(gm)
    for node in run.graph.nodes:
        if node.op == "get_attr" and isinstance(_resolve(source, node.target), torch.Tensor):
            prefix, _, leaf = node.target.rpartition(".")
            owner = run.get_submodule(prefix)
            for kind in ("_parameters", "_buffers"):  # drop the copied reference: no stale weights held
                getattr(owner, kind).pop(leaf, None)
            owner.__dict__.pop(leaf, None)
            node.target = f"{LIVE}.{node.target}"
    return _attach(run, source)


def copy_live(gm: fx.GraphModule) -> fx.GraphModule:
    """An independent copy of a live graph module, reading the same tree."""
    return _attach(_copy(gm), gm.__dict__[LIVE])


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, {}))
    run = fx.GraphModule(gm, graph, class_name=type(gm).__name__)  # copies what get_attr nodes name
    run.meta = gm.meta
    return run


def _attach(run: fx.GraphModule, source: nn.Module) -> fx.GraphModule:
    run._modules.pop(LIVE, None)  # GraphModule copied the live tensors it found: read them live instead
    object.__setattr__(run, LIVE, source)
    run.recompile()
    return run


def _resolve(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


_LIBRARY_PATHS = ("/torch/", "/fxopt/", "/passes/", "/cost_models/", "/unittest/", "<frozen", "contextlib")


def _user_frame(frame) -> str | None:
    """file:line of ``frame`` when it is the user's code (not torch's or fxopt's), else None."""
    name = frame.f_code.co_filename
    return None if any(p in name for p in _LIBRARY_PATHS) else f"{name}:{frame.f_lineno}"


_PLAIN = (bool, int, float, str, type(None))


@dataclass
class PythonState:
    """Python attributes of modules that forward read or wrote while being captured."""

    reads: dict = field(default_factory=dict)   # (id(module), attr) -> (module, attr, value, where)
    writes: dict = field(default_factory=dict)  # (id(module), attr) -> (module, attr, where)

    def only(self, model: nn.Module) -> "PythonState":
        """The part about ``model``'s own modules (export also sets attributes on its own objects)."""
        ids = {id(m) for m in model.modules()}
        return PythonState({k: v for k, v in self.reads.items() if k[0] in ids},
                           {k: v for k, v in self.writes.items() if k[0] in ids})

    def guards(self) -> list[tuple]:
        """(module __dict__, attr, value, where) for plain values read and not written during capture."""
        return [(m.__dict__, a, v, w) for k, (m, a, v, w) in self.reads.items() if k not in self.writes]


class record_python_state:
    """Context manager: record plain-attribute reads and writes on modules from user code."""

    def __init__(self):
        self.state = PythonState()

    def __enter__(self):
        state = self.state
        self._get, self._set = nn.Module.__getattribute__, nn.Module.__setattr__
        orig_set = self._set

        def getattribute(module, name):
            value = object.__getattribute__(module, name)
            if type(value) in _PLAIN and name != "training" and not name.startswith("_"):
                if name in object.__getattribute__(module, "__dict__"):
                    key = (id(module), name)
                    if key not in state.reads:
                        where = _user_frame(sys._getframe(1))
                        if where:
                            state.reads[key] = (module, name, value, where)
            return value

        def setattr_(module, name, value):
            if type(value) in _PLAIN and name != "training" and not name.startswith("_"):
                where = _user_frame(sys._getframe(1))
                if where:
                    state.writes.setdefault((id(module), name), (module, name, where))
            orig_set(module, name, value)

        nn.Module.__getattribute__ = getattribute
        nn.Module.__setattr__ = setattr_
        return state

    def __exit__(self, *exc):
        del nn.Module.__getattribute__  # back to object.__getattribute__ (nn.Module defines none)
        nn.Module.__setattr__ = self._set
        return False


def warn_python_writes(state: PythonState, names: dict) -> None:
    """Forward changed Python state while being captured: the graph will not repeat that."""
    for (key, (module, attr, where)) in state.writes.items():
        warnings.warn(f"{names.get(id(module), type(module).__name__)}.{attr} is assigned in forward (at "
                      f"{where}); the captured graph does not run Python code, so that assignment happens "
                      f"once, at capture, not on every call. Keep such state outside forward, or as a "
                      f"tensor buffer updated in place.", stacklevel=4)


class TreeState:
    """The module tree a set of graphs was captured from, checked cheaply on every call (the checks
    map C-level ``dict.get`` and ``is`` over precomputed lists: tens of microseconds for a ResNet-50)."""

    def __init__(self, root: nn.Module):
        modules = list(root.named_modules(remove_duplicate=False))
        self.names = {id(m): (name or "<root>") for name, m in modules}
        edges = [(m, k, c) for _, m in modules for k, c in m._modules.items()]
        self.parents = [m for m, _, _ in edges]
        self.edge_dicts = [m._modules for m, _, _ in edges]
        self.edge_keys = [k for _, k, _ in edges]
        self.children = [c for _, _, c in edges]
        unique = {id(m): m for _, m in modules}.values()
        slots = [(m._parameters, k) for m in unique for k in m._parameters] + \
                [(m._buffers, k) for m in unique for k in m._buffers]
        self.slot_dicts = [d for d, _ in slots]
        self.slot_keys = [k for _, k in slots]
        self.seen = list(map(dict.get, self.slot_dicts, self.slot_keys))
        self.meta = [_meta(t) for t in self.seen]
        self.hook_id = RemovableHandle.next_id

    def modes(self) -> tuple:
        return tuple(map(_TRAINING, self.children))

    def changed(self) -> str | None:
        """Why the graphs no longer fit the tree, or None: a replaced submodule, or a parameter or
        buffer with a new shape, dtype or device (new tensors of the same kind are read live)."""
        if not all(map(operator.is_, map(dict.get, self.edge_dicts, self.edge_keys), self.children)):
            for parent, name, child in zip(self.parents, self.edge_keys, self.children):
                if parent._modules.get(name) is not child:
                    return f"submodule {self.names.get(id(parent), '?')}.{name} was replaced"
        now = list(map(dict.get, self.slot_dicts, self.slot_keys))
        if not all(map(operator.is_, now, self.seen)):
            for k, t, m in zip(self.slot_keys, now, self.meta):
                if _meta(t) != m:
                    return f"tensor {k} changed from {_fmt_meta(m)} to {_fmt_meta(_meta(t))}"
            self.seen = now
        return None

    def recheck_metadata(self) -> None:
        """After .to()/.double(): tensors keep their identity but may change dtype or device."""
        self.seen = [None] * len(self.slot_keys)


_TRAINING = operator.attrgetter("training")


def _meta(t):
    return None if t is None else (tuple(t.shape), t.dtype, t.device.type)


def _fmt_meta(m) -> str:
    return "None" if m is None else f"{dtype_name(m[1])}{list(m[0])} on {m[2]}"
