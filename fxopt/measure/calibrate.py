"""``fxopt calibrate``: measure a device (or import a published table) into a hardware profile.

The cost model prices a kernel by its shape (``cost_models.kernels``: tiles, waves, K pipeline,
alignment for matrix kernels; a bandwidth ramp and a fixed latency for memory-bound ones; host
dispatch per launch). Calibration measures exactly those parameters: a GEMM grid per regime
(FFMA fp32, TF32, bf16; aligned, misaligned, small, long-K), memory-bound kernels from a few KB
to hundreds of MB (ramp and latency), convs 1x1/3x3/depthwise/grouped in NCHW and NHWC (layout
table, conv and depthwise efficiencies), and the host's per-op dispatch time. The measurements
go through the same fit as an imported table (``cost_models.fit``) and the profile says where
every number came from.

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
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cost_models import fit
from ..cost_models.hardware import Hardware, load_hardware
from ..cost_models.layout import NHWC_SPEEDUP
from ..cost_models.names import dtype_name
from ..errors import FxoptError
from ..progress import progress
from ..cost_models.hardware import DEFAULT_PRESET

SCHEMA = "fxopt.hardware_profile/2"

# (M, N, K): square, transformer-like, misaligned, small, long-K (weight gradients), skinny
GEMM_SHAPES = [(8192, 8192, 8192), (4096, 4096, 4096), (2048, 2048, 2048), (1024, 1024, 1024), (512, 512, 512),
               (256, 256, 256), (128, 128, 128), (25216, 768, 768), (25216, 3072, 768), (25216, 768, 3072),
               (768, 768, 25216), (4095, 4097, 4093), (1000, 1000, 1000), (64, 4096, 4096), (4096, 64, 4096),
               (100, 100, 100), (4096, 4096, 64)]
GEMM_SHAPES_QUICK = [(256, 256, 256), (128, 128, 128), (127, 129, 131), (32, 32, 32)]   # CPU smoke runs
# a GPU's quick grid (< 90 s on an H100 with the fit): one shape per effect the model has
GEMM_SHAPES_QUICK_GPU = [(4096, 4096, 4096), (1024, 1024, 1024), (256, 256, 256), (25216, 768, 768),
                         (768, 768, 25216), (4095, 4097, 4093), (64, 4096, 4096), (4096, 4096, 64)]
# (rows, cols) of memory-bound kernels: 4 KB .. 256 MB in fp32
MEMORY_SHAPES = [(1, 1024), (16, 1024), (256, 1024), (2048, 1024), (8192, 1024), (32768, 1024), (65536, 1024)]
MEMORY_SHAPES_QUICK = [(1, 256), (64, 256), (1024, 256)]
MEMORY_SHAPES_QUICK_GPU = [(1, 1024), (256, 1024), (8192, 1024), (65536, 1024)]
MEMORY_OPS = ("add", "mulu", "relu", "gelu", "layer_norm", "softmax")
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


def _convs(device, quick, reps) -> list[dict]:
    """Forward + backward of each conv, in NCHW and NHWC."""
    out = []
    dtypes = [torch.bfloat16, torch.float32] if device.type == "cuda" else [torch.float32]
    for dtype in dtypes:
        for name, cls, n, cin, hw, cout, k, groups in CONVS_QUICK if quick else CONVS:
            row = {"name": name, "class": cls, "dtype": dtype_name(dtype), "shape": (n, cin, hw)}
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
    from ..cost_models.hardware import preset_for_gpu
    return preset_for_gpu(torch.cuda.get_device_name(device), None)


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


def _regimes(device: torch.device, quick: bool) -> list[tuple[str, torch.dtype, bool]]:
    """(fit dtype name, torch dtype, TF32 on) per matrix regime measured on this device."""
    if device.type == "cuda":
        return [("float32", torch.float32, False), ("tf32", torch.float32, True), ("bfloat16", torch.bfloat16, False)]
    return [("float32", torch.float32, False)]


def _grid(device, quick: bool, full: list, cpu_quick: list, gpu_quick: list) -> list:
    """The shapes to measure: the full grid, or a quick one sized for the device."""
    if not quick:
        return full
    return gpu_quick if device.type == "cuda" else cpu_quick


def _gemms(device, quick, reps) -> list:
    out = []
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in _regimes(device, quick):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            shapes = _grid(device, quick, GEMM_SHAPES, GEMM_SHAPES_QUICK, GEMM_SHAPES_QUICK_GPU)
            for m, n, k in progress(shapes, desc=f"calibrate {name} GEMMs", unit="shape"):
                a = torch.randn(m, k, device=device, dtype=dtype)
                b = torch.randn(k, n, device=device, dtype=dtype)
                out.append(fit.Measurement("mm", name, (1, m, n, k), time_fn(lambda: torch.mm(a, b), device, reps),
                                           _versions(device)["device"], "fxopt calibrate"))
                del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return out


def _memory(device, quick, reps) -> list:
    """Memory-bound kernels over sizes: their ramp, latency and per-class sustained bandwidth."""
    out = []
    shapes = _grid(device, quick, MEMORY_SHAPES, MEMORY_SHAPES_QUICK, MEMORY_SHAPES_QUICK_GPU)
    for rows, cols in progress(shapes, desc="calibrate memory-bound kernels", unit="size"):
        x = torch.randn(rows, cols, device=device)
        y = torch.randn(rows, cols, device=device)
        w = torch.ones(cols, device=device)
        fns = {"add": lambda: x + y, "mulu": lambda: x * 2.0, "relu": lambda: torch.relu(x),
               "gelu": lambda: F.gelu(x), "layer_norm": lambda: F.layer_norm(x, (cols,), w, w),
               "softmax": lambda: torch.softmax(x, -1)}
        for op in MEMORY_OPS:
            out.append(fit.Measurement(op, "float32", (rows, cols), time_fn(fns[op], device, reps),
                                       _versions(device)["device"], "fxopt calibrate"))
        del x, y
    return out


def _base_hardware(device) -> tuple[Hardware, str | None]:
    """The device's preset (datasheet peaks) or, without one, a profile whose peaks are measured."""
    preset_name = _preset_for(device)
    if preset_name:
        return load_hardware(preset_name), preset_name
    return None, None


def _measured_peaks(device, gemms, memory) -> Hardware:
    """An unknown device: the best measured rates stand in for the peaks."""
    best_flops = max((2.0 * m.dims[0] * m.dims[1] * m.dims[2] * m.dims[3] / m.seconds for m in gemms), default=1e9)
    best_bw = max((float(fit.call_cost(m.op, m.dtype, m.dims).bytes_read
                         + fit.call_cost(m.op, m.dtype, m.dims).bytes_written) / m.seconds for m in memory),
                  default=1e9)
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return Hardware(name=f"{device.type}-measured", description=f"measured {_versions(device)['device']} "
                    f"({device.type}); peaks = best measured rates", memory_bandwidth=best_bw,
                    tensor_flops={"tf32": best_flops, "bf16": best_flops, "fp16": best_flops},
                    vector_flops={"fp32": best_flops, "bf16": best_flops, "fp16": best_flops},
                    sm_count=props.multi_processor_count if props else 1,
                    memory_bytes=props.total_memory if props else 0)


def _conv_params(convs: list, hw: Hardware) -> tuple[dict, dict, list]:
    """NHWC speedups measured per class, and depthwise convs' sustained share of bandwidth."""
    speedup = {cls: dict(cols) for cls, cols in NHWC_SPEEDUP.items()}
    measured_cells = []
    for cls in speedup:
        for dtype, col in (("bfloat16", "16bit"), ("float32", "tf32" if hw.name != "cpu-measured" else "fp32")):
            vals = [r["nhwc_speedup"] for r in convs if r["class"] == cls and r["dtype"] == dtype]
            if vals:
                speedup[cls][col] = round(statistics.median(vals), 3)
                measured_cells.append(f"{cls}/{col}")
    dw = [r for r in convs if r["class"] == "depthwise" and r["dtype"] == "float32"]
    memory = {}
    if dw:   # fwd + grad input + grad weight each stream x (and y / dy) once: about 6 tensors
        r = dw[0]
        n, c, h = r["shape"][:3]
        nbytes = 6 * n * c * h * h * 4
        memory["depthwise"] = round(min(1.0, nbytes / min(r["nchw_time_s"], r["nhwc_time_s"]) / hw.memory_bandwidth), 4)
    return speedup, memory, measured_cells


def calibrate(device=None, quick: bool = False, out: "str | Path | None" = None) -> dict:
    """Measure this device and return (and, with ``out``, write) a hardware profile dict.

    ``quick`` runs a tiny grid (seconds; what tests and CPU smoke runs use). The result loads
    with ``fxopt.cost_models.load_hardware(path)`` and ``analyze(..., hardware=path)`` uses it.
    """
    device = _device(device)
    reps = (5 if quick else 20) if device.type == "cpu" else (10 if quick else 30)
    gemms, memory = _gemms(device, quick, reps), _memory(device, quick, reps)
    convs = _convs(device, quick, reps)
    host = _launch_overhead(device, reps)
    versions = _versions(device)
    base, preset_name = _base_hardware(device)
    if base is None:
        base = _measured_peaks(device, gemms, memory)
    source = f"fxopt calibrate{' --quick' if quick else ''} on {versions['device']}, {versions['date']}"
    hw = fit.fit_profile(gemms + memory, base, source, iters=40 if quick else 120)
    speedup, conv_memory, cells = _conv_params(convs, hw)
    km = dict(hw.kernel_model)
    km["memory"] = {**km.get("memory", {}), "efficiency": {**km.get("memory", {}).get("efficiency", {}), **conv_memory}}
    km["host"] = {"fwd": host, "bwd": host, "opt": host}
    hw = replace(hw, kernel_model=km, name=f"{preset_name}-measured" if preset_name else base.name,
                 description=base.description + (" (measured profile)" if preset_name else ""),
                 nhwc_speedup={cls: {col: speedup[cls][col]} for cls, col in (c.split("/") for c in cells)},
                 source=source)
    profile = {"schema": SCHEMA, **_profile_fields(hw),
               "measured": {**versions, "quick": quick, "reps": reps, "nhwc_speedup": speedup,
                            "nhwc_speedup_measured_cells": cells,
                            "fit_mape": _fit_errors(gemms + memory, hw),
                            "raw": {"gemm": [m.__dict__ for m in gemms], "memory": [m.__dict__ for m in memory],
                                    "conv": convs, "host_dispatch_s": host}}}
    if out is not None:
        Path(out).write_text(json.dumps(profile, indent=1))
    return profile


def import_table(path: "str | Path", device: str | None = None, base: str = DEFAULT_PRESET,
                 out: "str | Path | None" = None) -> dict:
    """A profile fitted to an external table of measured per-op times (format: ``cost_models.fit``).

    ``base`` supplies the datasheet peaks the fitted efficiencies are fractions of; ``device``
    picks that device's rows from a table holding several.
    """
    rows = fit.read_table(path, device)
    hw = load_hardware(base)
    source = f"fitted to {Path(path).name}{f' ({device})' if device else ''} on the peaks of {hw.name}"
    hw = fit.fit_profile(rows, hw, source)
    hw = replace(hw, name=f"{hw.name}-imported", source=source)
    profile = {"schema": SCHEMA, **_profile_fields(hw),
               "measured": {"imported": str(path), "device": device, "rows": len(rows),
                            "fit_mape": _fit_errors(rows, hw)}}
    if out is not None:
        Path(out).write_text(json.dumps(profile, indent=1))
    return profile


def _profile_fields(hw: Hardware) -> dict:
    return {k: v for k, v in hw.to_dict().items() if v not in (None, {}, "") or k == "name"}


def _fit_errors(rows: list, hw: Hardware) -> dict:
    """In-sample MAPE per op class (what the fit achieved on the rows it saw)."""
    groups: dict = {}
    for m in rows:
        groups.setdefault(m.op_class if m.regime in (None, "fp32") else f"{m.regime} gemm", []).append(m)
    return {k: round(fit.mape(v, hw), 4) for k, v in groups.items()}


def summary(profile: dict) -> str:
    """A few lines a person reads after ``fxopt calibrate``."""
    m = profile["measured"]
    km = profile.get("kernel_model", {})
    lines = [f"{profile['name']}: {m.get('device') or m.get('imported')} ({profile.get('source', '')})",
             f"  bandwidth {profile['memory_bandwidth'] / 1e9:,.1f} GB/s (peak the efficiencies refer to)"]
    for regime, p in km.get("matrix", {}).items():
        lines.append(f"  {regime:5} GEMM: eff {p['eff']:.2f}, k_half {p['k_half']:.0f}, reuse {p['reuse']:.2f}, "
                     f"latency {p['latency_s'] * 1e6:.1f} us")
    if "memory" in km:
        lines.append("  memory-bound: " + ", ".join(f"{k} {v:.2f}" for k, v in km["memory"].get("efficiency", {}).items()))
    if "host" in km:
        lines.append(f"  host dispatch {km['host']['fwd'] * 1e6:.2f} us per op")
    lines.append("  fit MAPE (in-sample): " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in m.get("fit_mape", {}).items()))
    return "\n".join(lines)
