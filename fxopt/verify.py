"""Prove a rewritten model numerically equal to the original, the way PyTorch's benchmark suites do.

``verify(reference, candidate, inputs)`` runs three models on the same inputs:

* a float64 copy of the reference (``deepcopy(reference).double()``, floating inputs cast too), the
  best available estimate of the exact answer;
* the reference as given, at its own precision;
* the candidate as given (any ``nn.Module`` whose parameter and buffer names match the reference,
  e.g. a rewritten ``GraphModule``).

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
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tabulate import tabulate
from torch import nn
from torch.utils._pytree import GetAttrKey, MappingKey, SequenceKey, tree_flatten_with_path, tree_map

from .capture import normalize_inputs
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

#: ``GraphModule.meta`` key under which a rewritten graph declares the precision it computes in.
PRECISION_KEY = "fxopt.precision"

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

    def failures(self) -> list[TensorCheck]:
        return [c for c in self.checks if not c.ok]

    def worst(self) -> list[TensorCheck]:
        """Checks ordered worst first: failures first, then by cand_error / allowed."""
        return sorted(self.checks, key=lambda c: (c.ok, -c.ratio))

    def verdict(self) -> str:
        n, bad = len(self.checks), self.failures()
        mode = "train step" if self.training else "eval forward"
        if self.precision is not None:
            mode += f" (judged at {_dt(self.precision)})"
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
    if isinstance(precision, str) and precision.lower().replace("torch.", "") in _PRECISIONS:
        return _PRECISIONS[precision.lower().replace("torch.", "")]
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


def _rule_text(multiple: float, table, precision: torch.dtype | None = None) -> str:
    base = f"e_cand <= {multiple:g} * e_ref + floor * max(1, max|ref|)"
    if precision is not None:
        floors = f"floor = {table:g} for every tensor" if isinstance(table, float) else \
            f"floor = {_floor_for(table, precision):g} (the {_dt(precision)} floor) for every floating tensor"
        e_ref = f"e_ref = max|reference under torch.autocast({_dt(precision)}) - ref|"
    elif isinstance(table, float):
        floors, e_ref = f"floor = {table:g} for every tensor", "e_ref = max|reference - ref|"
    else:
        names = [(torch.float64, "float64"), (torch.float32, "float32"), (torch.float16, "float16"),
                 (torch.bfloat16, "bfloat16")]
        floors = "floor by the coarser dtype of reference and candidate tensor: " + ", ".join(
            f"{n} {table[d]:g}" for d, n in names) + ", integer 0"
        e_ref = "e_ref = max|reference - ref|"
    return (f"{base}, where ref = float64 copy of the reference, {e_ref}, "
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
    dtype = f"{_dt(ref.dtype)} -> {_dt(cand.dtype)}"
    if precision is not None:
        dtype = f"{_dt(ref.dtype)}@autocast({_dt(precision)}) -> {_dt(cand.dtype)}"
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


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


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


def _prepare_inputs(args, kwargs, device, double: bool, requires_grad: bool):
    def conv(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t.detach().to(device)
        if t.is_floating_point() and double:
            t = t.to(torch.float64)
        t = t.clone()
        if requires_grad and _is_float(t):
            t.requires_grad_(True)
        return t

    return tree_map(conv, args), tree_map(conv, kwargs)


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


def _run(label: str, model: nn.Module, example_inputs, device, *, double: bool, training: bool, lr: float,
         seed: int, weights: dict[str, torch.Tensor], autocast: torch.dtype | None = None) -> _Run:
    """One forward (+ loss, backward and SGD step when training) of ``model``, a private copy.

    ``weights`` maps output names to loss weights; an output without one (the first, float64, run)
    gets fresh standard-normal weights from a generator seeded with ``seed``, and later runs reuse them.
    ``autocast``: run the forward under ``torch.autocast(device.type, dtype=autocast)``.
    """
    args, kwargs = normalize_inputs(example_inputs)
    args, kwargs = _prepare_inputs(args, kwargs, device, double=double, requires_grad=training)
    model.train(training)
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)  # seeds every device's generator: same dropout masks on every run
    try:
        amp = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with torch.enable_grad() if training else torch.no_grad(), amp:
            out = model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise VerificationError(f"the {label} failed to run on the example inputs: "
                                f"{type(e).__name__}: {e}") from e
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
            if not double:  # an output the float64 reference lacks stays out of the loss
                continue
            gen = gen or torch.Generator().manual_seed(seed)
            weights[k] = torch.randn(tuple(o.shape), generator=gen, dtype=torch.float64)
        w = weights[k]
        if tuple(o.shape) == tuple(w.shape):  # a shape mismatch fails its output check anyway
            terms.append((o.to(torch.float64) * w.to(o.device)).sum())
    if not terms and double:
        raise VerificationError("training verification needs at least one floating-point output to "
                                "build a loss from; use training=False")
    if terms:
        loss = torch.stack(terms).sum()
        if loss.requires_grad:
            try:
                loss.backward()
            except Exception as e:  # noqa: BLE001
                raise VerificationError(f"backward of the {label} failed: {type(e).__name__}: {e}") from e
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
    runs = []
    with torch.random.fork_rng(devices=_fork_devices(device)):
        # One private copy at a time (the float64 run first: it defines the loss weights), freed after
        # its run, so a full-size model needs memory for one copy plus the recorded tensors.
        for label, source, double, amp in (
                ("float64 copy of the reference", reference_model, True, None),
                ("reference model" + (f" under autocast({_dt(precision)})" if precision else ""),
                 reference_model, False, precision),
                ("candidate model", candidate_model, False, None)):
            try:
                model = copy.deepcopy(source).to(device)
                if double:
                    model = model.double()
            except Exception as e:  # noqa: BLE001
                raise VerificationError(f"could not copy the {label} onto {device}: "
                                        f"{type(e).__name__}: {e}") from e
            runs.append(_run(label, model, example_inputs, device, double=double, training=training, lr=lr,
                             seed=seed, weights=weights, autocast=amp))
            del model
    r64, rr, rc = runs

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
    return VerificationResult(ok=all(c.ok for c in checks), checks=checks,
                              rule=_rule_text(multiple, floors, precision), training=training,
                              precision=precision)
