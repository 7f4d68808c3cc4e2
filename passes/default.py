"""The default pipeline: which passes run, chosen from the graph's mode and contents, as a table.

Order matters: canonical forms first (the matchers see one form), attention and BN folding
before precision (the fused ops get cast once), channels-last after mixed precision (the layout
change folds into the weight casts), a last dce for what the rewrites left dead.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx

from .base import available
from .opgroups import CONVS, MATRIX

aten = torch.ops.aten


def _has(*targets) -> Callable[[fx.GraphModule, bool], bool]:
    return lambda gm, training: any(n.op == "call_function" and n.target in targets for n in gm.graph.nodes)


def _always(gm, training) -> bool:
    return True


_CONV = tuple(CONVS)
_MATRIX = tuple(MATRIX)

# (pass, applies to this graph?, why it is in the pipeline)
DEFAULT_RULES = [
    ("dce", _always, "drop dead code before costing"),
    ("normalize", _always, "one canonical form for the matchers (div->mul, transpose->permute, no-op removal)"),
    ("sdpa", _has(aten.softmax.int, aten._softmax.default, aten._safe_softmax.default),
     "softmax present: hand-written attention becomes fused SDPA"),
    ("fold-bn", _has(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default),
     "batch norm present: fold eval/frozen BN into the preceding conv/linear"),
    ("epilogue", _has(aten.mm.default, aten.matmul.default, aten.bmm.default, aten.linear.default),
     "GEMMs present: bias/activation epilogues into library kernels"),
    ("mixed-precision{only_if_faster=true}", _has(*_MATRIX),
     "tensor-core work present: bf16 activations, fp32 master weights (only if the step gets faster)"),
    ("channels-last", _has(*_CONV), "convolutions present: NHWC conv regions"),
    ("dce", _always, "remove what the rewrites left dead"),
]


# backend -> passes it adds before the final dce
BACKEND_RULES = {
    "triton": [("fuse", _always, "backend triton: pointwise/row-reduction chains become fxopt Triton kernels")],
}


def choose_pipeline(gm: fx.GraphModule, training: bool, backend: str = "eager") -> tuple[str, list[str]]:
    """The default pipeline for this graph and backend, and one reason per chosen or skipped pass."""
    known, chosen, reasons = set(available()), [], []
    rules = DEFAULT_RULES[:-1] + BACKEND_RULES.get(backend, []) + DEFAULT_RULES[-1:]
    for name, applies, why in rules:
        if name.split("{")[0] not in known:
            reasons.append(f"{name}: skipped, not available in this build")
        elif applies(gm, training):
            chosen.append(name)
            reasons.append(f"{name}: {why}")
        else:
            reasons.append(f"{name}: skipped, nothing for it in this graph")
    return ",".join(chosen), reasons
