"""Program + tensor layouts -> one Triton kernel (source text, cached on disk), and the torch
reference that runs the same program with ATen ops.

One kernel instance handles ``BR`` rows of ``BN`` elements: a whole row is in registers, so a
region can reduce it as many times as it likes (softmax: max, then sum; layer norm: mean, then
variance) in one pass over memory. Pointwise regions use flat blocks of 1024 elements.
Broadcasting and strides are index arithmetic with the shapes and strides baked in as constants:
each distinct input layout (contiguous, channels-last, expanded, ...) gets its own specialization,
and the iteration order follows the memory order of the first full-size input, so a channels-last
activation is walked in NHWC order and its outputs are written channels-last.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .program import Program, iteration_order
from .scalar import print_expr

__all__ = ["Layout", "plan_layout", "triton_source", "run_reference", "load_kernel", "cache_dir",
           "CACHE_STATS", "MAX_ROW"]

MAX_ROW = 16384        # longest row a kernel holds in registers
POINTWISE_BLOCK = 1024
CACHE_STATS = {"generated": 0, "from_disk": 0}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Layout:
    """How a program's tensors sit in memory for one call: iteration order and strides (in the
    iteration space: 0 along broadcast dims) of every input and output."""

    order: tuple            # dims of S, outermost first (reduced dims last)
    in_strides: tuple       # per input: a stride per dim of S
    out_strides: tuple      # per output: a stride per dim of S
    out_alloc: tuple        # per output: (shape, strides) to allocate it with

    def signature(self) -> str:
        return f"order={self.order} in={self.in_strides} out={self.out_strides}"


def _dense(shape, order) -> list:
    """Row-major strides of ``shape`` when its dims are laid out in ``order`` (outermost first)."""
    strides, acc = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = acc
        acc *= shape[d]
    return strides


def _iter_strides(S, view, strides) -> tuple:
    return tuple(0 if (v == 1 or s == 1) else st for s, v, st in zip(S, view, strides))


def output_order(program: Program, strides: list | None) -> tuple | None:
    """The walk that writes the first full output (given its strides) in memory order."""
    for (_, spec), st in zip(program.outputs, strides or []):
        if spec.kind == "full" and st is not None:
            return iteration_order(tuple(program.shape), program.k, tuple(st[p] for p in spec.perm) if spec.perm else st)
    return None


def plan_layout(program: Program, inputs: list, strides: list | None = None) -> Layout:
    """The layout for these input tensors (already viewed to the program's input shapes);
    ``strides``: each output's strides (those eager gives the replaced nodes for these inputs),
    else outputs are dense in the walk's order."""
    S, k = tuple(program.shape), program.k
    rank = len(S)
    in_strides = tuple(_iter_strides(S, spec.shape, t.stride()) for spec, t in zip(program.inputs, inputs))
    # walk memory in the program's fixed order, else in that of the first full output, else in
    # that of the first full-size input
    primary = next((st for spec, st in zip(program.inputs, in_strides)
                    if spec.kind == "full" and tuple(spec.shape) == S), None)
    order = program.order or output_order(program, strides) or iteration_order(S, k, primary)
    given = list(strides) if strides else [None] * len(program.outputs)
    out_strides, out_alloc = [], []
    for j, (_, spec) in enumerate(program.outputs):
        if given[j] is not None:
            spec = replace(spec, strides=tuple(given[j]))
        shape = tuple(spec.shape)
        if spec.kind == "col":   # (programs, *columns), contiguous: one partial sum per program
            shape = (grid_and_warps(program)[0],) + shape
            out_alloc.append((shape, tuple(torch.empty(shape, device="meta").stride())))
            out_strides.append(None)
        elif spec.kind == "full":
            st = tuple(spec.strides) if spec.strides else tuple(_dense(S, order))
            out_alloc.append((shape, st))
            out_strides.append(_iter_strides(S, S, tuple(st[p] for p in spec.perm) if spec.perm else st))
        else:
            own = tuple(spec.strides) if spec.strides else torch.empty(shape, device="meta").stride()
            keep = S[:rank - k] + (1,) * k
            view_st = list(own) + [0] * (rank - len(shape))  # a flat row shape is the keep shape's prefix
            out_alloc.append((shape, tuple(own)))
            out_strides.append(_iter_strides(S, keep, view_st[:rank]))
    return Layout(order, in_strides, tuple(out_strides), tuple(out_alloc))


# ---- Triton source -------------------------------------------------------------------------------

def _ct(dtypes) -> str:
    return "tl.float64" if "torch.float64" in dtypes else "tl.float32"


def _blocks(program: Program) -> tuple[int, int, int]:
    """(rows per program, row block, warps)."""
    if not program.inner:
        return 1, POINTWISE_BLOCK, 4
    bn = 1 << max(0, (program.row_size - 1).bit_length())
    br = max(1, min(64, 2048 // bn, 1 << max(0, (program.rows - 1).bit_length())))
    return br, bn, 4 if bn <= 2048 else 8 if bn <= 8192 else 16


COL_PROGRAMS = 264   # programs of a kernel that sums columns over rows (2 per H100 SM)


def _has_cols(program: Program) -> bool:
    return any(spec.kind == "col" for _, spec in program.outputs)


def grid_and_warps(program: Program) -> tuple[int, int]:
    br, bn, warps = _blocks(program)
    n = math.prod(program.shape) if not program.inner else program.rows
    blocks = max(1, -(-n // (bn if not program.inner else br)))
    return (min(blocks, COL_PROGRAMS) if _has_cols(program) else blocks), warps


class _Index:
    """Emits index arithmetic lazily: the multi-index is only computed if some tensor needs it."""

    def __init__(self, program: Program, order: tuple):
        S, inner = program.shape, program.inner
        self.S, self.k = S, bool(inner)   # k: tiled rows x cols (a reduction, or column sums)
        self.outer = [d for d in order if S[d] > 1 and d not in inner]
        self.inner = [d for d in inner if S[d] > 1]
        self.lines: list[str] = []
        self.done = False

    def _decompose(self) -> None:
        if self.done:
            return
        self.done = True
        for var, dims in (("rows" if self.k else "lin", self.outer), ("cols", self.inner)):
            rem = var
            for j, d in enumerate(reversed(dims)):
                if j == len(dims) - 1:
                    self.lines.append(f"    i{d} = {rem}")
                else:
                    self.lines.append(f"    i{d} = {rem} % {self.S[d]}")
                    self.lines.append(f"    r{d} = {rem} // {self.S[d]}")
                    rem = f"r{d}"

    def offset(self, strides, row_only: bool = False) -> str:
        S = self.S
        dims = self.outer + ([] if row_only else self.inner)
        dense = _dense(S, dims)
        if all(strides[d] == dense[d] for d in dims) and all(strides[d] == 0 or S[d] == 1
                                                              for d in range(len(S)) if d not in dims):
            if not self.k:
                return "lin"
            if row_only:
                return "rows"
            return "rows * %d + cols" % math.prod(S[d] for d in self.inner) if self.outer else "cols"
        terms = [f"i{d} * {strides[d]}" for d in dims if strides[d]]
        if terms:
            self._decompose()
            if self.k and not row_only:   # a [BR, BN] offset, like the mask (compiled Triton broadcasts
                # the mask to the pointer's shape, never the other way)
                if not any(strides[d] for d in self.outer):
                    terms.append("rows * 0")
                if not any(strides[d] for d in self.inner):
                    terms.append("cols * 0")
            return " + ".join(terms)
        # one element for the whole block: a zero offset of the block's shape (the mask needs one)
        return "lin * 0" if not self.k else "rows * 0" if row_only else "rows * 0 + cols * 0"


def triton_source(program: Program, layout: Layout, in_dtypes: list[str], out_dtypes: list[str],
                  name: str) -> str:
    """The Triton source of one kernel ``name`` for this program and layout."""
    S, k = program.shape, program.k
    br, bn, _ = _blocks(program)
    ct = _ct(in_dtypes + out_dtypes)
    numel = math.prod(S)
    biggest = max([numel] + [math.prod(s) for s, _ in layout.out_alloc])
    idx = _Index(program, layout.order)
    wide = biggest >= 2 ** 31 - 1
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    head = [f"    pid = {pid}"]
    cols_out = [j for j, (_, spec) in enumerate(program.outputs) if spec.kind == "col"]
    if not program.inner:
        head += [f"    lin = pid * {bn} + tl.arange(0, {bn})[None, :]", f"    mask = lin < {numel}",
                 "    rmask = mask"]
    elif cols_out:   # loop over row blocks, summing the column outputs in registers
        grid, _ = grid_and_warps(program)
        blocks = -(-program.rows // br)
        head += [f"    cols = tl.arange(0, {bn})[None, :]"]
        head += [f"    acc{j} = tl.zeros([1, {bn}], {ct})" for j in cols_out]
        head += [f"    for blk in range(pid, {blocks}, {grid}):", f"        rows = blk * {br} + tl.arange(0, {br})[:, None]",
                 f"        rmask = rows < {program.rows}", f"        mask = rmask & (cols < {program.row_size})"]
    else:
        head += [f"    rows = pid * {br} + tl.arange(0, {br})[:, None]", f"    cols = tl.arange(0, {bn})[None, :]",
                 f"    rmask = rows < {program.rows}", f"    mask = rmask & (cols < {program.row_size})"]
    body = []
    kinds, live = program.kinds(), program.live()
    for st in program.steps:
        if st.name not in live:
            continue
        if st.op == "load":
            spec = program.inputs[st.index]
            row = bool(k) and spec.kind == "row"
            off = idx.offset(layout.in_strides[st.index], row_only=row)
            m = "rmask" if row else "mask"
            other = "0" if spec.dtype == "torch.bool" else "0.0"
            body.append(f"    {st.name} = tl.load(in{st.index} + ({off}), mask={m}, other={other}).to({ct})")
        elif st.op == "reduce":
            fill = {"sum": "0.0", "max": "float('-inf')", "min": "float('inf')"}[st.how]
            body.append(f"    {st.name} = tl.{st.how}(tl.where(mask, {st.src}, {fill}), axis=1)[:, None]")
        else:
            body.append(f"    {st.name} = {print_expr(st.expr, 'triton').replace('CT', ct)}")
    for j, (value, spec) in enumerate(program.outputs):
        if spec.kind == "col":
            body.append(f"    acc{j} += tl.sum(tl.where(mask, {value}, 0.0), axis=0)[None, :]")
            continue
        row = bool(k) and spec.kind == "row"
        off = idx.offset(layout.out_strides[j], row_only=row)
        zeros = f"tl.zeros([{br}, {1 if row else bn}], {ct})"
        step = next(s for s in program.steps if s.name == value)
        constant = step.op == "expr" and not step.expr.free_symbols   # a python float in the kernel
        same = kinds.get(value) == ("row" if row else "full") and not constant
        full_value = value if same else f"({value} + {zeros})"
        body.append(f"    tl.store(out{j} + ({off}), {full_value}.to(out{j}.dtype.element_ty), "
                    f"mask={'rmask' if row else 'mask'})")
    if cols_out:   # the loop body is indented once more; partial sums are stored after it
        body = ["    " + line for line in idx.lines + body]
        idx.lines = []
        body += [f"    tl.store(out{j} + pid * {program.row_size} + cols, acc{j}.to(out{j}.dtype.element_ty), "
                 f"mask=cols < {program.row_size})" for j in cols_out]
    params = [f"in{i}" for i in range(len(program.inputs))] + [f"out{j}" for j in range(len(program.outputs))]
    text = "\n".join("# " + line for line in program.text().splitlines())
    return (f"# fxopt fused kernel {name}\n# layout: {layout.signature()}\n{text}\n"
            f"import triton\nimport triton.language as tl\n\n\n@triton.jit\n"
            f"def {name}({', '.join(params)}):\n" + "\n".join(head + idx.lines + body) + "\n")


# ---- the disk cache --------------------------------------------------------------------------------

def cache_dir() -> Path:
    """``$FXOPT_CACHE_DIR`` or ``~/.cache/fxopt``, plus ``kernels/``."""
    root = os.environ.get("FXOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fxopt")
    return Path(root) / "kernels"


_LOADED: dict = {}


def load_kernel(source: str, name: str):
    """The ``@triton.jit`` function in ``source``: written once under :func:`cache_dir` (named by a
    hash of the source) and imported from there (Triton reads a kernel's source from its file)."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    key = (digest, interpret)
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        path = cache_dir() / f"{name}_{digest}.py"
        if path.exists() and path.read_text() == source:
            CACHE_STATS["from_disk"] += 1
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(source)
            tmp.replace(path)
            CACHE_STATS["generated"] += 1
        spec = importlib.util.spec_from_file_location(f"fxopt_kernel_{digest}_{int(interpret)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _LOADED[key] = getattr(module, name)
        return _LOADED[key]


def kernel_name(program: Program) -> str:
    return "k_" + program.name


# ---- the torch reference ---------------------------------------------------------------------------

def run_reference(program: Program, inputs: list, outputs: list) -> None:
    """Run the program with ATen ops (in float64 if any tensor is, else float32), writing
    ``outputs``: the same arithmetic as the kernel, one op at a time."""
    S, k = tuple(program.shape), program.k
    rank = len(S)
    wide = any(t.dtype == torch.float64 for t in list(inputs) + list(outputs))
    ct = torch.float64 if wide else torch.float32
    red = tuple(range(rank - k, rank))
    env = {"torch": torch, "_where": torch.where, "CT": ct}
    for st in program.steps:
        if st.op == "load":
            env[st.name] = inputs[st.index].to(ct)
        elif st.op == "reduce":
            v = env[st.src]
            v = v.expand(S) if torch.is_tensor(v) else torch.full(S, float(v), dtype=ct)
            fn = {"sum": torch.sum, "max": torch.amax, "min": torch.amin}[st.how]
            env[st.name] = fn(v, dim=red, keepdim=True)
        else:
            env[st.name] = eval(print_expr(st.expr, "torch"), env)  # noqa: S307  (our own printed code)
    keep = S[:rank - k] + (1,) * k
    for (value, spec), out in zip(program.outputs, outputs):
        v = env[value]
        v = v if torch.is_tensor(v) else torch.tensor(float(v), dtype=ct)
        if spec.kind == "col":   # all rows' sum in the first partial, zeros in the rest
            out.zero_()
            rows = tuple(d for d in range(rank) if d not in program.inner)
            out[0].copy_(v.expand(S).sum(dim=rows).reshape(out.shape[1:]))
            continue
        v = v.expand(S) if spec.kind == "full" else v.expand(keep).reshape(spec.shape)
        out.copy_(v)
