"""Whole training steps: the cost model's prediction next to the H100 steps in DESIGN.md.

The measured column is the peer table of ../shared/DESIGN.md (torchvision/timm models, H100
80GB HBM3, batch 128, 224x224, SGD momentum, median of 30 steps, torch 2.11, 2026-11-24). The
prediction costs fxopt's zoo versions of the same architectures, built on the meta device, with
the shipped H100 preset. Nothing in the preset was fitted to these steps: they judge it.

    python benchmarks/predicted_vs_measured.py [--hw h100]
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxopt  # noqa: E402
from fxopt import zoo  # noqa: E402
from fxopt.cost_models.roofline import Precision  # noqa: E402

# DESIGN.md peer table (ms): eager fp32 (TF32 matmul off, cuDNN TF32 on: torch's defaults) and
# bf16 weights + channels-last
MEASURED = {"resnet50": {"fp32": 71.3, "bf16-cl": 33.7},
            "convnext_t": {"fp32": 192.8, "bf16-cl": 39.1},
            "vit_b16": {"fp32": 320.3, "bf16-cl": 44.0}}


def predict(name: str, recipe: str, hw: str) -> fxopt.GraphReport:
    with torch.device("meta"):
        model, x = zoo.build(name), zoo.example_inputs(name, 128)
    if recipe == "bf16-cl":
        model = model.to(memory_format=torch.channels_last)
        x = tuple(t.to(memory_format=torch.channels_last) for t in x) if isinstance(x, tuple) else \
            x.to(memory_format=torch.channels_last)
        return fxopt.analyze(model, x, hardware=hw, dtype="bf16", precision=Precision(False, True))
    return fxopt.analyze(model, x, hardware=hw, precision=Precision(False, True))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hw", default="h100")
    args = ap.parse_args(argv)
    rows = ["| model | recipe | predicted ms | measured ms (DESIGN.md) | error | compute / memory / latency / host ms |",
            "|---|---|---|---|---|---|"]
    errs = []
    t0 = time.time()
    for name, cols in MEASURED.items():
        for recipe, measured in cols.items():
            r = predict(name, recipe, args.hw)
            t = r.totals
            pred = float(t["step_time_s"]) * 1e3
            err = (pred - measured) / measured
            errs.append(abs(err))
            split = " / ".join(f"{float(t[k]) * 1e3:.1f}" for k in ("compute_bound_s", "memory_bound_s", "latency_s",
                                                                      "host_bound_s"))
            rows.append(f"| {name} | {recipe} | {pred:.1f} | {measured} | {100 * err:+.0f} % | {split} |")
    print(f"Command: `python benchmarks/predicted_vs_measured.py --hw {args.hw}` (CPU, "
          f"{datetime.date.today().isoformat()}, torch {torch.__version__}, {time.time() - t0:.0f} s); "
          f"predictions, judged against DESIGN.md's measured H100 steps.\n")
    print("\n".join(rows))
    print(f"\nmean absolute error {100 * sum(errs) / len(errs):.0f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
