"""fxopt's analytical cost model: hardware presets, per-op formulas, step tracing, roofline."""
from .hardware import Hardware, load_hardware, presets
from .ops import Rule, classify, cost_call
from .roofline import CallTime, Precision, bound, call_time
from .trace import Trace, trace_step

__all__ = ["Hardware", "load_hardware", "presets", "Rule", "classify", "cost_call", "CallTime", "Precision", "bound",
           "call_time", "Trace", "trace_step"]
