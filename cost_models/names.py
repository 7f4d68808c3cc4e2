"""Names every layer spells the same way (cost model, passes, fxopt): one definition each.

Why here: cost_models is the bottom layer, so passes and fxopt can both import it without a cycle.
"""
from __future__ import annotations

__all__ = ["OPTIMIZER_NODE", "PRECISION_KEY", "dtype_name"]

#: The trace/profile row of ``optimizer.step()`` (not an fx node; kept apart from the graph's names).
OPTIMIZER_NODE = "optimizer.step"

#: ``GraphModule.meta`` key of the precision a pass lowered the graph to ("bfloat16"/"float16"), read by
#: fxopt.verify and the pass manager.
PRECISION_KEY = "fxopt.precision"


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` (or the string "torch.bfloat16") -> "bfloat16": the spelling the hardware
    tables, reports and graph meta use."""
    return str(dtype).replace("torch.", "")
