"""Fit the kernel-time model to published per-op GPU measurements and report held-out error.

Data (``../shared/calibration``, see its README): NeuSight's per-op fp32 tables (Lee et al.,
"Forecasting GPU Performance for Deep Learning Training and Inference", ASPLOS 2025; MIT) and
OpenXLA's H100 bf16/TF32 GEMM table (Apache-2.0). Every class is fitted on part of the shapes
and scored on the rest (``cost_models.fit.split``); memory-bound classes are also scored on
devices never fitted (their datasheet bandwidth only).

    python benchmarks/calibration_error.py [--data ../shared/calibration] [--write-presets] [--out FILE.md]

``--write-presets`` stores the fitted parameters, with their provenance, in the H100/H200/A100
presets (``cost_models/hardware/*.json``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxopt.cost_models import fit  # noqa: E402
from fxopt.cost_models.hardware import PRESET_DIR  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100 80GB PCIe"
OTHER = {"NVIDIA A100-PCIE-40GB": "NVIDIA_A100-PCIE-40GB", "NVIDIA L4": "NVIDIA_L4", "Tesla T4": "Tesla_T4",
         "Tesla V100-PCIE-32GB": "Tesla_V100-PCIE-32GB"}
# NeuSight's own per-op errors (their summary table, quoted in ../shared/calibration/README.md)
NEUSIGHT = {"bmm": (25.9, 13.8), "linear": (20.0, 13.9), "elementwise": (14.0, 19.3), "softmax": (19.3, 13.9),
            "layer_norm": (20.1, 56.7)}
NEUSIGHT_ROOFLINE = {"bmm": 44.2, "linear": 27.8, "elementwise": 26.1, "softmax": 32.4, "layer_norm": 58.1}


def roofline_mape(rows, hw) -> float:
    """A plain roofline on the same rows: max(FLOPs / peak, bytes / bandwidth), datasheet peaks."""
    err = 0.0
    for m in rows:
        c = fit.call_cost(m.op, m.dtype, m.dims)
        peak = hw.vector_flops["fp32"] if m.regime in (None, "fp32") else hw.tensor_flops[
            "tf32" if m.regime == "tf32" else "bf16"]
        t = max(float(c.flops) / peak, float(c.bytes_read + c.bytes_written) / hw.memory_bandwidth)
        err += abs(t - m.seconds) / m.seconds
    return err / max(len(rows), 1)


def by_class(rows) -> dict:
    out: dict = {}
    for m in rows:
        out.setdefault(m.op_class if m.regime in (None, "fp32") else f"{m.regime} gemm", []).append(m)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "calibration"))
    ap.add_argument("--iters", type=int, default=120)
    ap.add_argument("--write-presets", action="store_true")
    ap.add_argument("--out", help="write the markdown table here too")
    args = ap.parse_args(argv)
    ns, t0 = Path(args.data) / "neusight", time.time()

    # fp32 FFMA GEMMs on the H100; bf16 and TF32 tensor-core GEMMs from OpenXLA's H100 table
    h100 = fit.device_hardware(ns / "devices" / "NVIDIA_H100_80GB_HBM3.json")
    from fxopt.cost_models import load_hardware
    preset = load_hardware("h100")
    h100 = replace(h100, tensor_flops=dict(preset.tensor_flops))
    gemm = fit.read_table(ns / "linear.csv", H100) + fit.read_table(ns / "bmm.csv", H100)
    tc = fit.read_xla_matmul(Path(args.data) / "xla" / "h100_matmul.csv")
    g_fit, g_test = fit.split(gemm + tc)
    fitted = {}
    for regime in ("fp32", "tf32", "bf16"):
        fitted[regime] = fit.fit_matrix(g_fit, h100, regime, args.iters)
        h100 = fit.with_params(h100, "matrix", fitted[regime], regime)

    # memory-bound classes: fitted on the A100 80GB (no H100 rows exist), tested there on other
    # shapes and on four devices never fitted
    a100 = fit.device_hardware(ns / "devices" / "NVIDIA_A100_80GB_PCIe.json")
    mem = [m for f in ("elem.csv", "ln.csv", "softmax.csv") for m in fit.read_table(ns / f, A100)]
    m_fit, m_test = fit.split(mem)
    memory = fit.fit_memory(m_fit, a100, args.iters)
    a100 = fit.with_params(a100, "memory", memory)

    lines = ["| class | device | held-out rows | fxopt MAPE | plain roofline MAPE | NeuSight (in-dist / other devices) |",
             "|---|---|---|---|---|---|"]
    results = {}
    for cls, rows in sorted(by_class(g_test).items()):
        e, r = fit.mape(rows, h100), roofline_mape(rows, h100)
        ref = NEUSIGHT.get(cls)
        results[cls] = {"device": "H100", "rows": len(rows), "mape": e, "roofline": r}
        lines.append(f"| {cls} | H100 (other shapes) | {len(rows)} | {100 * e:.1f} % | {100 * r:.1f} % | "
                     f"{f'{ref[0]} % / {ref[1]} %' if ref else 'n/a'} |")
    for cls, rows in sorted(by_class(m_test).items()):
        e, r = fit.mape(rows, a100), roofline_mape(rows, a100)
        results[cls] = {"device": "A100 80GB", "rows": len(rows), "mape": e, "roofline": r}
        ref = NEUSIGHT[cls]
        lines.append(f"| {cls} | A100 80GB (other shapes) | {len(rows)} | {100 * e:.1f} % | {100 * r:.1f} % | "
                     f"{ref[0]} % / {ref[1]} % |")
    for dev, fname in OTHER.items():
        hw = fit.with_params(fit.device_hardware(ns / "devices" / f"{fname}.json"), "memory", memory)
        rows = [m for f in ("elem.csv", "ln.csv", "softmax.csv") for m in fit.read_table(ns / f, dev)]
        for cls, rs in sorted(by_class(rows).items()):
            e, r = fit.mape(rs, hw), roofline_mape(rs, hw)
            results[f"{cls}@{dev}"] = {"device": dev, "rows": len(rs), "mape": e, "roofline": r}
            lines.append(f"| {cls} | {dev} (never fitted) | {len(rs)} | {100 * e:.1f} % | {100 * r:.1f} % | "
                         f"{NEUSIGHT[cls][0]} % / {NEUSIGHT[cls][1]} % |")
    date = datetime.date.today().isoformat()
    head = (f"Command: `python benchmarks/calibration_error.py` (CPU, {date}, torch {torch.__version__}; "
            f"{time.time() - t0:.0f} s). Fitted on {len(g_fit)} GEMM + {len(m_fit)} memory-bound rows.\n\n")
    params = (f"\nFitted parameters: fp32 FFMA {fitted['fp32']}; TF32 {fitted['tf32']}; bf16 {fitted['bf16']}; "
              f"memory-bound (fraction of datasheet bandwidth) {memory['efficiency']}.\n")
    md = head + "\n".join(lines) + "\n" + params
    print(md)
    if args.out:
        Path(args.out).write_text(md)
    if args.write_presets:
        write_presets(fitted, memory, date)
    print(json.dumps(results, indent=1), file=sys.stderr)
    return 0


def write_presets(fitted: dict, memory: dict, date: str) -> None:
    """Store the fits in the Hopper presets (same SMs) and the memory efficiencies in all three."""
    source = (f"benchmarks/calibration_error.py, {date}: fp32 FFMA GEMM fitted to NeuSight's H100 bmm/linear "
              f"measurements (Lee et al., ASPLOS 2025; torch 2.1, TF32 off), TF32/bf16 GEMM to OpenXLA's H100 "
              f"matmul table, memory-bound efficiencies to NeuSight's A100 80GB elementwise/layer-norm/softmax "
              f"rows (as fractions of datasheet bandwidth); conv/attention kind factors, memory latency and "
              f"ramp, host dispatch: priors (cost_models/kernels.py) until `fxopt calibrate` runs on a device; "
              f"fit on 70 % of shapes, held-out error in docs/BENCHMARKS.md")
    for name in ("h100", "h200", "a100"):
        path = PRESET_DIR / f"{name}.json"
        data = json.loads(path.read_text())
        km = {"source": source if name != "a100" else source.replace("H100 ", "H100 (Hopper; A100 keeps priors) ")}
        if name != "a100":
            km["matrix"] = fitted
        km["memory"] = {"efficiency": memory["efficiency"]}
        data["kernel_model"] = km
        path.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
