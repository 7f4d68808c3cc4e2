"""``fxopt bench MODEL --gpus N``: time data-parallel training steps under ``torchrun``, next to
fxopt's prediction.

The launcher starts ``torch.distributed.run`` (torchrun) with N processes on this machine, once
with 1 process for the scaling baseline when N > 1 (NCCL on CUDA GPUs, gloo on CPU). Each
process builds the model, and per variant wraps it (``fxopt.optimize`` first where the variant
says so) in ``DistributedDataParallel``, times ``steps`` full steps after ``warmup`` (barrier,
step, device sync), and the slowest rank's median step is the variant's step. Rank 0 writes the
results as JSON; the launcher prints measured and predicted (``fxopt.analyze(...,
distributed=...)``) step times and the measured scaling efficiency. A CPU/gloo run checks that
everything runs; its times say nothing about a GPU cluster.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
from tabulate import tabulate

from ..capture import normalize_inputs
from ..errors import FxoptError, InputError

DDP_VARIANTS = ("eager-fp32", "autocast", "fxopt")   # variants of fxopt.bench that run under DDP


def _worker(args) -> None:
    """One torchrun process: every variant's median step time on this rank, gathered on rank 0."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from .bench import VARIANTS, fresh_inputs, resolve_bench_model, step_loss
    cuda = torch.cuda.is_available() and args.device != "cpu"
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    results = {}
    try:
        name, base, example = resolve_bench_model(args.model, args.batch, args.tiny)
        for v in args.variants:
            variant = VARIANTS[v]
            torch.manual_seed(0)
            model = copy.deepcopy(base)
            if variant.wrap == "fxopt":
                from ..optimize import optimize
                model = optimize(model, example, verify=False)
            model = DDP(model.to(device), device_ids=[local] if cuda else None)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            gen = torch.Generator(device=device).manual_seed(rank)
            times = []
            for i in range(args.warmup + args.steps):
                inputs = fresh_inputs(example, device, generator=gen)
                call, kwargs = normalize_inputs(inputs)
                dist.barrier()
                t0 = time.perf_counter()
                ctx = torch.autocast(device.type, dtype=torch.bfloat16) if variant.autocast else nullcontext()
                with ctx:
                    out = model(*call, **kwargs)
                    loss = step_loss(out, args.batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            medians = [None] * dist.get_world_size()
            dist.all_gather_object(medians, statistics.median(times))
            results[v] = {"step_s": max(medians), "ranks": medians}
        if rank == 0:
            with open(args.out, "w") as f:
                json.dump({"model": name, "world_size": dist.get_world_size(), "device":
                           torch.cuda.get_device_name(local) if cuda else "cpu", "results": results}, f)
    finally:
        dist.destroy_process_group()


LAUNCH_TIMEOUT_S = int(os.environ.get("FXOPT_TORCHRUN_TIMEOUT_S", "900"))


def _launch(n: int, args, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "fxopt.measure.bench_distributed", "--worker", args.model, "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", out,
           "--variants", *args.variants] + (["--tiny"] if args.tiny else []) + \
          (["--device", args.device] if args.device else [])
    try:   # a rank that dies leaves the others waiting in a collective: never wait forever
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise FxoptError(f"torchrun with {n} process(es) did not finish in {LAUNCH_TIMEOUT_S} s (a rank "
                         f"probably died and the others wait in a collective); rerun with fewer steps, or "
                         f"set FXOPT_TORCHRUN_TIMEOUT_S") from exc
    if proc.returncode or not os.path.exists(out):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise FxoptError(f"torchrun with {n} process(es) failed (exit {proc.returncode}):\n{tail}")
    with open(out) as f:
        return json.load(f)


def bench_gpus(args) -> str:
    """Run the variants on 1 and ``args.gpus`` processes; the table of measured vs predicted."""
    unknown = [v for v in args.variants if v not in DDP_VARIANTS]
    if unknown:
        raise InputError(f"--gpus runs the variants {DDP_VARIANTS} under DDP; drop {unknown}")
    cuda = torch.cuda.is_available() and args.device != "cpu"
    if cuda and torch.cuda.device_count() < args.gpus:
        raise InputError(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    with tempfile.TemporaryDirectory() as d:
        runs = {n: _launch(n, args, f"{d}/n{n}.json") for n in sorted({1, args.gpus})}
    one, many = runs[1], runs[args.gpus]
    pred = _predicted(args) if cuda else {}
    rows = []
    for v in args.variants:
        t1, tn = one["results"][v]["step_s"], many["results"][v]["step_s"]
        p = pred.get(v)
        rows.append([v, f"{t1 * 1e3:.2f}", f"{tn * 1e3:.2f}", f"{t1 / tn * 100:.1f}",
                     f"{args.gpus * args.batch / tn:,.0f}", f"{p * 1e3:.2f}" if p else "-",
                     f"{(p / tn - 1) * 100:+.1f}" if p else "-"])
    head = (f"{many['model']}: DDP on {args.gpus} x {many['device']} (torchrun, {'NCCL' if cuda else 'gloo'}), "
            f"per-GPU batch {args.batch}, median of {args.steps} steps, slowest rank"
            + ("" if cuda else "; CPU smoke run: these times say nothing about GPUs"))
    return head + "\n" + tabulate(rows, ["variant", "1 proc ms", f"{args.gpus} procs ms", "scaling eff. %",
                                         "samples/s", "predicted ms", "pred. err %"], disable_numparse=True)


def _predicted(args) -> dict:
    """fxopt's predicted DDP step per variant (autocast: costed in bf16), on the GPU's preset."""
    import warnings

    from ..analyze import analyze
    from .bench import resolve_bench_model
    from ..cost_models.hardware import preset_for_gpu
    hw = args.hw or preset_for_gpu(torch.cuda.get_device_name())
    _, model, example = resolve_bench_model(args.model, args.batch, args.tiny)
    out = {}
    for v in args.variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = analyze(model, example, hardware=hw, dtype="bf16" if v == "autocast" else None,
                          distributed={"world_size": args.gpus, "grad_dtype": "fp32"})
        out[v] = float(rep.totals["step_time_s"])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m fxopt.bench_distributed")
    p.add_argument("model")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", default=list(DDP_VARIANTS))
    _worker(p.parse_args(argv))


if __name__ == "__main__":
    main()
