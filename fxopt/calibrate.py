"""``fxopt calibrate``: micro-benchmarks that turn a device into a hardware profile.

A plain roofline is far off (ResNet-50 -50 %, ViT-B/16 -33 % on an H100): memory-bound kernels
reach well under peak bandwidth, small GEMMs and convs well under peak FLOP/s. This module
measures what each op class really reaches and writes a profile with the schema of
``cost_models/hardware/h100.json`` plus:

* ``efficiency_by_class``: per op class, the fraction of peak it reaches (FLOP/s for matmul,
  conv, attention; bandwidth for pointwise, reduction, norm, softmax, memory), which the
  roofline uses in place of the global efficiencies;
* ``measured``: device, versions, date, every raw measurement, and an ``nhwc_speedup`` table
  shaped like ``fxopt.cost_models.layout.NHWC_SPEEDUP`` (unmeasured cells keep the priors).

On a GPU the peaks are the datasheet preset of the device (H100/H200/A100), so efficiencies are
fractions of the datasheet; an unknown GPU and the CPU use the best measured rate as the peak.
Timing: CUDA events after warm-up, median of many (GPU); ``time.perf_counter``, fewer (CPU).
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .cost_models.hardware import load_hardware
from .cost_models.layout import NHWC_SPEEDUP
from .errors import FxoptError

SCHEMA = "fxopt.hardware_profile/1"

# (M, N, K): large, transformer-like, aligned and misaligned, small
GEMM_SHAPES = [(8192, 8192, 8192), (4096, 4096, 4096), (2048, 2048, 2048), (1024, 1024, 1024),
               (25216, 768, 768), (25216, 3072, 768), (25216, 768, 3072), (4095, 4097, 4093),
               (1000, 1000, 1000), (512, 512, 512), (256, 256, 256), (64, 64, 64)]
GEMM_SHAPES_QUICK = [(256, 256, 256), (128, 128, 128), (127, 129, 131), (32, 32, 32)]
# (name, NHWC_SPEEDUP class, N, C_in, H, C_out, kernel, groups)
CONVS = [("3x3 64->64 56x56", "dense", 64, 64, 56, 64, 3, 1),
         ("3x3 256->256 14x14", "dense", 64, 256, 14, 256, 3, 1),
         ("1x1 256->64 56x56", "1x1", 64, 256, 56, 64, 1, 1),
         ("1x1 1024->256 14x14", "1x1", 64, 1024, 14, 256, 1, 1),
         ("dw7x7 96 56x56", "depthwise", 64, 96, 56, 96, 7, 96),
         ("3x3 g32 256 28x28", "grouped", 64, 256, 28, 256, 3, 32)]
CONVS_QUICK = [("3x3 16->16 16x16", "dense", 2, 16, 16, 16, 3, 1),
               ("1x1 32->16 16x16", "1x1", 2, 32, 16, 16, 1, 1),
               ("dw3x3 16 16x16", "depthwise", 2, 16, 16, 16, 3, 16),
               ("3x3 g4 16 16x16", "grouped", 2, 16, 16, 16, 3, 4)]


class CalibrationError(FxoptError):
    """Calibration could not run on this device."""


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError("calibrate(device='cuda') but no CUDA device is available; "
                               "run it on the GPU machine, or pass device='cpu'")
    return device


def time_fn(fn, device: torch.device, reps: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()``: CUDA events around each call on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        pairs = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) * 1e-3 for s, e in pairs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _dtypes(device: torch.device, quick: bool) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.bfloat16, torch.float16, torch.float32]
    return [torch.float32] if quick else [torch.float32, torch.bfloat16]


def _gemms(device, quick, reps) -> list[dict]:
    out = []
    for dtype in _dtypes(device, quick):
        for m, n, k in GEMM_SHAPES_QUICK if quick else GEMM_SHAPES:
            a = torch.randn(m, k, device=device, dtype=dtype)
            b = torch.randn(k, n, device=device, dtype=dtype)
            t = time_fn(lambda: torch.mm(a, b), device, reps)
            out.append({"m": m, "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""),
                        "aligned": all(d % 8 == 0 for d in (m, n, k)), "time_s": t,
                        "flops_per_s": 2 * m * n * k / t})
            del a, b
    return out


def _convs(device, quick, reps) -> list[dict]:
    """Forward + backward of each conv, in NCHW and NHWC."""
    out = []
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    for dtype in dtypes:
        for name, cls, n, cin, hw, cout, k, groups in CONVS_QUICK if quick else CONVS:
            row = {"name": name, "class": cls, "dtype": str(dtype).replace("torch.", "")}
            for layout, fmt in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
                x = torch.randn(n, cin, hw, hw, device=device, dtype=dtype).contiguous(memory_format=fmt)
                w = torch.randn(cout, cin // groups, k, k, device=device, dtype=dtype).contiguous(memory_format=fmt)
                x.requires_grad_(True)
                w.requires_grad_(True)
                y = F.conv2d(x, w, padding=k // 2, groups=groups)
                g = torch.randn_like(y)

                def step(x=x, w=w, g=g):
                    y = F.conv2d(x, w, padding=k // 2, groups=groups)
                    torch.autograd.grad(y, (x, w), g)

                t = time_fn(step, device, reps)
                flops = 3 * 2 * y.numel() * (cin // groups) * k * k  # fwd + grad input + grad weight
                row[f"{layout}_time_s"] = t
                row[f"{layout}_flops_per_s"] = flops / t
            row["nhwc_speedup"] = row["nchw_time_s"] / row["nhwc_time_s"]
            out.append(row)
    return out


def _bandwidth(device, quick, reps) -> list[dict]:
    """Bytes/s of a copy, pointwise ops, reductions, softmax and layer norm on a large tensor."""
    numel = (1 << 20) if quick else (1 << 28)
    rows = []
    for dtype in ([torch.float32] if device.type != "cuda" else [torch.bfloat16, torch.float32]):
        x = torch.randn(numel // 1024, 1024, device=device, dtype=dtype)
        e = x.element_size()
        cases = [("memory", "copy", lambda: x.clone(), 2 * numel * e),
                 ("pointwise", "add", lambda: x + x, 2 * numel * e),
                 ("pointwise", "gelu", lambda: F.gelu(x), 2 * numel * e),
                 ("reduction", "sum(-1)", lambda: x.sum(-1), numel * e),
                 ("softmax", "softmax(-1)", lambda: torch.softmax(x, -1), 2 * numel * e),
                 ("norm", "layer_norm", lambda: F.layer_norm(x, (1024,)), 2 * numel * e)]
        for cls, name, fn, nbytes in cases:
            t = time_fn(fn, device, reps)
            rows.append({"class": cls, "name": name, "dtype": str(dtype).replace("torch.", ""),
                         "bytes": nbytes, "time_s": t, "bytes_per_s": nbytes / t})
        del x
    return rows


def _launch_overhead(device, reps) -> float:
    """Seconds per kernel of a loop of tiny in-place adds (launch-bound on a GPU)."""
    x = torch.zeros(1, device=device)
    loop = 200

    def run():
        for _ in range(loop):
            x.add_(1)
    return time_fn(run, device, max(3, reps // 4)) / loop


def _versions(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, cuda=torch.version.cuda,
                    driver=_driver_version(), sm_count=props.multi_processor_count)
    else:
        info.update(device=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def _driver_version() -> str | None:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def _preset_for(device) -> str | None:
    if device.type != "cuda":
        return None
    from .optimize import GPU_PRESETS
    name = torch.cuda.get_device_name(device)
    return next((preset for key, preset in GPU_PRESETS if key in name), None)


def _median(xs) -> float:
    return float(statistics.median(xs)) if xs else 1.0


def calibrate(device=None, quick: bool = False, out: "str | Path | None" = None) -> dict:
    """Measure this device and return (and, with ``out``, write) a hardware profile dict.

    ``quick`` runs a tiny grid (seconds; what tests and CPU smoke runs use). The result loads
    with ``fxopt.cost_models.load_hardware(path)`` and ``analyze(..., hardware=path)`` uses it.
    """
    device = _device(device)
    reps = (5 if quick else 20) if device.type == "cpu" else (10 if quick else 50)
    gemms = _gemms(device, quick, reps)
    convs = _convs(device, quick, reps)
    bws = _bandwidth(device, quick, reps)
    launch = _launch_overhead(device, reps)
    preset_name = _preset_for(device)

    main_dtype = "bfloat16" if device.type == "cuda" else "float32"
    best = lambda rows, key, **match: max((r[key] for r in rows if all(r[k] == v for k, v in match.items())),
                                          default=0.0)
    copy_bw = best(bws, "bytes_per_s", name="copy")
    if preset_name:  # datasheet peaks: efficiencies are fractions of the datasheet
        preset = load_hardware(preset_name)
        tensor_flops, vector_flops = dict(preset.tensor_flops), dict(preset.vector_flops)
        bandwidth, description = preset.memory_bandwidth, preset.description + " (measured profile)"
        extra = {"l2_bytes": preset.l2_bytes}
    else:  # the best measured rates stand in for the peaks
        fp32 = best(gemms, "flops_per_s", dtype="float32")
        low = best(gemms, "flops_per_s", dtype="bfloat16") or fp32
        tensor_flops = {"tf32": fp32, "bf16": low, "fp16": best(gemms, "flops_per_s", dtype="float16") or low}
        vector_flops = {"fp32": fp32, "bf16": low, "fp16": tensor_flops["fp16"]}
        bandwidth = copy_bw
        description = f"measured {_versions(device)['device']} ({device.type}); peaks = best measured rates"
        extra = {}

    def peak(dtype: str) -> float:
        key = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dtype]
        if key == "fp32" and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            key = "tf32"
        return vector_flops["fp32"] if key == "fp32" else tensor_flops[key]

    matmul_eff = [r["flops_per_s"] / peak(r["dtype"]) for r in gemms if r["dtype"] == main_dtype]
    conv_dtype = "bfloat16" if device.type == "cuda" else "float32"
    conv_peak = lambda r: (tensor_flops["tf32"] if r["dtype"] == "float32" and device.type == "cuda"
                           and torch.backends.cudnn.allow_tf32 else peak(r["dtype"]))
    conv_eff = [max(r["nchw_flops_per_s"], r["nhwc_flops_per_s"]) / conv_peak(r) for r in convs
                if r["dtype"] == conv_dtype and r["class"] in ("dense", "1x1")]
    bw_dtype = "bfloat16" if device.type == "cuda" else "float32"
    by_class: dict = {"matmul": _median(matmul_eff), "attention": _median(matmul_eff), "conv": _median(conv_eff)}
    for cls in ("memory", "pointwise", "reduction", "softmax", "norm"):
        vals = [r["bytes_per_s"] / bandwidth for r in bws if r["class"] == cls and r["dtype"] == bw_dtype]
        by_class[cls] = _median(vals)
    by_class = {k: round(min(v, 1.0), 4) for k, v in by_class.items()}

    speedup = {cls: dict(cols) for cls, cols in NHWC_SPEEDUP.items()}
    measured_cells = []
    for cls in speedup:
        for dtype, col in (("bfloat16", "16bit"), ("float32", "tf32" if device.type == "cuda" else "fp32")):
            vals = [r["nhwc_speedup"] for r in convs if r["class"] == cls and r["dtype"] == dtype]
            if vals:
                speedup[cls][col] = round(_median(vals), 3)
                measured_cells.append(f"{cls}/{col}")

    versions = _versions(device)
    big = [r["flops_per_s"] for r in gemms if r["dtype"] == main_dtype and r["m"] >= 1024 and r["aligned"]]
    matrix_eff = max(big or [r["flops_per_s"] for r in gemms if r["dtype"] == main_dtype]) / peak(main_dtype)
    profile = {
        "schema": SCHEMA,
        "name": f"{preset_name}-measured" if preset_name else f"{device.type}-measured",
        "description": description,
        "sm_count": versions.get("sm_count", 0),
        "memory_bytes": (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0),
        **extra,
        "memory_bandwidth": bandwidth,
        "tensor_flops": tensor_flops,
        "vector_flops": vector_flops,
        "efficiency": {"matrix": round(min(matrix_eff, 1.0), 4), "memory": round(min(copy_bw / bandwidth, 1.0), 4)},
        "efficiency_by_class": by_class,
        "nhwc_speedup": {cls: {col: speedup[cls][col]} for cls, col in (c.split("/") for c in measured_cells)},
        "launch_overhead_s": launch,
        "source": f"fxopt calibrate{' --quick' if quick else ''} on {versions['device']}, {versions['date']}",
        "measured": {**versions, "quick": quick, "reps": reps, "nhwc_speedup": speedup,
                     "nhwc_speedup_measured_cells": measured_cells,
                     "raw": {"gemm": gemms, "conv": convs, "bandwidth": bws, "launch_overhead_s": launch}},
    }
    if out is not None:
        Path(out).write_text(json.dumps(profile, indent=1))
    return profile


def summary(profile: dict) -> str:
    """A few lines a person reads after ``fxopt calibrate``."""
    m = profile["measured"]
    lines = [f"{profile['name']}: {m['device']} (torch {m['torch']}, {m['date']})",
             f"  bandwidth {profile['memory_bandwidth'] / 1e9:,.1f} GB/s, launch {profile['launch_overhead_s'] * 1e6:.2f} us",
             f"  efficiency {profile['efficiency']}",
             "  by class   " + ", ".join(f"{k} {v:.2f}" for k, v in profile["efficiency_by_class"].items())]
    return "\n".join(lines)
