"""Predicted (not measured) data-parallel scaling of the zoo models on a cluster preset: step
time, exposed communication and scaling efficiency from 1 to 4096 GPUs, DDP, FSDP and HSDP. CPU only:
models on the meta device, one analysis per model, then fxopt.distributed per world size. Also
times what ``distributed=`` adds to an analysis (target: < 20 %).

    python benchmarks/scaling_table.py [--cluster h100-ib] [--gpus 1,8,64,512,4096] [--out FILE]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import fxopt
from fxopt import distributed as D
from fxopt import zoo

BATCH = {"resnet50": 128, "vit_b16": 128, "driving": 8}


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cluster", default="h100-ib")
    p.add_argument("--hw", default="h100")
    p.add_argument("--gpus", default="1,8,64,512,4096")
    p.add_argument("--models", nargs="+", default=list(BATCH))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    gpus = [int(x) for x in args.gpus.split(",")]
    warnings.simplefilter("ignore")
    lines = [f"Predictions (not measurements): `python benchmarks/scaling_table.py` on {time.strftime('%Y-%m-%d')}, "
             f"torch {torch.__version__}, hardware preset {args.hw}, cluster preset {args.cluster}. bf16 compute "
             f"(weights and inputs cast), gradients communicated in fp32 (AMP's fp32 master weights); per-GPU batch "
             f"fixed (weak scaling); SGD momentum. Efficiency = 1-GPU step / N-GPU step.", "",
             "| model (per-GPU batch) | GPUs | DDP step ms | DDP exposed comm ms (share) | DDP reducer kernels ms | DDP buckets | "
             "DDP efficiency | DDP samples/s | FSDP step ms | FSDP exposed (share) | HSDP step ms | HSDP exposed (share) "
             "| FSDP / HSDP save GB/GPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    overhead = []
    for name in args.models:
        with torch.device("meta"):
            model, inputs = zoo.build(name), zoo.example_inputs(name, BATCH[name])
        t0 = time.perf_counter()
        report = fxopt.analyze(model, inputs, hardware=args.hw, dtype="bf16")
        t_analyze = time.perf_counter() - t0
        t0 = time.perf_counter()
        D.apply(report, {"world_size": 64, "cluster": args.cluster, "grad_dtype": "fp32"})
        overhead.append((name, t_analyze, time.perf_counter() - t0))
        params = D.parameters(report)
        base = None
        for n in gpus:
            ddp = D.apply(report, {"world_size": n, "cluster": args.cluster, "grad_dtype": "fp32"}, params=params)
            fsdp, hsdp = (D.apply(report, {"world_size": n, "cluster": args.cluster, "grad_dtype": "fp32",
                                           "strategy": s}, params=params) for s in ("fsdp", "hsdp"))
            base = base or ddp.step_time_s
            lines.append(f"| {name} ({BATCH[name]}) | {n} | {ddp.step_time_s * 1e3:.1f} | "
                         f"{ddp.exposed_comm_s * 1e3:.2f} ({ddp.exposed_share * 100:.1f} %) | {ddp.bucket_copy_s * 1e3:.2f} | "
                         f"{len(ddp.buckets)} | "
                         f"{base / ddp.step_time_s * 100:.1f} % | {ddp.throughput:,.0f} | {fsdp.step_time_s * 1e3:.1f} | "
                         f"{fsdp.exposed_comm_s * 1e3:.2f} ({fsdp.exposed_share * 100:.1f} %) | "
                         f"{hsdp.step_time_s * 1e3:.1f} | {hsdp.exposed_comm_s * 1e3:.2f} ({hsdp.exposed_share * 100:.1f} %) | "
                         f"{fsdp.memory_saved_bytes / 1e9:.2f} / {hsdp.memory_saved_bytes / 1e9:.2f} |")
    lines += ["", "What `distributed=` adds to an analysis (CPU wall time, this machine):", "",
              "| model | analyze s | + distributed cost s | overhead |", "|---|---|---|---|"]
    lines += [f"| {m} | {a:.2f} | {d:.3f} | {d / a * 100:.1f} % |" for m, a, d in overhead]
    text = "\n".join(lines) + "\n"
    if args.out:
        open(args.out, "w").write(text)
    print(text)


if __name__ == "__main__":
    main()
