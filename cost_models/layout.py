"""How a convolution's memory layout changes its speed: the NHWC speedup table and the factor
the roofline time of a conv is multiplied by in its actual layout.

The roofline (peak x measured efficiency) is what a conv reaches in its best layout. cuDNN's
tensor-core implicit GEMM wants NHWC, so a dense conv in NCHW is ``speedup`` times slower; a
depthwise or grouped conv is weaker in NHWC, so there NHWC is the slower one. The table holds
priors from public cuDNN behaviour; ``fxopt calibrate`` is meant to measure and replace them.
"""
from __future__ import annotations

import torch

# forward + backward time of one conv in NCHW / in NHWC, per conv class and precision
NHWC_SPEEDUP: dict[str, dict[str, float]] = {
    #               16-bit   TF32    fp32 (no tensor cores)
    "dense":      {"16bit": 1.8, "tf32": 1.2, "fp32": 1.0},
    "1x1":        {"16bit": 1.5, "tf32": 1.1, "fp32": 1.0},
    "tiny":       {"16bit": 0.9, "tf32": 0.9, "fp32": 0.9},   # C_in or C_out < 8: channels padded
    "unaligned":  {"16bit": 0.9, "tf32": 1.0, "fp32": 1.0},   # 16-bit, channels not multiples of 8
    "grouped":    {"16bit": 0.77, "tf32": 0.77, "fp32": 0.77},
    "depthwise":  {"16bit": 0.8, "tf32": 0.8, "fp32": 0.8},
}


def _int(x) -> int:
    if isinstance(x, torch.SymInt):
        from torch.fx.experimental.symbolic_shapes import optimization_hint
        return int(optimization_hint(x, fallback=64))
    return int(x)


def precision_key(dtype: torch.dtype) -> str:
    """The NHWC_SPEEDUP column of a conv computing in ``dtype`` (fp32 is TF32 when cuDNN allows it)."""
    if dtype in (torch.bfloat16, torch.float16):
        return "16bit"
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "fp32"


def conv_class_of(x: torch.Tensor, w: torch.Tensor, groups: int) -> tuple[str, str]:
    """``(class, why)`` of a conv from its input, weight (tensors or fakes) and groups."""
    cin, cout = _int(x.shape[1]), _int(w.shape[0])
    if groups > 1 and groups == cin:
        return "depthwise", f"depthwise conv (groups={groups} = C_in)"
    if groups > 1:
        return "grouped", f"grouped conv (groups={groups})"
    if min(cin, cout) < 8:
        return "tiny", f"tiny channel count (C_in={cin}, C_out={cout}; < 8)"
    if precision_key(x.dtype) == "16bit" and (cin % 8 or cout % 8):
        return "unaligned", f"channels not multiples of 8 (C_in={cin}, C_out={cout})"
    if all(_int(k) == 1 for k in w.shape[2:]):
        return "1x1", "1x1 conv"
    return "dense", "dense " + "x".join(str(_int(k)) for k in w.shape[2:]) + " conv"


def nhwc_speedup(x: torch.Tensor, w: torch.Tensor, groups: int = 1) -> float:
    return NHWC_SPEEDUP[conv_class_of(x, w, groups)[0]][precision_key(x.dtype)]


def layout_factor(speedup: float, nhwc: bool) -> float:
    """Slowdown over the roofline of a conv with this NHWC ``speedup`` in the given layout."""
    return max(1.0, 1.0 / speedup) if nhwc else max(1.0, speedup)


def is_nhwc(x: torch.Tensor) -> bool:
    """Channels-last and not also plain contiguous (a [N, C, 1, 1] tensor is both)."""
    try:
        return bool(x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous())
    except Exception:  # undecidable symbolic strides
        return False


def conv_layout(x: torch.Tensor, w: torch.Tensor, groups: int) -> tuple | None:
    """``(class, precision, is_nhwc)`` of a 2-D conv call, what its time factor depends on."""
    if x.dim() != 4 or not x.is_floating_point():
        return None
    return conv_class_of(x, w, groups)[0], precision_key(x.dtype), is_nhwc(x)


def conv_factor(layout: tuple | None, table: dict = NHWC_SPEEDUP) -> float:
    """What the cost model multiplies a conv call's compute time by, in its actual layout; ``table``
    is a device's measured NHWC speedups (``Hardware.layout_table()``) or the priors."""
    if layout is None:
        return 1.0
    cls, prec, nhwc = layout
    return layout_factor(table[cls][prec], nhwc)
