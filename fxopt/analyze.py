"""``fxopt.analyze``: capture (if needed), trace one step on fake tensors, cost it, report it."""
from __future__ import annotations

import copy
import warnings

import sympy
import torch
from torch import nn
from torch.utils._pytree import tree_map

from .capture import Captured, capture
from .cost_models.hardware import load_hardware
from .cost_models.names import dtype_name
from .cost_models.roofline import Precision
from .cost_models.trace import OPTIMIZER_NODE, trace_step
from .study.distributed import Distributed
from .study.distributed import apply as apply_distributed
from .errors import InputError
from .nodeinfo import NodeInfo, node_info
from .report import CallRow, GraphReport
from .cost_models.hardware import DEFAULT_PRESET

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


class UnknownOpWarning(UserWarning):
    """ATen ops without a cost formula were found; they are listed in the report."""


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or a torch.dtype")
    return DTYPES[dtype]


def _cast(model: nn.Module, inputs, dtype: torch.dtype):
    """A copy of the model in ``dtype`` (weights and buffers, as ``model.to(dtype)``) and its inputs."""
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    return copy.deepcopy(model).to(dtype), tree_map(cast, inputs)


def _symbol_map(captured: Captured) -> dict:
    """Export's shape symbols -> the user's sympy symbols (``s77`` -> ``batch``)."""
    out = {}
    for n in captured.placeholders():
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], torch.SymInt):
            expr = val.shape[0].node.expr
            out[expr] = sympy.Symbol(captured.symbols.get(str(expr), str(expr)), positive=True, integer=True)
    return out


def _num(x, sym_map: dict):
    """A SymInt becomes a sympy expression in the user's symbols; ints stay ints."""
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        expr = x.node.expr.xreplace(sym_map)
        return int(expr) if expr.is_Integer else expr
    return x


def _input_summary(captured: Captured) -> str:
    vals = [n.meta.get("val") for n in captured.placeholders()]
    dims = lambda v: ", ".join(captured.symbols.get(str(d), str(d)) for d in v.shape)
    return ", ".join(f"[{dims(v)}] {dtype_name(v.dtype)}" for v in vals
                     if isinstance(v, torch.Tensor))


def _recompute_checkpoints(calls: list, saved: dict, graph) -> tuple[list, dict]:
    """Activation checkpointing as eager runs it: a checkpointed region saves nothing of its own
    (its saved tensors are dropped) and its forward runs again in the backward, just before the
    region's first backward call. Regions are the nodes capture tagged (``checkpointing.AC_KEY``).
    Approximation: the region's inputs, which checkpoint keeps, are counted where their producers
    saved them, not again."""
    from dataclasses import replace as _replace

    from .checkpointing import AC_KEY
    region = {n.name: n.meta[AC_KEY] for n in graph.nodes if AC_KEY in n.meta}
    if not region:
        return calls, saved
    recompute: dict = {}
    for c in calls:
        if c.phase == "fwd" and c.node in region:
            recompute.setdefault(region[c.node], []).append(_replace(c, phase="bwd"))
    out, done = [], set()
    for c in calls:
        r = region.get(c.node)
        if c.phase == "bwd" and r is not None and r not in done:
            out += recompute.get(r, [])
            done.add(r)
        out.append(c)
    return out, {k: v for k, v in saved.items() if k not in region}


def analyze(model_or_captured: nn.Module | Captured, example_inputs=None, hardware=DEFAULT_PRESET,
            training: bool = True, dtype=None, *, optimizer: str | None = "sgd",
            dynamic_batch: bool = False, precision: Precision | None = None,
            distributed=None) -> GraphReport:
    """Cost one training step (forward, backward, optimizer step) of a model analytically.

    ``dtype`` ("bf16", "fp16", a torch.dtype) costs the model as if its weights and inputs were
    cast to it; ``precision`` says whether fp32 GEMMs/convs use TF32 (default: torch's settings).
    ``distributed`` (``{"world_size": 64, "strategy": "ddp"}`` or ``fxopt.Distributed``) adds the
    communication of data-parallel training (``report.distributed``; fxopt/study/distributed.py).
    """
    dtype = parse_dtype(dtype)
    dist_spec = Distributed.parse(distributed)  # checked before any work
    if dist_spec is not None:
        dist_spec.check(load_hardware(hardware).name, training=training, dynamic_batch=dynamic_batch)
    if isinstance(model_or_captured, Captured):
        captured = model_or_captured  # already specialized: dtype casts its weights and inputs only
    else:
        if example_inputs is None:
            raise InputError("analyze(model) needs example_inputs (a tensor, tuple or dict of kwargs), "
                             "or pass the result of fxopt.capture(model, example_inputs)")
        model, example_inputs = model_or_captured, example_inputs
        if dtype is not None:  # cast before capture, so dtype-dependent code (norm upcasts) specializes
            model, example_inputs = _cast(model, example_inputs, dtype)
            dtype = None
        captured = capture(model, example_inputs, dynamic_batch=dynamic_batch)
    hw = load_hardware(hardware)
    trace = trace_step(captured.graph_module, training=training, dtype=dtype,
                       optimizer=optimizer if training else None)
    sym_map = _symbol_map(captured)
    calls = [CallRow(r.node, r.phase, r.cost.op, r.cost.op_class, _num(r.cost.flops, sym_map),
                     _num(r.cost.bytes_read, sym_map), _num(r.cost.bytes_written, sym_map),
                     r.cost.kernels, r.cost.dtype, r.cost.known, r.cost.conv_layout,
                     tuple(tuple(_num(d, sym_map) for d in g) for g in r.cost.gemms), r.cost.kind,
                     r.cost.traffic, _num(r.cost.extra_bytes, sym_map)) for r in trace.records]
    saved = {k: _num(v, sym_map) for k, v in trace.saved_bytes.items()}
    if training:
        calls, saved = _recompute_checkpoints(calls, saved, captured.graph)
    nodes = {n.name: node_info(n) for n in captured.graph.nodes}
    nodes[OPTIMIZER_NODE] = NodeInfo(OPTIMIZER_NODE, str(optimizer), "(optimizer)", "", "")
    report = GraphReport(model=captured.source_name, calls=calls, nodes=nodes, hardware=hw,
                         precision=precision or Precision.from_torch(), params=trace.params,
                         saved_bytes=saved,
                         symbols={s.name: s for s in sym_map.values()}, training=training,
                         inputs=_input_summary(captured), captured=captured,
                         optimizer=optimizer if training else None)
    if dist_spec is not None:
        report.distributed = apply_distributed(report, dist_spec)
    if report.unknown_ops:
        warnings.warn(f"{captured.source_name}: no cost formula for {report.unknown_ops}; they are counted "
                      f"as memory traffic with 0 FLOPs and listed in the report", UnknownOpWarning,
                      stacklevel=2)
    return report
