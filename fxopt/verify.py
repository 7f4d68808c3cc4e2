"""Prove a rewritten model numerically equal to the original, the way PyTorch's benchmark suites do.

``verify(reference, candidate, inputs)`` runs three models on the same inputs:

* a float64 copy of the reference (``deepcopy(reference).double()``, floating inputs cast too; in
  an fx graph it runs, float32 dtype arguments and constants become float64, since a captured graph
  bakes in the casts of the traced run), the best available estimate of the exact answer;
* the reference as given, at its own precision;
* the candidate as given (any ``nn.Module`` whose parameter and buffer names match the reference,
  e.g. a rewritten ``GraphModule``).

Inputs are fresh leaves (their ``.grad`` is the input gradient) handed to the model as clones, so a
model that mutates its input in place (``x.mul_(2)``) runs as it does in eager.

Deep copies are run, so the user's models, their ``.grad``, their training flags, the example inputs
and the global RNG state are left as they were.

What is compared
----------------
Training mode (``training=True``): one forward under ``torch.enable_grad``; the scalar loss
``sum_i (out_i.double() * w_i).sum()`` over every floating output (nested dict/tuple outputs are
flattened with ``torch.utils._pytree``), with fixed standard-normal weights ``w_i`` drawn from a
generator seeded with ``seed`` (so the output gradient is not all ones); backward; one
``torch.optim.SGD(lr=lr)`` step. Checked: outputs (``output[...]``), gradients of floating inputs
(``grad[input0]``, ``grad[<kwarg>]``), parameter gradients (``grad[<param>]``, a missing ``.grad`` counts
as zeros), parameters after the step (``param_after_step[<param>]``) and floating buffers after the
forward, e.g. BatchNorm running statistics (``buffer[<name>]``).
Eval mode (``training=False``): outputs and floating buffers, under ``torch.no_grad``.
Parameters and buffers are matched by name; a name missing on either side is a failed check.

Tolerance rule
--------------
Per tensor, with ``ref`` the float64 result, ``e_ref = max|reference - ref|`` (the original's own
rounding error) and ``e_cand = max|candidate - ref|``, the candidate passes if::

    e_cand <= multiple * e_ref + floor * max(1, max|ref|)

``multiple`` defaults to 3.0: the candidate may be up to 3x as far from the exact answer as the
original already is. ``floor`` absorbs rounding noise where ``e_ref`` happens to be tiny; by default it
follows the coarser of the reference tensor's and the candidate tensor's dtype: float64 1e-12,
float32 1e-5, float16 1e-3, bfloat16 1e-2, float8 1e-1, integer/bool 0 (exact). Pass a number to use one
floor everywhere, or a ``{dtype: floor}`` dict to override entries of that table. NaN/inf in the
candidate where ``ref`` is finite always fails; where ``ref`` itself is NaN/inf the candidate must
match it. Shapes must match exactly. Tensors are compared in float64 on the CPU.

Precision changes are not equalities. The floor follows the dtype a tensor *has*, so a candidate that
computes internally in bfloat16 but hands back float32 outputs and input gradients is judged at
float32 on those tensors and fails against a float32 reference. ``floor=1e-2`` (or
``floor={torch.float32: 1e-2}``) admits deviations of one percent of a tensor's scale: enough for the
bfloat16 rounding of a shallow forward (``training=False``), not necessarily of a deep one, and a
bfloat16 train step usually still fails on gradients: reductions over the batch cancel, and bfloat16
rounding leaves gradient errors of several percent of the gradient's magnitude. To verify a rewrite of a low-precision model, pass the low-precision model itself as
the reference: its own error ``e_ref`` then sets the scale and ``multiple`` absorbs the rounding.
To verify an fp32 model rewritten to compute in 16 bits, use ``reference_precision`` (below).

When the float64 copy cannot run
---------------------------------
Eager code that hard-codes float32 (``torch.zeros(b, h)`` for a recurrent state, an attention's
``softmax(..., dtype=torch.float32)``, HF eager attention's casts) cannot run in float64. Then the
reference at its own precision is ``ref``, and ``e_ref`` is the original's own noise: the reference
run again with every floating input, parameter and buffer moved by ``PERTURB_UNITS`` (1) rounding
unit of its dtype, a random sign per element (how far a rounding-level change of what the model
reads moves each result). The rule is the same formula, ``e_cand <= multiple * e_ref + floor *
max(1, max|ref|)``, with these ``ref`` and ``e_ref``; with ``reference_precision``, ``ref`` is the
reference at its own precision and ``e_ref`` its autocast run's distance from it. The result says so:
``VerificationResult.reference`` is ``"own precision: the float64 copy failed (<cause>)"`` (else
``"float64"``), the verdict and ``rule`` repeat it. A reference that fails at its own precision too
is a VerificationError naming both causes and what to check.

Randomness
----------
The RNG is seeded with ``torch.manual_seed(seed)`` (all devices) before each of the three forward
passes, so dropout masks agree when the graphs make the same random calls in the same order. On the
CPU, dropout draws the same mask for float32, float64 and bfloat16 tensors. On CUDA the kernel's
launch shape may depend on the dtype; a float64 mask that differs from the float32 one shows up as a
``ref_error`` far above rounding level, and makes ``multiple * e_ref`` meaningless: check it, or verify
such models on the CPU or with ``training=False``. A rewrite that changes the number or order of
random calls cannot match masks either and must be verified with ``training=False``.

Mixed-precision rewrites: ``reference_precision``
-------------------------------------------------
A rewrite that runs an fp32 model in 16 bits (``mixed-precision``) is judged the way PyTorch's
benchmark suites judge AMP: against the float64 reference, allowing ``multiple`` times the error the
*original* model makes when it runs at that precision. With ``reference_precision=torch.bfloat16``
(or ``torch.float16``, ``"bf16"``, ``"fp16"``), the reference-precision run is the reference model's
forward under ``torch.autocast(device.type, dtype=reference_precision)`` (a well-established 16-bit
baseline; its backward and the SGD step run outside autocast, as in AMP training), so::

    e_ref = max|reference under autocast - ref|
    e_cand <= multiple * e_ref + floor(reference_precision) * max(1, max|ref|)

with the floor of the 16-bit dtype (bfloat16 1e-2, float16 1e-3) for every floating tensor. NaN/inf
in the candidate where ``ref`` is finite still fails (an fp16 overflow is never tolerated).

``reference_precision="auto"`` (the default) takes the precision the candidate declares: a graph
module that fxopt lowered carries it as ``gm.meta["fxopt.precision"]`` (:data:`PRECISION_KEY`), seen
also through the wrappers that hold such a graph as ``_gm`` (the pass manager's and
``OptimizedModule``'s); a candidate that declares nothing is judged at its own dtypes, as above.
``reference_precision=None`` turns this off.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tabulate import tabulate
from torch import fx, nn
from torch.utils._pytree import GetAttrKey, MappingKey, SequenceKey, tree_flatten_with_path, tree_map

from .capture import normalize_inputs
from .cost_models.names import PRECISION_KEY, dtype_name
from .errors import FxoptError, InputError

__all__ = ["TensorCheck", "VerificationResult", "VerificationError", "verify", "check_tensor",
           "DEFAULT_FLOORS", "DEFAULT_MULTIPLE", "PRECISION_KEY", "declared_precision", "parse_precision"]

KINDS = ("output", "input_grad", "param_grad", "param_after_step", "buffer")

DEFAULT_MULTIPLE = 3.0

#: Absolute floor (scaled by max(1, max|ref|)) per dtype; the coarser dtype of the two sides wins.
DEFAULT_FLOORS: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.complex128: 1e-12,
    torch.float32: 1e-5,
    torch.complex64: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
    if hasattr(torch, _name):
        DEFAULT_FLOORS[getattr(torch, _name)] = 1e-1

#: Rounding units by which the own-precision rule moves inputs and weights to measure the noise floor.
PERTURB_UNITS = 1.0

log = logging.getLogger(__name__)

_PRECISIONS = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
               "float16": torch.float16, "half": torch.float16}


class VerificationError(FxoptError):
    """Verification could not be carried out (a model failed to run, nothing to compare)."""


@dataclass
class TensorCheck:
    """One compared tensor."""

    name: str  # "output[det_logits]", "grad[input0]", "grad[fc.weight]", "param_after_step[fc.bias]", ...
    kind: str  # one of KINDS
    ref_error: float  # max|reference - float64 reference|
    cand_error: float  # max|candidate - float64 reference|
    allowed: float  # bound cand_error must stay under
    ok: bool
    dtype: str = ""  # "reference dtype -> candidate dtype"
    note: str = ""  # why it failed, where that is not just "too far" (missing, shape, non-finite)

    @property
    def ratio(self) -> float:
        """cand_error / allowed (inf when a failure has no finite error or nothing is allowed)."""
        if not self.ok and (math.isinf(self.cand_error) or math.isnan(self.cand_error)):
            return math.inf
        if self.allowed == 0:
            return 0.0 if self.cand_error == 0 else math.inf
        return self.cand_error / self.allowed


@dataclass
class VerificationResult:
    ok: bool
    checks: list[TensorCheck]
    rule: str
    training: bool = True
    precision: torch.dtype | None = None  # the reference precision the rule used (None: the reference's own)
    reference: str = "float64"  # what "ref" was: "float64", or "own precision: <why the float64 copy failed>"

    def failures(self) -> list[TensorCheck]:
        return [c for c in self.checks if not c.ok]

    def worst(self) -> list[TensorCheck]:
        """Checks ordered worst first: failures first, then by cand_error / allowed."""
        return sorted(self.checks, key=lambda c: (c.ok, -c.ratio))

    def verdict(self) -> str:
        n, bad = len(self.checks), self.failures()
        mode = "train step" if self.training else "eval forward"
        if self.precision is not None:
            mode += f" (judged at {dtype_name(self.precision)})"
        if self.reference != "float64":
            mode += f" (reference: the original at its {self.reference})"
        if not bad:
            worst = self.worst()[0] if self.checks else None
            tail = f"; closest: {worst.name} at {worst.ratio:.2g} of allowed" if worst else ""
            return f"PASS: all {n} tensors of the {mode} within tolerance{tail}"
        names = ", ".join(c.name for c in bad[:3]) + (", ..." if len(bad) > 3 else "")
        return f"FAIL: {len(bad)} of {n} tensors of the {mode} out of tolerance ({names})"

    def table(self, limit: int | None = None) -> str:
        """A table of the checks, worst first (at most ``limit`` rows), then a one-line verdict."""
        rows = []
        ordered = self.worst()
        for c in ordered[:limit] if limit is not None else ordered:
            rows.append([
                "ok" if c.ok else "FAIL", c.name, c.kind, c.dtype,
                f"{c.ref_error:.3g}", f"{c.cand_error:.3g}", f"{c.allowed:.3g}", f"{c.ratio:.3g}", c.note,
            ])
        text = tabulate(rows, headers=["", "tensor", "kind", "dtype", "ref err", "cand err", "allowed",
                                       "cand/allowed", "note"], disable_numparse=True)
        if limit is not None and len(ordered) > limit:
            text += f"\n... {len(ordered) - limit} more checks"
        return f"{text}\n{self.verdict()}"

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------
# Tolerance
# ----------------------------------------------------------------------------------


def _non_negative(name: str, value, kinds: str) -> float:
    """``value`` as a float >= 0, or an InputError naming the argument."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be {kinds}, got {value!r}") from None
    if number < 0 or math.isnan(number):
        raise InputError(f"{name} must be >= 0, got {value!r}")
    return number


def _floor_table(floor) -> dict[torch.dtype, float] | float:
    if floor is None:
        return dict(DEFAULT_FLOORS)
    if isinstance(floor, Mapping):
        table = dict(DEFAULT_FLOORS)
        for k, v in floor.items():
            if not isinstance(k, torch.dtype):
                raise InputError(f"floor dict keys must be torch dtypes, got {k!r}")
            table[k] = float(v)
        return table
    return _non_negative("floor", floor, "a number, a {dtype: floor} dict or None")


def _floor_for(table, *dtypes: torch.dtype | None) -> float:
    if isinstance(table, float):
        return table
    out = 0.0
    for dt in dtypes:
        if dt is not None and (dt.is_floating_point or dt.is_complex):
            out = max(out, table.get(dt, DEFAULT_FLOORS.get(dt, 1e-1)))
    return out


def parse_precision(precision) -> torch.dtype | None:
    """``None``, a 16-bit torch dtype or its name (``"bf16"``, ``"fp16"``) -> a torch dtype or None."""
    if precision is None or precision in (torch.bfloat16, torch.float16):
        return precision
    if isinstance(precision, str) and dtype_name(precision.lower()) in _PRECISIONS:
        return _PRECISIONS[dtype_name(precision.lower())]
    raise InputError(f"reference_precision must be torch.bfloat16, torch.float16 (or 'bf16', 'fp16'), "
                     f"'auto' or None; got {precision!r}")


def declared_precision(module) -> torch.dtype | None:
    """The precision a candidate declares: ``meta[PRECISION_KEY]`` of a graph module fxopt lowered,
    looked up on the module itself or on the graph module a wrapper holds as ``_gm``."""
    for m in (module, getattr(module, "_gm", None)):
        meta = getattr(m, "meta", None)
        if isinstance(meta, dict) and meta.get(PRECISION_KEY) is not None:
            return parse_precision(meta[PRECISION_KEY])
    return None


def _rule_text(multiple: float, table, precision: torch.dtype | None = None, own: bool = False) -> str:
    base = f"e_cand <= {multiple:g} * e_ref + floor * max(1, max|ref|)"
    if precision is not None:
        floors = f"floor = {table:g} for every tensor" if isinstance(table, float) else \
            f"floor = {_floor_for(table, precision):g} (the {dtype_name(precision)} floor) for every floating tensor"
        e_ref = f"e_ref = max|reference under torch.autocast({dtype_name(precision)}) - ref|"
    elif isinstance(table, float):
        floors, e_ref = f"floor = {table:g} for every tensor", "e_ref = max|reference - ref|"
    else:
        names = [(torch.float64, "float64"), (torch.float32, "float32"), (torch.float16, "float16"),
                 (torch.bfloat16, "bfloat16")]
        floors = "floor by the coarser dtype of reference and candidate tensor: " + ", ".join(
            f"{n} {table[d]:g}" for d, n in names) + ", integer 0"
        e_ref = "e_ref = max|reference - ref|"
    ref = "float64 copy of the reference"
    if own:
        ref = "the reference at its own precision (its float64 copy could not run)"
        if precision is None:
            e_ref = (f"e_ref = max|reference with every floating input, parameter and buffer moved by "
                     f"{PERTURB_UNITS:g} rounding unit (random sign) - ref|")
    return (f"{base}, where ref = {ref}, {e_ref}, "
            f"e_cand = max|candidate - ref|; {floors}; NaN/inf in the candidate where ref is finite fails; "
            f"shapes must match")


def _to_cmp(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    if t.is_complex():
        return t.to(torch.complex128)
    return t.to(torch.float64)


def _max_abs_err(x: torch.Tensor, ref: torch.Tensor, ref_finite: torch.Tensor) -> tuple[float, bool]:
    """max |x - ref| over positions where ref is finite, and whether x is non-finite anywhere ref is."""
    if ref.numel() == 0:
        return 0.0, False
    x_finite = torch.isfinite(x)
    bad_nonfinite = bool((ref_finite & ~x_finite).any())
    # Where ref is not finite, x must be the same NaN / the same inf.
    nf = ~ref_finite
    mismatch_nf = False
    if bool(nf.any()):
        same = (torch.isnan(x) & torch.isnan(ref)) | (x == ref)
        mismatch_nf = bool((nf & ~same).any())
    err = torch.where(ref_finite & x_finite, (x - ref).abs(), torch.zeros((), dtype=torch.float64))
    e = float(err.max())
    if bad_nonfinite or mismatch_nf:
        e = math.inf
    return e, bad_nonfinite or mismatch_nf


def check_tensor(name: str, kind: str, ref64: torch.Tensor | None, ref: torch.Tensor | None,
                 cand: torch.Tensor | None, *, multiple: float = DEFAULT_MULTIPLE, floor=None,
                 reference_precision=None) -> TensorCheck:
    """Judge one tensor by the tolerance rule (module doc): ``ref64`` the float64 result, ``ref`` the
    reference at its own precision (at ``reference_precision`` when given), ``cand`` the candidate; None
    marks a name missing on that side. ``floor`` is None, a number or a ``{dtype: floor}`` dict, as for
    :func:`verify`; ``reference_precision`` adds that dtype's floor."""
    return _compare(name, kind, ref64, ref, cand, float(multiple), _floor_table(floor),
                    parse_precision(reference_precision))


def _compare(name: str, kind: str, ref64, ref, cand, multiple: float, floors,
             precision: torch.dtype | None = None) -> TensorCheck:
    def fail(note, dtype=""):
        return TensorCheck(name, kind, math.inf, math.inf, 0.0, False, dtype, note)

    if cand is None:
        return fail("missing in the candidate")
    if ref64 is None or ref is None:
        return fail("missing in the reference")
    dtype = f"{dtype_name(ref.dtype)} -> {dtype_name(cand.dtype)}"
    if precision is not None:
        dtype = f"{dtype_name(ref.dtype)}@autocast({dtype_name(precision)}) -> {dtype_name(cand.dtype)}"
    if tuple(cand.shape) != tuple(ref64.shape):
        return fail(f"shape {tuple(cand.shape)} != reference {tuple(ref64.shape)}", dtype)
    r64, r, c = _to_cmp(ref64), _to_cmp(ref), _to_cmp(cand)
    finite = torch.isfinite(r64)
    scale = float(r64.abs().masked_fill(~finite, 0).max()) if r64.numel() else 0.0
    if tuple(r.shape) == tuple(r64.shape):
        e_ref, _ = _max_abs_err(r, r64, finite)
    else:
        e_ref = math.inf
    e_cand, nonfinite = _max_abs_err(c, r64, finite)
    floor = _floor_for(floors, ref.dtype, cand.dtype, precision if _is_float(ref64) else None)
    allowed = (multiple * e_ref if multiple > 0 and e_ref > 0 else 0.0) + floor * max(1.0, scale)
    note = ""
    if nonfinite:
        note = "NaN/inf where the float64 reference is finite (or differs from its NaN/inf)"
    ok = not nonfinite and e_cand <= allowed
    return TensorCheck(name, kind, e_ref, e_cand, allowed, ok, dtype, note)


# ----------------------------------------------------------------------------------
# Running the three models
# ----------------------------------------------------------------------------------


def _key_str(path) -> str:
    parts = []
    for k in path:
        if isinstance(k, MappingKey):
            parts.append(f"[{k.key}]")
        elif isinstance(k, SequenceKey):
            parts.append(f"[{k.idx}]")
        elif isinstance(k, GetAttrKey):
            parts.append(f"[{k.name}]")
        else:
            parts.append(f"[{k}]")
    return "".join(parts)


def _tensor_leaves(tree) -> dict[str, torch.Tensor]:
    leaves, _ = tree_flatten_with_path(tree)
    return {_key_str(p): v for p, v in leaves if isinstance(v, torch.Tensor)}


def _input_leaves(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    out = {}
    for i, a in enumerate(args):
        for k, v in _tensor_leaves(a).items():
            out[f"input{i}{k}"] = v
    for name, a in kwargs.items():
        for k, v in _tensor_leaves(a).items():
            out[f"{name}{k}"] = v
    return out


def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _prepare_inputs(args, kwargs, device, double: bool, requires_grad: bool, perturb: float = 0.0,
                    gen: torch.Generator | None = None):
    """Private copies of the inputs: the leaves that collect input gradients, and what the model is
    called with (a differentiable clone of each leaf, so a model that mutates its input in place,
    ``x.mul_(2)``, runs as in eager instead of failing on a leaf that requires grad)."""
    def conv(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().to(device)
        if t.is_floating_point() and double:
            t = t.to(torch.float64)
        t = t.clone()
        if perturb and t.is_floating_point():
            t = _perturbed(t, perturb, gen)
        if requires_grad and _is_float(t):
            t.requires_grad_(True)
        return t

    def call(t):
        return t.clone() if isinstance(t, torch.Tensor) and t.requires_grad else t

    leaves = tree_map(conv, args), tree_map(conv, kwargs)
    return leaves, (tree_map(call, leaves[0]), tree_map(call, leaves[1]))


def _perturbed(t: torch.Tensor, units: float, gen: torch.Generator | None) -> torch.Tensor:
    """``t`` with each element moved by ``units`` rounding units of its dtype, with a random sign:
    a change as small as the rounding the model's own arithmetic makes."""
    sign = torch.randint(0, 2, tuple(t.shape), generator=gen).to(t.device, t.dtype) * 2 - 1
    return t + t * (units * torch.finfo(t.dtype).eps) * sign


@dataclass
class _Run:
    outputs: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    input_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    after_step: dict[str, torch.Tensor] = field(default_factory=dict)


def _keep(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a result (compared on the CPU anyway; frees accelerator memory early)."""
    return t.detach().to("cpu", copy=True)


def _grad_or_zeros(t: torch.Tensor) -> torch.Tensor:
    """A missing ``.grad`` means a zero gradient (that is what SGD does with it)."""
    return _keep(t.grad) if t.grad is not None else torch.zeros(t.shape, dtype=t.dtype)


class _RunFailed(VerificationError):
    """One of the verification runs raised; ``cause`` is the model's own exception."""

    def __init__(self, message: str, cause: BaseException):
        super().__init__(message)
        self.cause = cause


def _run(label: str, model: nn.Module, example_inputs, device, *, double: bool, training: bool, lr: float,
         seed: int, weights: dict[str, torch.Tensor], autocast: torch.dtype | None = None,
         first: bool | None = None, perturb: float = 0.0) -> _Run:
    """One forward (+ loss, backward and SGD step when training) of ``model``, a private copy.

    ``weights`` maps output names to loss weights; an output without one in the ``first`` run (the
    exact reference: by default the float64 one) gets fresh standard-normal weights from a generator
    seeded with ``seed``, and later runs reuse them.
    ``autocast``: run the forward under ``torch.autocast(device.type, dtype=autocast)``.
    ``perturb``: move every floating parameter, buffer and input by that many rounding units (a
    random sign per element) before running: the noise run of the own-precision rule (module doc).
    """
    first = double if first is None else first
    args, kwargs = normalize_inputs(example_inputs)
    gen = torch.Generator().manual_seed(seed + 1)
    (args, kwargs), (call_args, call_kwargs) = _prepare_inputs(args, kwargs, device, double=double,
                                                               requires_grad=training, perturb=perturb, gen=gen)
    if model.training != training:  # keep submodule modes the user set (frozen batch norm in a training model)
        model.train(training)
    if perturb:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.is_floating_point():
                    t.copy_(_perturbed(t, perturb, gen))
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)  # seeds every device's generator: same dropout masks on every run
    try:
        amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with torch.enable_grad() if training else torch.no_grad(), amp:
            out = model(*call_args, **call_kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise _RunFailed(f"the {label} failed to run on the example inputs: {type(e).__name__}: {e}", e) from e
    outputs = {f"output{k}": v for k, v in _tensor_leaves(out).items()}
    run = _Run(outputs={k: _keep(v) for k, v in outputs.items()},
               buffers={n: _keep(b) for n, b in model.named_buffers() if _is_float(b)})
    if not training:
        return run

    gen = None
    terms = []
    for k, o in outputs.items():
        if not o.is_floating_point():
            continue
        if k not in weights:
            if not first:  # an output the exact reference lacks stays out of the loss
                continue
            gen = gen or torch.Generator().manual_seed(seed)
            weights[k] = torch.randn(tuple(o.shape), generator=gen, dtype=torch.float64)
        w = weights[k]
        if tuple(o.shape) == tuple(w.shape):  # a shape mismatch fails its output check anyway
            terms.append((o.to(torch.float64) * w.to(o.device)).sum())
    if not terms and first:
        raise VerificationError("training verification needs at least one floating-point output to "
                                "build a loss from; use training=False")
    if terms:
        loss = torch.stack(terms).sum()
        if loss.requires_grad:
            try:
                loss.backward()
            except Exception as e:  # noqa: BLE001
                raise _RunFailed(f"backward of the {label} failed: {type(e).__name__}: {e}", e) from e
    run.input_grads = {k: _grad_or_zeros(t) for k, t in _input_leaves(args, kwargs).items() if _is_float(t)}
    named = dict(model.named_parameters())
    run.grads = {n: _grad_or_zeros(p) for n, p in named.items()}
    stepped = [p for p in named.values() if p.grad is not None]
    if stepped:
        torch.optim.SGD(stepped, lr=lr).step()
    run.after_step = {n: _keep(p) for n, p in named.items()}
    return run


def _default_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _fork_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG state ``torch.manual_seed`` would touch: saved and restored around verify."""
    if device.type == "cuda" or (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return list(range(torch.cuda.device_count()))
    return []


def verify(reference_model: nn.Module, candidate_model: nn.Module, example_inputs, *, training: bool = True,
           device=None, lr: float = 0.1, multiple: float = DEFAULT_MULTIPLE, floor=None,
           seed: int = 0, reference_precision="auto") -> VerificationResult:
    """Judge ``candidate_model`` against ``reference_model`` on ``example_inputs`` (see the module doc).

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs.
    ``device``: where all three copies run (default: the device of the reference's first parameter).
    ``multiple``/``floor``: the tolerance rule's constants; ``floor`` is None (per-dtype defaults), a
    number (one floor for every tensor) or a ``{dtype: floor}`` dict overriding defaults.
    ``reference_precision``: judge a mixed-precision candidate against the reference run under
    ``torch.autocast`` at that dtype (``torch.bfloat16``/``torch.float16``), with that dtype's floor;
    ``"auto"`` (default) uses the precision the candidate declares (:func:`declared_precision`), if any;
    None never does.
    Raises VerificationError when a model fails to run, InputError for malformed arguments.
    """
    if not isinstance(reference_model, nn.Module) or not isinstance(candidate_model, nn.Module):
        raise InputError("verify() needs two nn.Module instances (reference and candidate)")
    multiple = _non_negative("multiple", multiple, "a number")
    floors = _floor_table(floor)
    if isinstance(reference_precision, str) and reference_precision == "auto":
        precision = declared_precision(candidate_model)
    else:
        precision = parse_precision(reference_precision)
    normalize_inputs(example_inputs)  # InputError early for a malformed input
    device = torch.device(device) if device is not None else _default_device(reference_model)

    weights: dict[str, torch.Tensor] = {}

    def run(label: str, source: nn.Module, *, double: bool = False, **how) -> _Run:
        try:
            model = copy.deepcopy(source).to(device)
            if double:
                model = _float64(model)
        except Exception as e:  # noqa: BLE001
            raise VerificationError(f"could not copy the {label} onto {device}: {type(e).__name__}: {e}") from e
        # One private copy at a time, freed after its run: a full-size model needs memory for one copy
        # plus the recorded tensors.
        return _run(label, model, example_inputs, device, double=double, training=training, lr=lr, seed=seed,
                    weights=weights, **how)

    fallback = None  # why the float64 copy could not be the reference (module doc: own-precision rule)
    with torch.random.fork_rng(devices=_fork_devices(device)):
        try:
            r64 = run("float64 copy of the reference", reference_model, double=True)  # defines the loss weights
        except _RunFailed as exc:
            fallback = exc
            weights.clear()
            try:
                r64 = run("reference model", reference_model, first=True)
            except _RunFailed as own:
                raise VerificationError(
                    f"the reference model itself fails on the example inputs, so there is nothing to compare "
                    f"with: {own}\n(its float64 copy failed too: {exc}). Check that the inputs are what the "
                    f"model's forward takes (shapes, dtypes, device) and that it runs in eager mode; "
                    f"verify=False skips verification.") from own
        if precision is not None:
            rr = run(f"reference model under autocast({dtype_name(precision)})", reference_model, autocast=precision)
        elif fallback is not None:
            rr = run(f"reference model with its inputs and weights moved by {PERTURB_UNITS:g} rounding unit",
                     reference_model, perturb=PERTURB_UNITS)
        else:
            rr = run("reference model", reference_model)
        rc = run("candidate model", candidate_model)

    checks: list[TensorCheck] = []

    def group(kind: str, fmt: str, attr: str) -> None:
        d64, dr, dc = getattr(r64, attr), getattr(rr, attr), getattr(rc, attr)
        for n in list(d64) + [n for n in dc if n not in d64]:
            checks.append(_compare(fmt.format(n), kind, d64.get(n), dr.get(n), dc.get(n), multiple, floors,
                                   precision))

    group("output", "{}", "outputs")
    if training:
        group("input_grad", "grad[{}]", "input_grads")
        group("param_grad", "grad[{}]", "grads")
        group("param_after_step", "param_after_step[{}]", "after_step")
    group("buffer", "buffer[{}]", "buffers")
    reference = "float64" if fallback is None else \
        f"own precision: the float64 copy failed ({_cause(fallback)})"
    if fallback is not None:
        log.info("verify: judged against the reference at its own precision: %s", fallback)
    return VerificationResult(ok=all(c.ok for c in checks), checks=checks,
                              rule=_rule_text(multiple, floors, precision, fallback is not None), training=training,
                              precision=precision, reference=reference)


def _cause(exc: "_RunFailed") -> str:
    text = str(exc.cause).strip().splitlines()
    return f"{type(exc.cause).__name__}: {text[0] if text else ''}"[:300]


def _float64(model: nn.Module) -> nn.Module:
    """``model.double()``, and in every fx graph it runs (its own, a wrapper's ``_gm``, control-flow
    branches) float32 dtype arguments and tensor constants become float64: a captured graph bakes
    in the casts and factory dtypes of the traced run (``zeros(dtype=float32)`` of an RNN's initial
    state, an attention's ``.float()``), which would otherwise stop its float64 copy from running."""
    model = model.double()
    inner = getattr(model, "_gm", None)
    roots = [model] + ([inner] if isinstance(inner, nn.Module) else [])
    graphs = {id(m): m for r in roots for m in r.modules() if isinstance(m, fx.GraphModule)}
    for gm in graphs.values():
        promote = lambda a: torch.float64 if a is torch.float32 else a  # noqa: E731
        for node in gm.graph.nodes:
            node.args = fx.node.map_aggregate(node.args, promote)
            node.kwargs = fx.node.map_aggregate(node.kwargs, promote)
        for name, value in list(vars(gm).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) \
                    and value.dtype == torch.float32:
                setattr(gm, name, value.double())
        gm.recompile()
    return model
