"""The one place that computes a kernel's GPU time from its shape and the device's parameters.

Matrix kernels (GEMM, bmm, implicit-GEMM conv, fused attention) are priced the way a tiled GPU
library runs them: the output is covered by whole ``tm x tn`` tiles, tiles run in waves over the
SMs, each tile's K loop has a pipeline fill/drain cost (efficiency ``k / (k + k_half)``), smaller
tiles reuse less data (efficiency ``1 - reuse * (1/tm + 1/tn)``), split-K is used when it helps,
and tensor cores lose throughput on misaligned K/N. The library is assumed to pick the fastest
(tile, split) pair. Memory-bound kernels move their bytes at a bandwidth that ramps with size
(``bytes / (bytes + ramp_bytes)`` of the class's sustained bandwidth), L2-resident ones faster.
Every kernel pays a fixed GPU latency.

Parameters live in the hardware profile (``Hardware.kernel_model``): presets carry priors and
figures fitted from published measurements (``cost_models/fit.py``); ``fxopt calibrate``
measures them on a device. Each profile says where its numbers came from.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy

# Regime of a matrix kernel: FFMA (fp32, no tensor cores), TF32 tensor cores, 16-bit tensor cores.
REGIMES = ("fp32", "tf32", "bf16")
MEMORY_CLASSES = ("pointwise", "reduction", "norm", "softmax", "pooling", "memory", "random", "optimizer",
                  "fused", "unknown", "depthwise")

# Priors: what a profile that lacks a parameter gets. Tile shapes are the ones cuBLAS/CUTLASS
# kernels use (FFMA: ``sm80_xmma_gemm_f32f32_*_tilesize128x128x8`` and 64x64, CUTLASS simt
# 128x256, as named in the kernel columns of the NeuSight H100 measurements; sm90 tensor-core
# GEMMs: 128x256, 128x128, 128x64 (also flash attention's block of query rows by head dim), 64x64).
DEFAULT_MATRIX = {
    "fp32": {"eff": 0.80, "k_half": 48.0, "reuse": 4.0, "latency_s": 4e-6, "reduce_bw": 5e12, "align": 1,
             "misaligned": 1.0, "tiles": [[128, 256], [128, 128], [128, 64], [64, 64]]},
    "tf32": {"eff": 0.65, "k_half": 96.0, "reuse": 8.0, "latency_s": 4e-6, "reduce_bw": 5e12, "align": 4,
             "misaligned": 0.5, "tiles": [[128, 256], [128, 128], [128, 64], [64, 64]]},
    "bf16": {"eff": 0.82, "k_half": 128.0, "reuse": 8.0, "latency_s": 4e-6, "reduce_bw": 5e12, "align": 8,
             "misaligned": 0.5, "tiles": [[128, 256], [128, 128], [128, 64], [64, 64]]},
}
# kind -> efficiency of that matrix kernel relative to a plain GEMM of the same GEMM dims
DEFAULT_KIND_EFF = {"gemm": 1.0, "conv": 0.85, "conv_1x1": 0.95, "attention_fwd": 0.65,
                    "attention_bwd": 0.45}
DEFAULT_MEMORY = {"latency_s": 2.5e-6, "ramp_bytes": 1.0e6, "l2_speedup": 1.6,
                  "efficiency": {"pointwise": 0.88, "reduction": 0.80, "norm": 0.80, "softmax": 0.80,
                                 "pooling": 0.70, "memory": 0.85, "random": 0.80, "optimizer": 0.85,
                                 "fused": 0.85, "unknown": 0.70, "depthwise": 0.45}}
# host cost of launching one kernel from eager PyTorch (Python + dispatcher + launch), per phase
DEFAULT_HOST = {"fwd": 6e-6, "bwd": 4e-6, "opt": 2e-6}


@dataclass(frozen=True)
class KernelTime:
    """Predicted time of one call, split in the terms a user reasons about.

    ``compute_s`` / ``memory_s`` are the two roofs with this kernel's shape-dependent
    efficiencies; ``latency_s`` the fixed GPU latency of its launches; ``why`` names the rule.
    """

    compute_s: object
    memory_s: object
    latency_s: float
    why: str = ""

    @property
    def total_s(self):
        return _max(self.compute_s, self.memory_s) + self.latency_s

    # names the report and lints used for the roofline split
    @property
    def launch_s(self) -> float:
        return self.latency_s


CallTime = KernelTime  # the roofline's old name; same fields


def _max(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return max(a, b)


@dataclass(frozen=True)
class GemmChoice:
    """How a GEMM is predicted to run: tile, split-K, waves and the efficiency that results."""

    tile: tuple
    split_k: int
    tiles: int
    waves: int
    slots: int          # tiles that run at once (SMs x CTAs of this tile per SM): one wave
    efficiency: float   # achieved FLOP/s over the regime's peak
    time_s: float


def gemm_choice(b: int, m: int, n: int, k: int, peak: float, sm_count: int, p: dict) -> GemmChoice:
    """The fastest (tile, split-K) for a ``b x [m,k] @ [k,n]`` GEMM under the tile/wave model."""
    return _gemm_choice(int(b), int(m), int(n), int(k), float(peak), int(sm_count),
                        _freeze(p))


def _freeze(p: dict) -> tuple:
    return tuple(sorted((k, tuple(map(tuple, v)) if k == "tiles" else v) for k, v in p.items()))


@functools.lru_cache(maxsize=65536)
def _gemm_choice(b, m, n, k, peak, sms, frozen) -> GemmChoice:
    p = dict(frozen)
    flops = 2.0 * b * m * n * k
    sms = max(sms, 1)
    per_sm = peak / sms
    align = int(p.get("align", 1))
    misaligned = p.get("misaligned", 1.0) if align > 1 and (k % align or n % align) else 1.0
    best = None
    for tm, tn in p["tiles"]:
        tile_eff = max(0.05, 1.0 - p["reuse"] * (1.0 / tm + 1.0 / tn))
        ctas = max(1, (128 * 256) // (tm * tn))      # CTAs of this tile that share one SM
        tiles = b * math.ceil(m / tm) * math.ceil(n / tn)
        for split in (1, 2, 3, 4, 6, 8, 12, 16):
            kk = math.ceil(k / split)
            if split > 1 and (kk < 128 or tiles * (split // 2) >= sms * ctas):
                break
            keff = kk / (kk + p["k_half"])
            rate = per_sm * p["eff"] * tile_eff * keff * misaligned     # FLOP/s of one busy SM
            waves = math.ceil(tiles * split / (sms * ctas))
            t = waves * ctas * 2.0 * tm * tn * kk / rate
            if split > 1:   # partial tiles written and summed: fp32 partials through memory
                t += 2.0 * split * m * n * b * 4 / p["reduce_bw"]
            if best is None or t < best.time_s:
                best = GemmChoice((tm, tn), split, tiles, waves, sms * ctas, flops / t / peak, t)
    return best


def sustained_efficiency(p: dict, k: int = 4096) -> float:
    """Share of peak a large GEMM reaches: the biggest tile's reuse at a long K loop. What a
    call without known GEMM dims is priced at, and the roof lints and scaling formulas draw."""
    tm, tn = max(p["tiles"], key=lambda t: t[0] * t[1])
    return p["eff"] * max(0.05, 1.0 - p["reuse"] * (1.0 / tm + 1.0 / tn)) * k / (k + p["k_half"])


def memory_time(op_class: str, nbytes, hw, l2_resident: bool = False):
    """Bytes over the class's sustained bandwidth, ramping up with size (latency excluded)."""
    if not nbytes:
        return 0.0
    mp = hw.kernel_param("memory")
    eff = mp["efficiency"].get(op_class, mp["efficiency"].get("memory", 0.85))
    bw = hw.memory_bandwidth * eff * (mp.get("l2_speedup", 1.0) if l2_resident else 1.0)
    hint = _hint(nbytes)
    ramp = hint / (hint + mp["ramp_bytes"]) if hint else 1.0
    return nbytes / (bw * ramp)


def _hint(x) -> float:
    """A concrete value for a size that may be a sympy expression (its symbols at 1 are too small
    to decide a ramp, so symbols take ``SYMBOL_HINT``)."""
    if isinstance(x, sympy.Basic):
        return float(x.subs({s: SYMBOL_HINT for s in x.free_symbols}))
    if not isinstance(x, (int, float)):   # a SymInt: its hint, without guarding (float() would
        from .layout import _int           # specialize the shared ShapeEnv's symbol)
        return float(_int(x))
    return float(x)


SYMBOL_HINT = 64


def matrix_time(kind: str, regime: str, peak: float, flops, gemms, hw):
    """Compute time of a matrix call: its FLOPs at the rate its GEMMs reach under the tile model.

    ``gemms`` are the call's ``(b, m, n, k)`` GEMMs at concrete (hint) sizes; the call's FLOPs may
    be symbolic, so the rate is taken at the hint and the time stays a formula in the symbols.
    """
    if not flops:
        return 0.0, ""
    p = hw.kernel_param("matrix")[regime]
    kind_eff = hw.kernel_param("kind_eff").get(kind, 1.0)
    if not gemms:   # no shape known: a large GEMM's efficiency
        eff = sustained_efficiency(p) * kind_eff
        return flops / (peak * eff), f"{regime} {kind} at {eff:.0%} (no shape)"
    t_gemm, f_gemm, notes = 0.0, 0.0, []
    for g in gemms:
        g = tuple(max(1, int(_hint(x))) for x in g)
        c = gemm_choice(*g, peak, hw.sm_count or 1, p)
        t_gemm += c.time_s
        f_gemm += 2.0 * g[0] * g[1] * g[2] * g[3]
        notes.append(f"{'x'.join(map(str, g[1:]))}{'' if g[0] == 1 else f' (x{g[0]})'}: tile "
                     f"{c.tile[0]}x{c.tile[1]}{f' split-k {c.split_k}' if c.split_k > 1 else ''}, "
                     f"{c.waves} wave(s), {c.efficiency:.0%}")
    rate = f_gemm / t_gemm * kind_eff if t_gemm else peak * sustained_efficiency(p) * kind_eff
    return flops / rate, f"{regime} {kind}: " + "; ".join(notes)


def kernel_time(op_class: str, kind: str | None, regime: str | None, peak: float, flops, nbytes,
                kernels: int, gemms, hw, factor: float = 1.0, l2_resident: bool = False) -> KernelTime:
    """Predicted time of one ATen call: the only function that turns a call's shape into seconds.

    ``kind`` is the matrix kernel kind (gemm, conv, conv_1x1, attention_fwd/bwd) or None for a
    memory-bound call; ``regime`` the matrix regime (fp32/tf32/bf16); ``peak`` its FLOP/s peak (for
    a non-matrix call, the vector peak); ``factor`` slows the compute term (a conv in its slower
    memory layout).
    """
    if not kernels and not flops and not nbytes:
        return KernelTime(0.0, 0.0, 0.0, "no kernel")
    if kind is not None:
        compute, why = matrix_time(kind, regime, peak, flops, gemms, hw)
        compute = compute * factor
        # operands stream at the memory roof; at most one launch latency per GEMM
        memory = memory_time("memory", nbytes, hw)
        latency = kernels * hw.kernel_param("matrix")[regime]["latency_s"]
    else:
        compute = flops / peak if flops else 0.0
        memory = memory_time(op_class, nbytes, hw, l2_resident)
        latency = kernels * hw.kernel_param("memory")["latency_s"]
        why = f"{op_class}: bandwidth ramp"
    return KernelTime(compute, memory, latency, why)


def host_time(phase: str, kernels: int, hw) -> float:
    """CPU time eager PyTorch spends dispatching and launching ``kernels`` kernels in ``phase``."""
    return kernels * hw.kernel_param("host").get(phase, hw.kernel_param("host")["fwd"])


def critical_path(gpu_s: list, host_s: list) -> tuple[float, float, list]:
    """Step time when a host issues kernels in order and the GPU runs them in order.

    Kernel ``i`` starts at ``max(issued_i, end_{i-1})`` with ``issued_i`` the host's running sum of
    dispatch costs; returns ``(step time, GPU idle time waiting for the host, idle per kernel)``.
    """
    issued = end = 0.0
    idle = []
    for g, h in zip(gpu_s, host_s):
        issued += h
        start = max(issued, end)
        idle.append(start - end)
        end = start + g
    return end, sum(idle), idle
