"""Each fused region as a ``torch.library.custom_op``: Triton kernels forward and backward, a fake
implementation (so graphs holding it export, trace under FakeTensorMode and get costed) and
registered autograd (so they train).

The op is ``fxopt::<ops>_<hash>``, the hash being that of the region's program; its backward is a
second op, ``..._bwd<mask>_o<order>``, one per set of inputs that need a gradient and per memory
order the forward walked (a per-channel gradient is summed in-kernel when its channels are
innermost). Outputs get the strides eager gives the unfused nodes. Where Triton cannot run
(no triton, or a CPU tensor without ``TRITON_INTERPRET=1``) the op runs the same program with
ATen ops and warns once: slower, same numbers.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace

import torch

from fxopt.errors import FxoptError

from .kernel import (grid_and_warps, kernel_name, load_kernel, output_order, plan_layout, run_reference,
                     triton_source)
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
    backward: dict = field(default_factory=dict)   # (needs mask, walk order) -> (BackwardPlan, op)
    warned: bool = False
    oracle: object = None     # the unfused nodes (an fx.GraphModule): what strides eager gives
    strides: dict = field(default_factory=dict)    # input layouts -> output strides

    def output_strides(self, tensors) -> list | None:
        """The strides eager gives the replaced nodes' results for these inputs (their layout is
        what downstream views and convs expect): the unfused nodes run once on meta tensors."""
        if self.oracle is None:
            return None
        key = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors)
        if key not in self.strides:
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            with unset_fake_temporarily():
                metas = [torch.empty_strided(k[0], k[1], dtype=k[2], device="meta") for k in key]
                outs = self.oracle(*metas)
            self.strides[key] = [tuple(o.stride()) for o in outs]
        return self.strides[key]


_REGIONS: dict[str, FusedRegion] = {}


def regions() -> dict[str, FusedRegion]:
    """Every region registered in this process, by op name."""
    return dict(_REGIONS)


def _to_space(t, spec):
    """An input as the program sees it: viewed to its broadcast shape (and permuted)."""
    if spec.perm:
        return t.view(spec.own_shape).permute(spec.perm)
    return t if tuple(t.shape) == tuple(spec.shape) else t.view(spec.shape)


class RegionInputError(FxoptError, ValueError):
    """A fused region called with inputs of other shapes than it was compiled for."""


def _views(program: Program, tensors) -> list:
    for i, (spec, t) in enumerate(zip(program.inputs, tensors)):
        if t.numel() != math.prod(spec.shape):
            raise RegionInputError(
                f"fused region {program.name} was compiled for input {i} of {math.prod(spec.shape)} elements "
                f"(viewed as {list(spec.own_shape)}), got {list(t.shape)}: its kernels are specialized to "
                f"static shapes; call fxopt.optimize's module (it captures each new input shape) instead "
                f"of reusing this graph")
    return [_to_space(t, spec) for spec, t in zip(program.inputs, tensors)]


_DTYPES = {str(d): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool)}
_COMPILED: dict = {}


def _allocate(program: Program, views: list, strides=None):
    layout = plan_layout(program, views, strides)
    device = views[0].device
    outs = [torch.empty_strided(shape, strides, dtype=_DTYPES[spec.dtype], device=device)
            for (shape, strides), (_, spec) in zip(layout.out_alloc, program.outputs)]
    return layout, outs


def execute(program: Program, tensors, region: FusedRegion | None = None, forward: bool = False) -> list:
    """Run the program on real tensors: its Triton kernel where Triton runs, else the reference.
    A forward program's outputs get the strides eager would give them."""
    views = _views(program, tensors)
    layout, outs = _allocate(program, views, region.output_strides(tensors) if forward and region else None)
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


def _fake(program: Program, tensors, region: FusedRegion | None = None) -> list:
    views = _views(program, tensors)
    return _allocate(program, views, region.output_strides(tensors) if region else None)[1]


def _schema(n_in: int, n_out: int, prefix: str = "x") -> str:
    args = ", ".join(f"Tensor {prefix}{i}" for i in range(n_in))
    outs = "Tensor" if n_out == 1 else "(" + ", ".join(["Tensor"] * n_out) + ")"
    return f"({args}) -> {outs}"


def _define(qualname: str, program: Program, region_ref, forward: bool) -> object:
    n_out = len(program.outputs)

    def impl(*xs):
        outs = execute(program, xs, region_ref(), forward)
        return outs[0] if n_out == 1 else tuple(outs)

    def fake(*xs):
        outs = _fake(program, xs, region_ref() if forward else None)
        return outs[0] if n_out == 1 else tuple(outs)

    op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=_schema(len(program.inputs), n_out))
    op.register_fake(fake)
    return op


def region_op(program: Program, oracle=None):
    """The custom op (an OpOverload) computing ``program``; defined once per process.
    ``oracle``: the unfused nodes as a module of the op's inputs (their outputs' strides are the
    op's); without it outputs are dense in the memory order of the first full-size input."""
    name = program.name
    if name in _REGIONS:
        if _REGIONS[name].oracle is None:
            _REGIONS[name].oracle = oracle
        return _REGIONS[name].op._opoverload
    holder: dict = {}
    op = _define(f"fxopt::{name}", program, lambda: holder.get("r"), forward=True)
    region = holder["r"] = FusedRegion(program, op, choose_saved(program), oracle=oracle)
    _REGIONS[name] = region
    n_in = len(program.inputs)

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.save_for_backward(*[inputs[i] if where == "in" else outs[i] for where, i in region.saved])
        ctx.input_meta = [(tuple(t.shape), t.dtype) for t in inputs]
        ctx.order = output_order(program, [o.stride() for o in outs])   # the backward walks the same way

    def backward(ctx, *grads):
        needs = tuple(bool(ctx.needs_input_grad[i]) and program.inputs[i].dtype != "torch.bool"
                      for i in range(n_in))
        if not any(needs):
            return (None,) * n_in
        plan, bwd_op = _backward_op(region, name, needs, ctx.order)
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


def _backward_op(region: FusedRegion, name: str, needs: tuple, order) -> tuple[BackwardPlan, object]:
    """The backward of ``region`` for this set of inputs needing a gradient, walking the space in
    the forward's ``order`` (so per-channel gradients of a channels-last region sum in-kernel)."""
    if (needs, order) not in region.backward:
        plan = derive_backward(replace(region.program, order=order), needs, region.saved)
        mask = "".join("1" if n else "0" for n in needs)
        walk = "" if order is None else "_o" + "".join(map(str, order))
        op = None
        if plan.program.outputs:
            op = _define(f"fxopt::{name}_bwd{mask}{walk}", plan.program, lambda: region, forward=False)
            _register_cost(op._opoverload, plan.program)
            op = op._opoverload
        region.backward[(needs, order)] = (plan, op)
    return region.backward[(needs, order)]


def _register_cost(overload, program: Program) -> None:
    from fxopt.cost_models import ops
    ops.FUSED_FLOPS[str(overload.overloadpacket)] = program.flops()
