"""``torch.compile(model, backend="fxopt")``: fxopt as a TorchDynamo backend.

Dynamo hands a backend one fx graph per region it could trace (a graph break gives several) and
the example inputs of that graph. The backend here runs fxopt's usual path on each region:
``fxopt.optimize`` captures it with ``torch.export`` (non-strict, ATen level), runs the pass
pipeline, verifies, and the returned callable runs the rewritten graph.

Why not ``aot_autograd``: fxopt's IR is the forward ATen graph that ``torch.export`` gives, trained
by ordinary autograd through its ops (the same as ``fxopt.optimize``, so the same passes, cost
model and verifier apply). AOTAutograd would hand fxopt separate forward and backward graphs its
passes were not written for. The price: the backward is eager autograd of the rewritten forward.

Dynamo passes a module's parameters and buffers as graph inputs. They are bound here as the
parameters and buffers of a small module (``_DynamoRegion``) with their original names, so the
passes see weights as weights (BN folding, weight casts), verification perturbs only the true
inputs, and gradients and BN statistics land in the user's own tensors, as with any backend.
Each region is specialized to its input shapes; a new shape (or a ``dynamic=True`` graph called
with new sizes) is captured again, like ``fxopt.optimize``'s per-signature graphs.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import fx, nn

from ._torch_private import dynamo_placeholder_source, quiet_torch_warnings, register_dynamo_backend
from .errors import FxoptError

log = logging.getLogger(__name__)

NAME = "fxopt"
# options={...} key -> fxopt.optimize keyword (one table: the error message lists the keys)
OPTIONS = {
    "pipeline": "pipeline",
    "verify": "verify",
    "backend": "backend",
    "hardware": "hardware",
    "hw": "hardware",
    "dump_dir": "dump_dir",
    "print_after_change": "print_after_change",
}


class BackendOptionsError(FxoptError, ValueError):
    """``torch.compile(..., backend="fxopt", options=...)`` got an option fxopt does not know."""


def optimize_kwargs(options: dict | None, mode: str | None = None) -> dict:
    """Map ``torch.compile``'s ``options``/``mode`` to ``fxopt.optimize`` keywords; refuse unknown ones."""
    if mode not in (None, "default"):
        raise BackendOptionsError(f"torch.compile(mode={mode!r}) has no meaning for the fxopt backend; "
                                  f"drop mode= and choose passes with options={{'pipeline': ...}}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise BackendOptionsError(f"unknown fxopt backend option(s) {unknown}; known: {sorted(OPTIONS)} "
                                  f"(they are fxopt.optimize's arguments)")
    return {OPTIONS[k]: v for k, v in options.items()}


# ---- a dynamo region as an nn.Module ---------------------------------------------------------
_STEP = re.compile(r"\.(?:_modules|_parameters|_buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)|\[(\d+)\]")


def _state_name(source: str) -> str | None:
    """``L['self']._modules['bn']._buffers['running_mean']`` -> ``bn.running_mean``; None for inputs."""
    head = re.match(r"L\['[^']+'\]", source)
    if head is None or source == head.group(0):
        return None  # a local of the compiled function: a true input
    steps, pos = [], head.end()
    for m in _STEP.finditer(source, pos):
        if m.start() != pos:
            return None
        steps.append(next(g for g in m.groups() if g is not None))
        pos = m.end()
    return ".".join(steps) if pos == len(source) and steps else None


@dataclass(frozen=True)
class _Slot:
    """One graph input: a true input (``name`` None), or module state bound under ``name``."""

    name: str | None
    parameter: bool = False


class _DynamoRegion(nn.Module):
    """A dynamo graph whose module-state inputs are this module's parameters and buffers."""

    def __init__(self, gm: fx.GraphModule, slots: Sequence[_Slot], state: Sequence):
        super().__init__()
        object.__setattr__(self, "_region_graph", gm)
        self._slots = tuple(slots)
        for slot, value in zip(slots, state):
            if slot.name is None:
                continue
            prefix, _, leaf = slot.name.rpartition(".")
            owner = self
            for part in prefix.split(".") if prefix else ():
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            if slot.parameter:
                owner.register_parameter(leaf, value)
            else:
                owner.register_buffer(leaf, value, persistent=False)

    def forward(self, *inputs):
        it = iter(inputs)
        args = [next(it) if s.name is None else self.get_parameter(s.name) if s.parameter
                else self.get_buffer(s.name) for s in self._slots]
        return self._region_graph(*args)


def _slots(gm: fx.GraphModule, example_inputs: Sequence) -> list[_Slot]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise FxoptError(f"dynamo gave {len(example_inputs)} example inputs for {len(placeholders)} graph "
                         f"inputs; report this with your torch version ({torch.__version__})")
    slots, taken = [], set()
    for node, value in zip(placeholders, example_inputs):
        source = dynamo_placeholder_source(node)
        name = _state_name(source) if source and isinstance(value, torch.Tensor) else None
        if name is not None and name in taken:
            name = None  # the same tensor reached twice: let it be an input the second time
        if name is not None:
            taken.add(name)
            slots.append(_Slot(name, isinstance(value, nn.Parameter)))
        else:
            slots.append(_Slot(None))
    return slots


def _share_state(opt: nn.Module, region: _DynamoRegion) -> None:
    """Point the optimized module's (copied) parameters and buffers back at the user's tensors: a
    compiled model trains the model's own weights, as every torch.compile backend does."""
    for name, tensor in list(region.named_parameters()) + list(region.named_buffers()):
        prefix, _, leaf = name.rpartition(".")
        owner = opt.get_submodule(prefix)
        table = owner._parameters if leaf in owner._parameters else owner._buffers
        table[leaf] = tensor


class CompiledRegion:
    """What the backend returns for one dynamo graph: runs its fxopt-optimized version."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence, kwargs: dict):
        self._gm, self._kwargs = gm, kwargs
        self._slots = _slots(gm, example_inputs)
        self._training = torch.is_grad_enabled()
        self._state: list | None = None
        self.optimized = None  # the fxopt.OptimizedModule, built with the first call's state

    def _build(self, state: list) -> None:
        from .optimize import optimize
        region = _DynamoRegion(self._gm, self._slots, state).train(self._training)
        opt = optimize(region, **self._kwargs)  # captured on the first call, with real inputs
        _share_state(opt, region)
        self.optimized, self._state = opt, state

    def __call__(self, *args):
        state = [a if s.name is not None else None for s, a in zip(self._slots, args)]
        if self._state is None or any(a is not b for a, b in zip(state, self._state)):
            if self._state is not None:
                log.info("fxopt backend: a parameter or buffer tensor was replaced; capturing the region again")
            self._build(state)
        with quiet_torch_warnings():  # a first call per input shape captures: hide torch's own noise
            return self.optimized(*(a for s, a in zip(self._slots, args) if s.name is None))

    @property
    def report(self):
        """The fxopt report of this region (after its first call)."""
        return self.optimized.report


def fxopt_backend(gm: fx.GraphModule, example_inputs: Sequence, *, options: dict | None = None,
                  mode: str | None = None) -> Callable:
    """The TorchDynamo backend: ``torch.compile(model, backend="fxopt", options={...})``.

    ``options`` are ``fxopt.optimize``'s arguments: ``pipeline``, ``verify``, ``backend``
    (``eager``/``triton``/``inductor``), ``hardware``, ``dump_dir``, ``print_after_change``.
    """
    kwargs = optimize_kwargs(options, mode)
    region = CompiledRegion(gm, example_inputs, kwargs)
    log.info("fxopt backend: region with %d nodes, %d inputs (%d module tensors)", len(gm.graph.nodes),
             len(region._slots), sum(s.name is not None for s in region._slots))
    return region


def register() -> None:
    """Make ``backend="fxopt"`` known to dynamo (also done by the ``torch_dynamo_backends`` entry point)."""
    register_dynamo_backend(NAME, f"{__name__}:fxopt_backend")
