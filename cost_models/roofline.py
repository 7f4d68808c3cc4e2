"""Roofline time of one call: max(FLOPs / peak, bytes / bandwidth) plus a launch overhead.

Peaks are scaled by the device's measured efficiencies (a 8192^3 bf16 GEMM reaches ~81% of the
datasheet peak on an H100, a device copy ~90% of its bandwidth); per-op-class calibration
refines this once a measured profile is loaded (``Hardware.efficiency_by_class``: a matrix class
scales its FLOP/s peak, any other class its bandwidth).
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch

from .hardware import DTYPE_KEYS, Hardware
from .ops import MATRIX_CLASSES


@dataclass(frozen=True)
class Precision:
    """Whether fp32 GEMMs / convs run on TF32 tensor cores (torch's defaults: matmul no, cuDNN yes)."""

    tf32_matmul: bool = False
    tf32_conv: bool = True

    @classmethod
    def from_torch(cls) -> "Precision":
        return cls(torch.get_float32_matmul_precision() != "highest", torch.backends.cudnn.allow_tf32)


@dataclass(frozen=True)
class CallTime:
    compute_s: object
    memory_s: object
    launch_s: float

    @property
    def total_s(self):
        return _max(self.compute_s, self.memory_s) + self.launch_s


def _max(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return max(a, b)


def peak_for(op_class: str, dtype: str | None, hw: Hardware, precision: Precision) -> float:
    key = DTYPE_KEYS.get(dtype or "float32", "fp32")
    if op_class not in MATRIX_CLASSES:
        return hw.vector_peak(key)
    tf32 = precision.tf32_conv if op_class == "conv" else precision.tf32_matmul
    if key == "fp32" and tf32:
        key = "tf32"
    return hw.matrix_peak(key) * hw.class_efficiency(op_class, matrix=True)


def call_time(op_class: str, dtype: str | None, flops, nbytes, kernels: int, hw: Hardware,
              precision: Precision = Precision(), factor: float = 1.0) -> CallTime:
    """``factor`` slows the compute term (a conv in its slower layout, see cost_models.layout)."""
    compute = factor * flops / peak_for(op_class, dtype, hw, precision) if flops else 0.0
    eff = hw.efficiency.get("memory", 1.0) if op_class in MATRIX_CLASSES else hw.class_efficiency(op_class, False)
    memory = nbytes / (hw.memory_bandwidth * eff) if nbytes else 0.0
    return CallTime(compute, memory, kernels * hw.launch_overhead_s)


def bound(compute_s: float, memory_s: float, launch_s: float) -> str:
    """Which term dominates: compute, memory, or launch overhead."""
    terms = {"compute": compute_s, "memory": memory_s, "launch": launch_s}
    return max(terms, key=terms.get) if any(terms.values()) else "none"
