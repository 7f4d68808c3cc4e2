"""Capture a model into fxopt's one IR: the ATen-level graph of ``torch.export`` (non-strict).

Non-strict export captures ordinary real models (HF, timm, torchvision) that
``symbolic_trace`` cannot, keeps the original parameter FQNs, and fills
``node.meta["val"]`` (fake tensors), ``nn_module_stack`` and ``stack_trace``.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.utils._pytree import tree_flatten, tree_map

from .errors import CaptureError, FxoptError, InputError

logger = logging.getLogger(__name__)

Inputs = Any  # a tensor, a tuple of positional inputs, or a dict of keyword inputs

# Known export failure signatures -> what the user can try. Matched in order on the message.
_EXPORT_HINTS: list[tuple[str, str]] = [
    (r"data[- ]dependent|GuardOnDataDependentSymNode|item\(\)|nonzero",
     "the model branches on tensor values; replace Python `if` on tensors with torch.where/torch.cond, "
     "or move that code into a leaf module registered with torch.library.custom_op"),
    (r"Constraints violated|specializ|guard",
     "a dynamic dimension was specialized; try dynamic_batch=False, or mark the dimension with "
     "torch._dynamo.mark_dynamic / torch.export.Dim with a valid range"),
    (r"DynamicCache|Cache\b",
     "the model returns a KV cache; build it with config.use_cache=False for training"),
    (r"Unsupported|not supported|unsupported",
     "an operation export cannot trace; wrap it in a leaf module (torch.library.custom_op) or rewrite it "
     "with torch ops"),
    (r"", "simplify the failing line, or report it with the stack trace below"),
]


# Messages of torch's shape checks: an input that does not fit the model, not an export failure.
_SHAPE_WORDS = ("mat1 and mat2 shapes", "size of tensor a", "must match the size", "Given groups",
                "expected input", "Expected", "shape '[", "size mismatch", "input channels",
                "ension out of range", "not enough values to unpack")


@dataclass
class Captured:
    """The captured graph of a model plus what fxopt needs to run, cost and rebuild it."""

    graph_module: fx.GraphModule
    example_args: tuple
    example_kwargs: dict
    training: bool
    dynamic_batch: bool = False
    source_name: str = ""
    symbols: dict[str, str] = field(default_factory=dict)  # export symbol name -> user name
    python_state: Any = None  # fxopt.live.PythonState: module attributes forward read/wrote at capture

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def __call__(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)


def normalize_inputs(example_inputs: Inputs) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of kwargs."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise InputError(
        f"example inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs; "
        f"got {type(example_inputs).__name__}")


def _batch_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Mark dim 0 of every top-level tensor input as the one symbol ``batch`` (keyed by arg name)."""
    batch = Dim("batch")
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(f"the example inputs do not match {type(model).__name__}.forward: {exc}") from exc
    spec = lambda v: {0: batch} if isinstance(v, torch.Tensor) and v.dim() > 0 else None
    return {name: tree_map(spec, v) for name, v in bound.arguments.items()}


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback line that is the user's code (not torch, not fxopt)."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if "/torch/" not in f.filename and "/fxopt/" not in f.filename
            and "site-packages/torch" not in f.filename]
    msg = str(exc)
    m = re.search(r'File "([^"]+)", line (\d+)', msg)
    if user:
        f = user[-1]
        return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"
    if m:
        return f"{m.group(1)}:{m.group(2)}"
    return "(no user frame in the stack trace)"


def _check_inputs_fit(model: nn.Module, args: tuple, kwargs: dict, exc: BaseException) -> None:
    """Turn input mismatches (TypeError, shape errors on the first layers) into InputError."""
    text = str(exc)
    if isinstance(exc, TypeError) and ("argument" in text or "positional" in text):
        raise InputError(f"the example inputs do not match {type(model).__name__}.forward: {text}. "
                         f"Pass a tuple of positional inputs or a dict of keyword inputs.") from exc
    if isinstance(exc, torch._dynamo.exc.UserError):  # export's own usage errors are capture errors
        return
    if isinstance(exc, (RuntimeError, ValueError, IndexError)) and any(w in text for w in _SHAPE_WORDS):
        shapes = [tuple(a.shape) for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        raise InputError(f"the example inputs (shapes {shapes}) do not fit {type(model).__name__}: "
                         f"{text.splitlines()[0]} (at {_user_frame(exc)}). "
                         f"Check the input shape, channel count and dtype the model expects.") from exc


def capture(model: nn.Module, example_inputs: Inputs, dynamic_batch: bool = False) -> Captured:
    """Export ``model`` (non-strict) to an ATen-level GraphModule without touching it.

    The model is deep-copied first, so export's tracing can never change the user's
    parameters, buffers or training flag.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"capture() needs an nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    return capture_module(copy.deepcopy(model), args, kwargs, dynamic_batch, name=type(model).__name__)


def capture_module(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool = False,
                   name: str | None = None) -> Captured:
    """Export ``model`` itself: the graph shares its parameter and buffer tensors (BN running
    statistics update in place). ``capture`` calls this on a private copy."""
    name = name or type(model).__name__
    if not any(isinstance(v, torch.Tensor) for v in tree_flatten((args, kwargs))[0]):
        raise InputError("example inputs contain no tensor; pass the tensors the model's forward takes")
    from .checkpointing import tag_checkpoint_regions
    from .live import record_python_state, warn_python_writes
    dynamic_shapes = _batch_dynamic_shapes(model, args, kwargs) if dynamic_batch else None
    def export(recorder):
        with tag_checkpoint_regions(), recorder, _training_without_kv_cache(model), _module_to_no_op_kept():
            return torch.export.export(model, args, kwargs, strict=False, dynamic_shapes=dynamic_shapes)

    try:
        recorder = record_python_state()
        try:
            ep, python_state = export(recorder), recorder.state
        except FxoptError:
            raise
        except Exception:  # noqa: BLE001 - dynamo (torch.cond branches) cannot trace the recorder: retry without
            ep, python_state = export(contextlib.nullcontext()), None
            warnings.warn(f"{name}: Python attributes that forward reads are not guarded (its higher-order "
                          f"ops, e.g. torch.cond, cannot be traced with fxopt's attribute recorder); "
                          f"changing them after capture is not seen", stacklevel=3)
    except FxoptError:
        raise
    except Exception as exc:  # export raises many types; every one becomes a CaptureError
        _check_inputs_fit(model, args, kwargs, exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = next(h for pat, h in _EXPORT_HINTS if re.search(pat, str(exc)))
        raise CaptureError(
            f"torch.export could not capture {name}: {type(exc).__name__}: {first}\n"
            f"  at {_user_frame(exc)}\n  try: {hint}") from exc
    gm = ep.module()
    _drop_guard_calls(gm)
    symbols = _symbol_names(gm) if dynamic_batch else {}
    if python_state is not None:
        python_state = python_state.only(model)
        warn_python_writes(python_state, {id(m): n or name for n, m in model.named_modules()})
    return Captured(gm, args, kwargs, model.training, dynamic_batch, name, symbols, python_state)


@contextlib.contextmanager
def _training_without_kv_cache(model: nn.Module):
    """HF decoders (GPT-2, OPT, ...) built with the default ``config.use_cache=True`` return a KV
    cache object export cannot flatten; a training step never reads it (it is for generation), so a
    training-mode capture runs with ``use_cache=False`` and the graph returns no cache."""
    config = getattr(model, "config", None)
    if not (model.training and getattr(config, "use_cache", False) is True):
        yield
        return
    logger.info("%s: config.use_cache=True; the captured training graph returns no KV cache (generation "
                "only)", type(model).__name__)
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


@contextlib.contextmanager
def _module_to_no_op_kept():
    """``module.to(dtype)`` inside forward (HF SwitchTransformers' router: ``self.classifier =
    self.classifier.to(self.dtype)``) fails under export ("Couldn't swap Linear.weight") even when
    it changes nothing, as in eager it does not; while exporting, such a no-op ``.to`` returns the
    module untouched. A ``.to`` that would convert something still runs (and fails) as before."""
    original = nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        tensors = list(self.parameters()) + list(self.buffers())
        if all((dtype is None or not t.is_floating_point() or t.dtype == dtype)
               and (device is None or t.device == torch.device(device)) for t in tensors):
            return self
        return original(self, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


def _drop_guard_calls(gm: fx.GraphModule) -> None:
    """Remove export's ``_guards_fn`` input check: it is not part of the model's computation."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
    for name, _ in list(gm.named_children()):
        if name.startswith("_guards"):
            delattr(gm, name)
    gm.recompile()


def _symbol_names(gm: fx.GraphModule) -> dict[str, str]:
    """Map export's shape symbols (``s77``) back to the user's names (``batch``)."""
    names = {}
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() > 0:
            dim0 = val.shape[0]
            if isinstance(dim0, torch.SymInt):
                names[str(dim0.node.expr)] = "batch"
    return names
