"""fxopt's analytical cost model: hardware presets, per-op formulas, step tracing, roofline."""
from .hardware import Hardware, load_hardware, presets
from .ops import Rule, classify, cost_call
from .kernels import CallTime, KernelTime, kernel_time
from .roofline import Precision, bound, call_time
from .trace import Trace, trace_step

__all__ = ["Hardware", "load_hardware", "presets", "Rule", "classify", "cost_call", "CallTime", "KernelTime", "kernel_time", "Precision", "bound",
           "call_time", "Trace", "trace_step"]
