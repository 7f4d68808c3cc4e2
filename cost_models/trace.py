"""Run one training step of a captured graph on fake tensors and record every ATen call.

Each call is attributed to the fx node that caused it: forward calls to the node being run,
backward calls to the forward node whose autograd nodes are executing (a pre-hook on every
autograd node a forward node created). No real memory is allocated and nothing is computed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from fxopt.errors import AnalysisError

from .names import OPTIMIZER_NODE
from .ops import CallCost, cost_call, tensors

# Phases whose calls are not part of the step: autograd's first gradient store into .grad
# (stolen, no copy, on a real device) and the creation of the output gradients.
IGNORED_PHASES = ("accumulate", "grad_init")


@dataclass
class Record:
    phase: str   # "fwd" | "bwd" | "opt"
    node: str    # fx node name (or OPTIMIZER_NODE)
    cost: CallCost


@dataclass
class Trace:
    records: list[Record] = field(default_factory=list)
    saved_bytes: dict = field(default_factory=dict)   # node -> bytes saved for backward
    params: int = 0                                   # trainable parameter count


class _Recorder(TorchDispatchMode):
    """Costs every ATen call as it runs and files it under the current node and phase."""

    def __init__(self, trace: Trace):
        super().__init__()
        self.trace, self.node, self.phase = trace, None, "fwd"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.phase not in IGNORED_PHASES:
            self.trace.records.append(Record(self.phase, self.node, cost_call(func, args, kwargs, out)))
        return out


def claim_autograd_nodes(out, owned: set) -> list:
    """The autograd nodes an fx node's outputs ``out`` created: the walk up the autograd graph from
    their ``grad_fn`` stops at nodes already in ``owned`` (created by earlier fx nodes) and adds the
    new ones to it. Why: a backward op belongs to the fx node whose forward created its autograd
    node, here and in fxopt.profile's measured ranges alike."""
    stack = [t.grad_fn for t in tensors(out) if t.grad_fn is not None]
    claimed = []
    while stack:
        fn = stack.pop()
        if fn in owned:
            continue
        owned.add(fn)
        claimed.append(fn)
        stack.extend(f for f, _ in fn.next_functions if f is not None)
    return claimed


class _StepInterpreter(fx.Interpreter):
    """Runs the graph on fake parameters and hooks the autograd nodes each fx node creates."""

    def __init__(self, gm: fx.GraphModule, recorder: _Recorder, attrs: dict):
        super().__init__(gm)
        self.recorder, self.attrs, self.owner = recorder, attrs, set()

    def fetch_attr(self, target: str):
        return self.attrs[target]

    def call_function(self, target, args, kwargs):
        if target in _EXPORT_CHECKS:  # export's metadata guards; a dtype override would trip them
            return None
        if target is torch.ops.aten.scaled_dot_product_attention.default and not kwargs.get("enable_gqa"):
            return _fused_sdpa(*args, **kwargs)
        return super().call_function(target, args, kwargs)

    def run_node(self, n: fx.Node):
        self.recorder.node, self.recorder.phase = n.name, "fwd"
        out = super().run_node(n)
        self._hook_backward(n.name, out)
        return out

    def _hook_backward(self, name: str, out) -> None:
        for fn in claim_autograd_nodes(out, self.owner):
            phase = "accumulate" if type(fn).__name__ == "AccumulateGrad" else "bwd"
            fn.register_prehook(self._enter(name, phase))

    def _enter(self, name: str, phase: str):
        def hook(grad_outputs):
            self.recorder.node, self.recorder.phase = name, phase
        return hook


_EXPORT_CHECKS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as the fused (flash-style) kernel a GPU runs, whatever device the fake tensors claim.

    ``scaled_dot_product_attention`` picks its kernel by device: on meta tensors it falls back
    to the unfused math path, on CPU to a CPU flash kernel. On an H100 it is a fused kernel
    (flash / memory-efficient / cuDNN): one launch, q/k/v/out traffic, and a backward that
    recomputes the scores. The CPU flash op has exactly that cost shape and a meta kernel.
    A learnable mask (a relative position bias passed as ``attn_mask``) needs a gradient, which the
    CPU flash op refuses: that is the GPU's memory-efficient kernel, whose backward returns it.
    """
    if q.dim() != 4:  # [..., L, E] without a head dim (SDPA takes any batch dims): the kernels take [B, H, L, E]
        lead, (L, S) = q.shape[:-2], (q.shape[-2], k.shape[-2])
        q4, k4, v4 = (t.expand(*lead, *t.shape[-2:]).reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v))
        m4 = attn_mask.expand(*lead, L, S).reshape(-1, 1, L, S) if isinstance(attn_mask, torch.Tensor) else attn_mask
        out = _fused_sdpa(q4, k4, v4, m4, dropout_p, is_causal, scale, enable_gqa)
        return out.reshape(*lead, L, out.shape[-1])
    if isinstance(attn_mask, torch.Tensor) and attn_mask.requires_grad:
        bias = attn_mask.expand(*q.shape[:-1], k.shape[-2])  # as SDPA hands it to the kernel
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, dropout_p, is_causal, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _fake_mode(gm: fx.GraphModule) -> FakeTensorMode:
    """Reuse export's fake mode: with a dynamic batch its ShapeEnv holds the batch symbol."""
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder" and isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode
    return FakeTensorMode(allow_non_fake_inputs=True)


def _fake_attrs(gm: fx.GraphModule, mode: FakeTensorMode, dtype, training: bool,
                off_meta: bool = False) -> tuple[dict, list]:
    """Fake copies of every parameter, buffer and constant the graph reads (by get_attr target).

    Tied weights (one tensor under several names, e.g. an LM head tied to the embedding) get one
    shared fake, so their gradients accumulate as they do in eager.
    """
    attrs, params, fakes = {}, [], {}
    param_names = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n.target in attrs:
            continue
        obj = gm
        for part in n.target.split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, torch.Tensor) or id(obj) in fakes:
            attrs[n.target] = fakes.get(id(obj), obj)
            continue
        fake = _off_meta(mode, obj.detach()) if off_meta and obj.is_meta else \
            mode.from_tensor(obj.detach(), static_shapes=True)
        is_param = n.target in param_names
        if dtype is not None and fake.is_floating_point() and is_param:  # buffers keep theirs (BN stats,
            with mode:                                                   # rotary tables stay fp32)
                fake = fake.to(dtype)
        if is_param and training and fake.is_floating_point() and obj.requires_grad:  # frozen ones get no grad
            fake.requires_grad_(True)
            params.append(fake)
        attrs[n.target] = fakes[id(obj)] = fake
    return attrs, params


def _off_meta(mode: FakeTensorMode, t):
    """A CPU fake for a meta tensor. Meta conv kernels ignore memory formats; CPU fake kernels
    follow them as cuDNN's do, so channels-last layouts (and their costs) survive on models
    built on the meta device."""
    if not (isinstance(t, torch.Tensor) and t.device.type == "meta") or \
            any(isinstance(d, torch.SymInt) for d in (*t.shape, *t.stride())):
        return t
    meta = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    return mode.fake_tensor_converter.from_meta_and_device(mode, meta, torch.device("cpu"))


def trace_step(gm: fx.GraphModule, training: bool = True, dtype: torch.dtype | None = None,
               optimizer: str | None = "sgd") -> Trace:
    """Record the ATen calls of forward (+ backward + optimizer step when ``training``).

    Meta-device graphs run on CPU fakes (layouts propagate); if the graph pins the meta device
    somewhere (``arange(device="meta")``), it runs on meta fakes instead.
    """
    try:
        return _trace_step(gm, training, dtype, optimizer, off_meta=True)
    except (RuntimeError, AssertionError, TypeError) as exc:
        if "meta" not in str(exc) and "device" not in str(exc).lower():
            raise
        return _trace_step(gm, training, dtype, optimizer, off_meta=False)


def _trace_step(gm: fx.GraphModule, training: bool, dtype, optimizer, off_meta: bool) -> Trace:
    mode = _fake_mode(gm)
    attrs, params = _fake_attrs(gm, mode, dtype, training, off_meta)
    inputs = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            val = _off_meta(mode, n.meta.get("val")) if off_meta else n.meta.get("val")
            if isinstance(val, torch.Tensor) and dtype is not None and val.is_floating_point():
                with mode:
                    val = val.to(dtype)
            inputs.append(val)
    trace = Trace(params=sum(p.numel() for p in params))
    recorder = _Recorder(trace)
    weights = {StorageWeakRef(t.untyped_storage()) for t in attrs.values() if isinstance(t, torch.Tensor)}
    saved: dict = {}

    def pack(t):
        """Activation memory: distinct storages saved for backward, weights (and their views) excluded."""
        key = StorageWeakRef(t.untyped_storage())
        if key not in weights and recorder.phase == "fwd":
            saved.setdefault(key, (recorder.node, t.untyped_storage().nbytes()))
        return t

    no_guards = mode.shape_env.suppress_guards() if mode.shape_env is not None else contextlib.nullcontext()
    try:  # no guards: an op's shape check must not specialize the batch symbol of the shared ShapeEnv
        with no_guards, mode, recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.set_grad_enabled(training):
            out = _StepInterpreter(gm, recorder, attrs).run(*inputs)
            if training:
                outs = [t for t in tensors(out) if t.requires_grad]
                if not outs:
                    raise AnalysisError("the model's outputs do not require grad, so there is no backward "
                                        "to cost; pass training=False to cost inference only")
                recorder.phase = "grad_init"
                grads = [torch.ones_like(t) for t in outs]
                torch.autograd.backward(outs, grads)
                if optimizer:
                    _optimizer_step(params, optimizer, recorder)
    except torch.fx.experimental.symbolic_shapes.GuardOnDataDependentSymNode as exc:
        raise AnalysisError(f"the graph depends on tensor values, which fake tensors do not have: {exc}") \
            from exc
    for node, nbytes in saved.values():
        trace.saved_bytes[node] = trace.saved_bytes.get(node, 0) + nbytes
    return trace


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
}


def _optimizer_step(params: list, name: str, recorder: _Recorder) -> None:
    """Cost one steady-state step: the first step (which creates optimizer state) is not recorded."""
    if name not in OPTIMIZERS:
        raise AnalysisError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)} or None")
    params = [p for p in params if p.grad is not None]
    if not params:
        return
    opt = OPTIMIZERS[name](params)
    recorder.phase = "grad_init"
    opt.step()
    recorder.node, recorder.phase = OPTIMIZER_NODE, "opt"
    opt.step()
