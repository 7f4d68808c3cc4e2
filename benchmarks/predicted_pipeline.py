"""Predicted (not measured) H100 training-step time of the zoo models before and after
`fxopt.optimize`'s default pipeline, pass by pass. CPU only: models on the meta device, no
verification (meta tensors carry no values). A GPU run (`benchmarks/train_step.py`) measures.

    python benchmarks/predicted_pipeline.py [--batch 128] [--backend triton]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

import fxopt
from fxopt import zoo


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--models", nargs="+", default=zoo.names())
    p.add_argument("--backend", default="eager", choices=["eager", "triton"],
                   help="triton: the default pipeline plus fuse (fxopt's own kernels)")
    args = p.parse_args()
    print(f"torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; hardware preset h100; batch {args.batch}; "
          f"backend {args.backend}\n")
    print("| model | predicted step before | after | speedup | passes that changed the step (delta ms) "
          "| optimize wall time (CPU) |")
    print("|---|---|---|---|---|---|")
    warnings.simplefilter("ignore")
    for name in args.models:
        with torch.device("meta"):
            model, inputs = zoo.build(name), zoo.example_inputs(name, 8 if name == "driving" else args.batch)
        t0 = time.perf_counter()
        report = fxopt.optimize(model, inputs, backend=args.backend).report
        wall = time.perf_counter() - t0
        before, after = report.step_time_before_s, report.step_time_after_s
        deltas = ", ".join(f"{r.name} {(r.step_time_after_s - r.step_time_before_s) * 1e3:+.2f}"
                           for r in report.records
                           if r.kept and abs(r.step_time_after_s - r.step_time_before_s) > 1e-6)
        label = f"{name} (batch 8, 6 cameras)" if name == "driving" else name
        print(f"| {label} | {before * 1e3:.1f} ms | {after * 1e3:.1f} ms | {before / after:.2f}x | {deltas} "
              f"| {wall:.1f} s |")


if __name__ == "__main__":
    main()
