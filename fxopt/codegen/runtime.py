"""Each fused region as a ``torch.library.custom_op``: Triton kernels forward and backward, a fake
implementation (so graphs holding it export, trace under FakeTensorMode and get costed) and
registered autograd (so they train).

The op is ``fxopt::<ops>_<hash>``, the hash being that of the region's program; its backward is a
second op, ``..._bwd<mask>``, one per set of inputs that need a gradient. Where Triton cannot run
(no triton, or a CPU tensor without ``TRITON_INTERPRET=1``) the op runs the same program with
ATen ops and warns once: slower, same numbers.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field

import torch

from .kernel import grid_and_warps, kernel_name, load_kernel, plan_layout, run_reference, triton_source
from .program import BackwardPlan, Program, choose_saved, derive_backward

__all__ = ["FusedRegion", "region_op", "triton_status", "regions", "execute", "LAUNCHES"]

LAUNCHES = {"triton": 0, "reference": 0}


def triton_status(device_type: str) -> tuple[bool, str]:
    """Can fxopt's Triton kernels run on this device type? (yes/no, and the reason)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install triton)"
    if device_type == "cuda":
        return True, "Triton on CUDA"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return True, "Triton's interpreter (TRITON_INTERPRET=1)"
        return False, "Triton compiles for GPUs; on the CPU it needs its interpreter (TRITON_INTERPRET=1)"
    return False, f"Triton has no target for {device_type} tensors"


@dataclass
class FusedRegion:
    program: Program
    op: object
    saved: list
    backward: dict = field(default_factory=dict)   # needs mask -> (BackwardPlan, op)
    warned: bool = False


_REGIONS: dict[str, FusedRegion] = {}


def regions() -> dict[str, FusedRegion]:
    """Every region registered in this process, by op name."""
    return dict(_REGIONS)


def _to_space(t, spec):
    """An input as the program sees it: viewed to its broadcast shape (and permuted)."""
    if spec.perm:
        return t.view(spec.own_shape).permute(spec.perm)
    return t if tuple(t.shape) == tuple(spec.shape) else t.view(spec.shape)


def _views(program: Program, tensors) -> list:
    return [_to_space(t, spec) for spec, t in zip(program.inputs, tensors)]


_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool)}
_COMPILED: dict = {}


def _allocate(program: Program, views: list):
    layout = plan_layout(program, views)
    device = views[0].device
    outs = [torch.empty_strided(shape, strides, dtype=_DTYPES[spec.dtype], device=device)
            for (shape, strides), (_, spec) in zip(layout.out_alloc, program.outputs)]
    return layout, outs


def execute(program: Program, tensors, region: FusedRegion | None = None) -> list:
    """Run the program on real tensors: its Triton kernel where Triton runs, else the reference."""
    views = _views(program, tensors)
    layout, outs = _allocate(program, views)
    if all(o.numel() == 0 for o in outs):
        return outs
    ok, why = triton_status(views[0].device.type)
    if ok:
        key = (program.key(), layout.signature(), tuple(str(t.dtype) for t in views),
               os.environ.get("TRITON_INTERPRET", "0"))
        if key not in _COMPILED:
            name = kernel_name(program)
            src = triton_source(program, layout, [str(t.dtype) for t in views], [s.dtype for _, s in program.outputs],
                                name)
            _COMPILED[key] = (load_kernel(src, name), *grid_and_warps(program))
        fn, grid, warps = _COMPILED[key]
        fn[(grid,)](*views, *outs, num_warps=warps)
        LAUNCHES["triton"] += 1
    else:
        if region is not None and not region.warned:
            region.warned = True
            warnings.warn(f"fxopt: fused region {program.label} runs as ATen ops: {why}", stacklevel=3)
        run_reference(program, views, outs)
        LAUNCHES["reference"] += 1
    return outs


def _fake(program: Program, tensors) -> list:
    views = _views(program, tensors)
    return _allocate(program, views)[1]


def _schema(n_in: int, n_out: int, prefix: str = "x") -> str:
    args = ", ".join(f"Tensor {prefix}{i}" for i in range(n_in))
    outs = "Tensor" if n_out == 1 else "(" + ", ".join(["Tensor"] * n_out) + ")"
    return f"({args}) -> {outs}"


def _define(qualname: str, program: Program, region_ref) -> object:
    n_out = len(program.outputs)

    def impl(*xs):
        outs = execute(program, xs, region_ref())
        return outs[0] if n_out == 1 else tuple(outs)

    def fake(*xs):
        outs = _fake(program, xs)
        return outs[0] if n_out == 1 else tuple(outs)

    op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=_schema(len(program.inputs), n_out))
    op.register_fake(fake)
    return op


def _op_name(program: Program) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", program.label)[:40] + "_" + program.key()


def region_op(program: Program):
    """The custom op (an OpOverload) computing ``program``; defined once per process."""
    name = _op_name(program)
    if name in _REGIONS:
        return _REGIONS[name].op._opoverload
    holder: dict = {}
    op = _define(f"fxopt::{name}", program, lambda: holder.get("r"))
    region = holder["r"] = FusedRegion(program, op, choose_saved(program))
    _REGIONS[name] = region
    n_in = len(program.inputs)

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*[inputs[i] if where == "in" else outs[i] for where, i in region.saved])
        ctx.input_meta = [(tuple(t.shape), t.dtype) for t in inputs]

    def backward(ctx, *grads):
        needs = tuple(bool(ctx.needs_input_grad[i]) and program.inputs[i].dtype != "torch.bool"
                      for i in range(n_in))
        if not any(needs):
            return (None,) * n_in
        plan, bwd_op = _backward_op(region, name, needs)
        results = bwd_op(*ctx.saved_tensors, *grads) if plan.program.outputs else ()
        results = results if isinstance(results, tuple) else (results,)
        out = [None] * n_in
        for i, (where, m) in zip(plan.grads_for, plan.route):
            # a passed-through gradient comes in its output's shape: view it in the iteration space
            g = results[m] if where == "out" else _to_space(grads[m], plan.program.inputs[len(plan.saved) + m])
            if where == "out" and plan.program.outputs[m][1].kind == "col":
                g = g.sum(0)   # the per-program partial sums
            shape, dtype = ctx.input_meta[i]
            spec = program.inputs[i]
            want = tuple(spec.shape)
            if tuple(g.shape) != want:   # broadcast and sum to the input's view (or just view)
                g = g.reshape(want) if g.numel() == math.prod(want) else \
                    g.expand(torch.broadcast_shapes(g.shape, want)).sum_to_size(want)
            if spec.perm:   # back through the permute
                g = g.permute([spec.perm.index(d) for d in range(len(spec.perm))])
            out[i] = g.reshape(shape).to(dtype)
        return tuple(out)

    op.register_autograd(backward, setup_context=setup_context)
    _register_cost(op._opoverload, program)
    return op._opoverload


def _backward_op(region: FusedRegion, name: str, needs: tuple) -> tuple[BackwardPlan, object]:
    if needs not in region.backward:
        plan = derive_backward(region.program, needs, region.saved)
        mask = "".join("1" if n else "0" for n in needs)
        op = None
        if plan.program.outputs:
            op = _define(f"fxopt::{name}_bwd{mask}", plan.program, lambda: region)
            _register_cost(op._opoverload, plan.program)
            op = op._opoverload
        region.backward[needs] = (plan, op)
    return region.backward[needs]


def _register_cost(overload, program: Program) -> None:
    from fxopt.cost_models import ops
    ops.FUSED_FLOPS[str(overload.overloadpacket)] = program.flops()
