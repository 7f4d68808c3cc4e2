"""Fused-region benchmark for docs/BENCHMARKS.md (GPU): fxopt's Triton region kernels
(``fxopt.codegen``) against the same region as eager ATen ops and as ``torch.compile`` (default mode).

Each region is a tiny module of memory-bound ops from vision/driving models at training sizes. One
timed step = forward, random output gradients, ``torch.autograd.grad`` w.r.t. the inputs and the
module's parameters. The fused op is built the way the ``fuse`` pass builds one: capture, every
call_function node is the region, merge the domains, lower, ``region_op``.

    python benchmarks/fuse_regions.py                                  # every region, fp32 and bf16
    python benchmarks/fuse_regions.py --regions add_relu softmax --dtype bf16 --out r.md --json r.json
    python benchmarks/fuse_regions.py --cpu-smoke                      # tiny shapes, Triton interpreter

Refuses on a machine without CUDA unless ``--cpu-smoke`` (CPU numbers say nothing about a GPU).
"""
from __future__ import annotations

import argparse
import atexit
import copy
import operator
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from _cli import add_output_options, provenance, refuses_cpu, write_outputs  # noqa: E402  (benchmarks/_cli.py)


class Region(nn.Module):
    """A region as a module: ``forward(*xs) = fn(self, *xs)``, with ``children`` (parameters or
    submodules) as attributes, so capture sees get_attr nodes with their real names."""

    def __init__(self, fn, **children):
        super().__init__()
        self.fn = fn
        for key, child in children.items():
            setattr(self, key, child)

    def forward(self, *xs):
        return self.fn(self, *xs)


@dataclass
class Spec:
    what: str
    make: object            # input shapes -> Region
    shapes: list            # input shapes at training size
    smoke: list             # tiny input shapes for --cpu-smoke
    channels_last: bool = False


def _param(n: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(n))


NCHW, TINY = [(128, 256, 56, 56)], [(2, 8, 5, 5)]
REGIONS = {
    "add_relu": Spec("residual add + ReLU, NCHW", lambda s: Region(lambda m, x, r: torch.relu(x + r)),
                     NCHW * 2, TINY * 2),
    "add_relu_cl": Spec("residual add + ReLU, channels-last", lambda s: Region(lambda m, x, r: torch.relu(x + r)),
                        NCHW * 2, TINY * 2, True),
    "bn_relu_cl": Spec("eval BatchNorm + ReLU, channels-last",
                       lambda s: Region(lambda m, x: torch.relu(m.bn(x)), bn=nn.BatchNorm2d(s[0][1])),
                       NCHW, TINY, True),
    "bias_gelu": Spec("bias add + GELU (ViT MLP)",
                      lambda s: Region(lambda m, x: F.gelu(x + m.bias), bias=_param(s[0][-1])),
                      [(128 * 197, 3072)], [(10, 96)]),
    "add_layernorm": Spec("residual add + LayerNorm (ViT)",
                          lambda s: Region(lambda m, x, r: m.ln(x + r), ln=nn.LayerNorm(s[0][-1])),
                          [(128, 197, 768)] * 2, [(2, 5, 64)] * 2),
    "softmax": Spec("softmax over the last dim (attention scores)",
                    lambda s: Region(lambda m, x: torch.softmax(x, dim=-1)), [(128 * 12, 197, 197)], [(6, 9, 9)]),
    "layer_scale": Spec("ConvNeXt layer scale + residual (NHWC)",
                        lambda s: Region(lambda m, sc, x: sc + m.gamma * x, gamma=_param(s[0][-1])),
                        [(128, 56, 56, 96)] * 2, [(2, 5, 5, 16)] * 2),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_module(region: Spec, shapes, dtype, device) -> nn.Module:
    """The region's module with random, non-trivial parameters and buffers (a BN running variance
    must stay positive: all are drawn from [0.5, 1.5))."""
    m = region.make(shapes).eval()
    with torch.no_grad():
        for t in [*m.parameters(), *m.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5)
    return m.to(device, dtype)


def input_set(module, shapes, dtype, device, cl: bool):
    """Fresh random inputs (requiring grad) and output gradients."""
    xs = []
    for s in shapes:
        x = torch.randn(s, device=device, dtype=dtype)
        xs.append((x.to(memory_format=torch.channels_last) if cl else x).requires_grad_())
    with torch.no_grad():
        out = module(*xs)
    return xs, [torch.randn_like(o) for o in (out if isinstance(out, tuple) else (out,))]


def train_step(fn, params, xs, gys):
    """The region's share of a training step: forward, then the gradients of inputs and params."""
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return list(outs) + list(torch.autograd.grad(outs, [*xs, *params], gys))


def build_fused(module, xs):
    """Capture the module and fuse all its ops into one fxopt region op, the way the fuse pass does.
    Returns the op as a callable like the module, its program, and which op inputs need a gradient."""
    from fxopt import capture
    from fxopt.codegen import classify, lower, region_op
    gm = capture(module, tuple(x.detach() for x in xs)).graph_module
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    domain = None
    for n in nodes:
        d = classify(n)[1]
        merged = d if domain is None or d is None else domain.merge(d)
        if merged is None and d is not None:
            raise RuntimeError(f"{n.name}: domain {d} does not merge with {domain}")
        domain = merged or domain
    low = lower(nodes, domain)
    op = region_op(low.program)
    places = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if list(next(n for n in gm.graph.nodes if n.op == "output").args[0]) != low.outputs:
        raise RuntimeError(f"the region's outputs {low.outputs} are not the module's")
    picks = [places.index(n) if n.op == "placeholder" else operator.attrgetter(n.target)(module)
             for n, _ in low.inputs]   # an input of the module's call, or its parameter/buffer

    def args(xs):
        return [xs[p] if isinstance(p, int) else p for p in picks]
    return (lambda *xs: op(*args(xs))), low.program, tuple(t.requires_grad for t in args(xs))


def boundary_bytes(program, needs) -> tuple[int, int]:
    """Forward and backward bytes (each input read once, each output written once)."""
    from fxopt.codegen.runtime import regions
    region = next(r for r in regions().values() if r.program.key() == program.key())
    plan = next(p for (mask, _order), (p, _op) in region.backward.items() if mask == needs)  # the walk used
    return program.boundary_bytes(), plan.program.boundary_bytes() if plan.program.outputs else 0


def rel_err(got: list, ref: list) -> float:
    """Largest ||got - ref|| / ||ref|| over the outputs and gradients."""
    return max(float((g.detach().double() - r.detach()).norm() / r.detach().norm().clamp_min(1e-30))
               for g, r in zip(got, ref))


def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def time_ms(fn, sets, warmup: int, iters: int, device) -> list[float]:
    """Per-step times (ms), rotating through the input sets: CUDA events on the GPU."""
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    if device.type != "cuda":
        times = []
        for i in range(iters):
            t = clock(device)
            fn(*sets[i % len(sets)])
            times.append((clock(device) - t) * 1e3)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    clock(device)
    for i, (start, end) in enumerate(events):
        start.record()
        fn(*sets[i % len(sets)])
        end.record()
    clock(device)
    return [s.elapsed_time(e) for s, e in events]


def bench_region(name, dtype_name, args, device) -> dict:
    from fxopt.codegen.runtime import LAUNCHES
    spec, dtype = REGIONS[name], DTYPES[dtype_name]
    shapes = spec.smoke if args.cpu_smoke else spec.shapes
    module = build_module(spec, shapes, dtype, device)
    params = [p for p in module.parameters() if p.requires_grad]
    sets = [input_set(module, shapes, dtype, device, spec.channels_last) for _ in range(args.sets)]
    xs, gys = sets[0]
    row = {"region": name, "what": spec.what, "shape": [list(s) for s in shapes], "dtype": dtype_name}
    # first calls: from nothing built to one finished step
    t = clock(device)
    fused, program, needs = build_fused(module, xs)
    train_step(fused, params, xs, gys)
    row["first_fused_s"] = clock(device) - t
    variants = {"eager": module, "fused": fused}
    if not args.cpu_smoke:
        torch._dynamo.reset()   # each region compiles afresh, never against an earlier one's cache limit
        t = clock(device)
        variants["compile"] = torch.compile(module)
        train_step(variants["compile"], params, xs, gys)
        row["first_compile_s"] = clock(device) - t
    # correctness: every variant against float64 on the same inputs and output gradients
    ref_mod = copy.deepcopy(module).double()
    ref = train_step(ref_mod, [p for p in ref_mod.parameters() if p.requires_grad],
                     [x.detach().double().requires_grad_() for x in xs], [g.double() for g in gys])
    fallbacks = LAUNCHES["reference"]
    for v, fn in variants.items():
        row[f"err_{v}"] = rel_err(train_step(fn, params, xs, gys), ref)
    if LAUNCHES["reference"] != fallbacks:
        raise RuntimeError("the fused op ran its ATen reference, not Triton")
    if not row["err_fused"] <= 10 * row["err_eager"] + 1e-6:   # NaN fails too
        raise RuntimeError(f"fused result is wrong: error {row['err_fused']:.1e}, eager's {row['err_eager']:.1e}")
    del ref, ref_mod
    for v, fn in variants.items():
        times = time_ms(lambda a, b, fn=fn: train_step(fn, params, a, b), sets, args.warmup, args.iters, device)
        q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
        row[f"{v}_ms"], row[f"{v}_p10_p90_ms"] = statistics.median(times), [q[0], q[-1]]
    fwd, bwd = boundary_bytes(program, needs)
    row.update(fwd_bytes=fwd, bwd_bytes=bwd, fused_gbps=(fwd + bwd) / (row["fused_ms"] * 1e-3) / 1e9,
               speedup_vs_eager=row["eager_ms"] / row["fused_ms"])
    if "compile_ms" in row:
        row["speedup_vs_compile"] = row["compile_ms"] / row["fused_ms"]
    return row


def markdown_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['region']} | | {r['dtype']} | not run: {r['error'].splitlines()[0][:200]} |"

    def f(key, fmt):
        return format(r[key], fmt) if key in r else "—"
    shape = " + ".join("×".join(map(str, s)) for s in r["shape"])
    return "| " + " | ".join([
        r["region"], shape, r["dtype"], f("eager_ms", ".3f"), f("fused_ms", ".3f"), f("compile_ms", ".3f"),
        f("speedup_vs_eager", ".2f") + "x", f("speedup_vs_compile", ".2f") + ("x" if "compile_ms" in r else ""),
        f("fused_gbps", ".0f"), f("first_fused_s", ".2f"), f("first_compile_s", ".2f"),
        f("err_fused", ".1e"), f("err_eager", ".1e"), f("err_compile", ".1e")]) + " |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--regions", nargs="+", choices=list(REGIONS), default=list(REGIONS))
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    p.add_argument("--iters", type=int, default=None, help="timed steps (default 50, 2 with --cpu-smoke)")
    p.add_argument("--warmup", type=int, default=None, help="default 10 (1 with --cpu-smoke)")
    p.add_argument("--sets", type=int, default=3, help="input sets the timed steps rotate through")
    p.add_argument("--warm-caches", action="store_true",
                   help="keep the Triton/inductor/fxopt disk caches (default: fresh ones, so first calls compile)")
    add_output_options(p, "tiny shapes, few steps, CPU, no torch.compile")
    args = p.parse_args(argv)
    if refuses_cpu(args, "fuse_regions.py"):
        return 2
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"   # before anything imports triton
    if not args.warm_caches:
        tmp = tempfile.mkdtemp(prefix="fuse_regions_")
        atexit.register(shutil.rmtree, tmp, True)
        for var in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "FXOPT_CACHE_DIR"):
            os.environ[var] = os.path.join(tmp, var.lower())
    args.iters = args.iters or (2 if args.cpu_smoke else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu_smoke else 10)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    import triton

    # pay the one-time costs (imports, Triton/inductor start-up) before any first call is timed
    warm = build_module(REGIONS["add_relu"], REGIONS["add_relu"].smoke, torch.float32, device)
    wxs, wgys = input_set(warm, REGIONS["add_relu"].smoke, torch.float32, device, False)
    train_step(build_fused(warm, wxs)[0], [], wxs, wgys)
    if not args.cpu_smoke:
        train_step(torch.compile(warm), [], wxs, wgys)

    rows = []
    for name in args.regions:
        for dt in args.dtype:
            print(f"{name} {dt} ...", file=sys.stderr, flush=True)
            try:
                rows.append(bench_region(name, dt, args, device))
            except Exception as exc:  # one region failing must not lose the others' numbers
                traceback.print_exc()
                rows.append({"region": name, "dtype": dt, "error": f"{type(exc).__name__}: {exc}"})
            print(markdown_row(rows[-1]), file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    dev, date, cmd = provenance("fuse_regions.py", argv, device.type == "cuda")
    clock_name = "CUDA events" if device.type == "cuda" else "host clock"
    lines = [f"## Fused regions: {dev}, torch {torch.__version__}, triton {triton.__version__}, {date}", "",
             "One training step of the region: forward, random output gradients, autograd.grad w.r.t. the inputs "
             f"and parameters. Median of {args.iters} steps after {args.warmup} warm-up, rotating through "
             f"{args.sets} random input sets ({clock_name}). fused/eager = eager ms / fused ms, fused/compile = "
             "compile ms / fused ms (>1: fused is faster). Fused GB/s = boundary bytes of the forward and backward "
             "programs / fused ms (the step also pays autograd and the sums of broadcast parameter gradients). "
             "First call = capture + lower + kernel compile + one step (fused), torch.compile + one step "
             "(compile), after a warm-up region paid the process start-up"
             + ("" if args.warm_caches else ", with empty disk caches")
             + ". err = largest ‖x − ref‖/‖ref‖ over outputs and gradients against float64.", "",
             f"Command: `{cmd}`", "",
             "| region | shape | dtype | eager ms | fused ms | compile ms | fused/eager | fused/compile | fused GB/s "
             "| first call fused s | first call compile s | err fused | err eager | err compile |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [markdown_row(r) for r in rows]
    lines += ["", "Regions: " + "; ".join(f"{n}: {REGIONS[n].what}" for n in args.regions) + ".", ""]
    write_outputs(args, "\n".join(lines), rows)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
