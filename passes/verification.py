"""Verification glue of the pass manager: a candidate graph against the captured model, and
where two graphs start to compute different values.

:func:`verify_graphs` hands the comparison to :func:`fxopt.verify.verify` (float64 reference,
per-dtype floors); :func:`find_divergence` names the first node that changed when it fails.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves

from .base import PassError
from .graph_utils import AsModule, quiet_deepcopy, run_graph, without_dtype_asserts

__all__ = ["verify_graphs", "find_divergence", "Divergence", "failure_text"]


def verify_graphs(reference: fx.GraphModule | nn.Module, candidate: fx.GraphModule, args: tuple, kwargs: dict,
                  training: bool, reference_precision: torch.dtype | None = None):
    """Check ``candidate`` against ``reference`` on the example inputs with :func:`fxopt.verify.verify`
    (nothing passed in is modified). A graph-module reference is run without its dtype
    assertions, so that verify's float64 copy of it (and its autocast run) runs.
    ``reference_precision``: see :func:`fxopt.verify.verify`."""
    from fxopt.verify import verify  # fxopt imports the passes: a module-level import would be a cycle
    if isinstance(reference, fx.GraphModule):
        reference = AsModule(without_dtype_asserts(reference))
    cand = AsModule(quiet_deepcopy(candidate))
    ref = reference
    inputs = dict(kwargs) if kwargs and not args else tuple(args)
    if kwargs and args:
        raise PassError("verification needs either positional or keyword example inputs, not both")
    with warnings.catch_warnings():  # verify deep-copies graph modules: torch's pytree FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        return verify(ref, cand, inputs, training=training, reference_precision=reference_precision)


@dataclass(frozen=True)
class Divergence:
    """The first node whose value differs between the graph before and after a pass."""

    node: str
    max_abs_diff: float | None
    new_inputs: tuple[str, ...] = ()  # inputs of ``node`` that the pass created

    def __str__(self) -> str:
        diff = "different shape/dtype" if self.max_abs_diff is None else f"max abs diff {self.max_abs_diff:.3g}"
        fed = f"; fed by new node(s) {', '.join(self.new_inputs)}" if self.new_inputs else ""
        return f"{self.node} ({diff}{fed})"


def _differs(a, b, rtol: float, any_dtype: bool = False) -> tuple[bool, float | None]:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return True, None
        worst = 0.0
        for x, y in zip(a, b):
            bad, d = _differs(x, y, rtol, any_dtype)
            if bad:
                return True, d
            worst = max(worst, d or 0.0)
        return False, worst
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)) or \
            isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):  # a sequence or tensor against another kind
        return True, None
    if isinstance(a, torch.Tensor):  # (and so is b)
        if a.shape != b.shape or (a.dtype != b.dtype and not (
                any_dtype and a.is_floating_point() and b.is_floating_point())):
            return True, None
        if not a.is_floating_point() and not a.is_complex():
            d = float((a.long() - b.long()).abs().max()) if a.numel() else 0.0  # exact, as integers
            return d > 0, d
        a64, b64 = (t.to(torch.complex128) if t.is_complex() else t.double() for t in (a, b))
        d = float((a64 - b64).abs().max()) if a.numel() else 0.0
        scale = float(a64.abs().max()) if a.numel() else 0.0
        return not (d <= rtol * max(scale, 1e-6)), d
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):  # sizes, scalars: as 0-d values
        return _differs(torch.tensor(a), torch.tensor(b), rtol)
    return False, None


def find_divergence(before: fx.GraphModule, after: fx.GraphModule, args: tuple, kwargs: dict,
                    rtol: float = 1e-4, precision: torch.dtype | None = None) -> Divergence | None:
    """Locate where ``after`` starts computing something else than ``before``.

    Both graphs run on the real example inputs with the same seed, recording every node's
    value. Walking ``after`` in graph order, the first node that also exists in ``before`` (same
    name: passes keep the names of nodes they do not touch) and whose value differs by more than
    ``rtol`` relative to the value's magnitude is returned, with the inputs the pass created
    (usually the culprit). Nodes the pass created have nothing to compare with and are skipped;
    the graph outputs are compared last. None when every compared value agrees, e.g. when only
    gradients or the optimizer step differ. ``precision``: ``after`` computes in that 16-bit dtype
    (its declared precision), so floating values may differ in dtype, and ``rtol`` is raised to 8
    units of that dtype's rounding (bfloat16: 0.0625, float16: 0.0078).
    """
    any_dtype = precision is not None
    if precision is not None:
        rtol = max(rtol, 8 * torch.finfo(precision).eps)
    old_out, old = run_graph(before, args, kwargs, record=True)
    new_out, new = run_graph(after, args, kwargs, record=True)
    old_names = {n.name for n in before.graph.nodes}
    for node in after.graph.nodes:
        if node.op == "output":
            bad, d = _differs(list(tree_leaves(old_out)), list(tree_leaves(new_out)), rtol, any_dtype)
            if bad:
                return Divergence("output", d)
            continue
        if node.name not in old or node.name not in new:
            continue
        bad, d = _differs(old[node.name], new[node.name], rtol, any_dtype)
        if bad:
            created = tuple(a.name for a in node.all_input_nodes if a.name not in old_names)
            return Divergence(node.name, d, created)
    return None


def failure_text(check) -> str:
    """One failed check of a VerificationResult (a TensorCheck, or a string)."""
    if isinstance(check, str):
        return check
    name, note = getattr(check, "name", "?"), getattr(check, "note", "")
    if note:
        return f"{name}: {note}"
    return f"{name}: error {getattr(check, 'cand_error', float('nan')):.3g} > allowed " \
           f"{getattr(check, 'allowed', float('nan')):.3g}"
