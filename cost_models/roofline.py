"""Precision settings and the adapter from what a caller knows of a call (class, dtype, FLOPs,
bytes, GEMM dims) to ``cost_models.kernels.kernel_time``, the one function that computes a
kernel's time. The old constant-efficiency roofline is gone: efficiencies depend on the shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .hardware import DTYPE_KEYS, Hardware
from .kernels import KernelTime, kernel_time, sustained_efficiency
from .ops import MATRIX_CLASSES, matrix_kind


@dataclass(frozen=True)
class Precision:
    """Whether fp32 GEMMs / convs run on TF32 tensor cores (torch's defaults: matmul no, cuDNN yes)."""

    tf32_matmul: bool = False
    tf32_conv: bool = True

    @classmethod
    def from_torch(cls) -> "Precision":
        return cls(torch.get_float32_matmul_precision() != "highest", torch.backends.cudnn.allow_tf32)


def regime(op_class: str, dtype: str | None, precision: Precision) -> tuple[str, str]:
    """``(peak key, kernel-model regime)`` of a matrix call: fp32 runs FFMA unless TF32 is on."""
    key = DTYPE_KEYS.get(dtype or "float32", "fp32")
    tf32 = precision.tf32_conv if op_class == "conv" else precision.tf32_matmul
    if key == "fp32" and tf32:
        key = "tf32"
    return key, {"fp32": "fp32", "tf32": "tf32", "fp64": "fp32"}.get(key, "bf16")


def peak_for(op_class: str, dtype: str | None, hw: Hardware, precision: Precision) -> float:
    """The sustained FLOP/s of a large, well-shaped call of this class (the roof lints and
    scaling formulas draw): the regime's peak times a large GEMM's efficiency."""
    if op_class not in MATRIX_CLASSES:
        return hw.vector_peak(DTYPE_KEYS.get(dtype or "float32", "fp32"))
    key, reg = regime(op_class, dtype, precision)
    return hw.matrix_peak(key) * sustained_efficiency(hw.kernel_param("matrix")[reg]) * \
        hw.kernel_param("kind_eff")[matrix_kind(op_class)]  # every kind has a prior (kernel_params)


def call_time(op_class: str, dtype: str | None, flops, nbytes, kernels: int, hw: Hardware,
              precision: Precision = Precision(), factor: float = 1.0, gemms=(), kind: str | None = None,
              l2_resident: bool = False) -> KernelTime:
    """Time of one call (``cost_models.kernels.kernel_time``), from what the caller knows of it:
    its class, dtype, FLOPs, bytes and, for matrix calls, the GEMMs it runs. ``factor`` slows the
    compute term (a conv in its slower layout, see cost_models.layout)."""
    if kind == "depthwise":   # cuDNN's depthwise kernels stream memory: priced as memory-bound
        op_class = "depthwise"
    elif op_class in MATRIX_CLASSES:
        key, reg = regime(op_class, dtype, precision)
        return kernel_time(op_class, kind or matrix_kind(op_class), reg, hw.matrix_peak(key), flops, nbytes,
                           kernels, gemms, hw, factor)
    return kernel_time(op_class, None, None, hw.vector_peak(DTYPE_KEYS.get(dtype or "float32", "fp32")),
                       flops, nbytes, kernels, (), hw, factor, l2_resident)


def bound(compute_s: float, memory_s: float, launch_s: float) -> str:
    """Which term dominates: compute, memory, or launch overhead."""
    terms = {"compute": compute_s, "memory": memory_s, "launch": launch_s}
    return max(terms, key=terms.get) if any(terms.values()) else "none"
