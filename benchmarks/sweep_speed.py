"""How fast is ``fxopt.sweep``? 20 full-size variants of the driving model, built on the meta
device and analyzed on fake tensors, on the CPU (no GPU needed). Target: under a minute.

Grid: trunk width (stage widths w, 2w, 4w, 8w) x blocks per stage x cameras, batch 8 at 224x224.
Also writes the roofline of the default driving model (batch 8) to docs/roofline_driving.png.

    python benchmarks/sweep_speed.py            # prints the sweep table and a Markdown line for docs/BENCHMARKS.md
"""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

T_START = time.perf_counter()
import torch  # noqa: E402

import fxopt  # noqa: E402
from fxopt import zoo  # noqa: E402
from fxopt.render.plots import roofline  # noqa: E402
from fxopt.study.sweep import sweep  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
GRID = {"width": [32, 48, 64, 96, 128], "blocks": [2, 3], "cams": [4, 6]}
BATCH, SIDE = 8, 224


def driving(width: int, blocks: int, cams: int) -> torch.nn.Module:
    return zoo.DrivingModel(n_cams=cams, depths=(blocks,) * 4, widths=(width, 2 * width, 4 * width, 8 * width),
                            stem_width=width)


def images(cams: int) -> tuple:
    return (torch.randn(BATCH, cams, 3, SIDE, SIDE),)


def main() -> None:
    t_import = time.perf_counter() - T_START
    t0, c0 = time.perf_counter(), time.process_time()
    result = sweep(driving, GRID, images, hardware="h100", progress=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(result.table())
    with torch.device("meta"):
        model, x = zoo.build("driving"), zoo.example_inputs("driving", BATCH)
    report = fxopt.analyze(model, x, hardware="h100")
    out = DOCS / "roofline_driving.png"
    roofline(report, out, by="node", top=10)
    n = len(result.rows)
    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"python {platform.python_version()}; {time.strftime('%Y-%m-%d')}")
    print("| job | wall time | CPU time | target |")
    print("|---|---|---|---|")
    print(f"| sweep {n} full-size driving variants (width x blocks x cameras, batch {BATCH}, {SIDE}x{SIDE}), "
          f"meta build + analysis | {wall:.1f} s ({wall / n:.2f} s/variant) | {cpu:.1f} s | < 60 s |")
    print(f"(importing torch + fxopt took {t_import:.1f} s more; roofline written to {out.relative_to(DOCS.parent)})")
    sys.exit(0 if wall < 60 else 1)


if __name__ == "__main__":
    main()
