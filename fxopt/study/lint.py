"""``fxopt.lint``: performance lints on a costed training step.

A lint is a rule in :data:`RULES` (id, title, docs, check function). A check reads the per-call
costs of :func:`fxopt.analyze` and the shapes in the captured graph's ``node.meta["val"]`` (it never
re-traces) and returns :class:`Finding`s: the nodes and block, the evidence, a concrete change and
the cost model's estimated step-time saving. Numbers a rule needs beyond the hardware preset
(alignment penalty, tile shape, ...) are assumptions, kept in :data:`ASSUMPTIONS` and quoted in the
findings. Savings of different findings can overlap (an unfused attention's scores are also a
low-intensity block): they do not add up.
"""
from __future__ import annotations

import inspect
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from tabulate import tabulate
from torch import fx, nn
from torch.utils import flop_counter

from ..analyze import _cast, analyze, parse_dtype
from ..capture import Captured, capture
from ..cost_models.hardware import DTYPE_KEYS, load_hardware
from ..cost_models.ops import MATRIX_CLASSES
from ..cost_models.kernels import gemm_choice, memory_time
from ..cost_models.names import dtype_name
from ..cost_models.roofline import call_time, peak_for, regime
from ..errors import InputError
from ..report import GraphReport

__all__ = ["lint", "LintReport", "Finding", "LintRule", "RULES", "ASSUMPTIONS", "lint_rule"]

SCHEMA = "fxopt.lint_report/1"


@dataclass(frozen=True)
class Assumption:
    value: object
    why: str


# What the lints assume beyond the hardware preset. Replace with measured values when calibrated.
ASSUMPTIONS: dict[str, Assumption] = {
    "alignment_bytes": Assumption(16, "tensor-core GEMM/conv kernels want leading dimensions (K and N of a "
                                      "row-major GEMM, channels per group of a conv) in multiples of 16 bytes: "
                                      "8 elements in 16-bit, 4 in TF32 (NVIDIA's matrix-multiplication guide)"),
    "misaligned_slowdown": Assumption(2.0, "a tensor-core GEMM/conv with a misaligned leading dimension runs on "
                                           "a slower path (narrow loads, no TMA): est. 2x its aligned roofline "
                                           "time (compute and memory terms); not yet calibrated"),
    "max_last_wave_fill": Assumption(0.5, "a GEMM of 2+ waves whose last wave fills at most this fraction of "
                                          "the SMs is flagged (133 tiles on 132 SMs: 1/132)"),
    "max_width_change": Assumption(0.2, "the nearest efficient width must be within this fraction of the "
                                        "current size; a GEMM that needs a bigger change is left alone"),
    "min_block_share": Assumption(0.05, "a low-intensity block is flagged when it holds at least this share "
                                        "of the step"),
    "fused_bytes_per_intermediate": Assumption(3, "fusing a producer into its consumer saves, per intermediate "
                                                  "tensor, its forward read and its gradient's write + read "
                                                  "(3x its bytes in training, 2x in inference); its forward "
                                                  "write stays, as if it were saved for backward"),
    "launch_run_min_kernels": Assumption(5, "a launch-bound stretch has at least this many consecutive kernels "
                                            "whose work is each shorter than the launch overhead"),
    "graph_launch_fraction": Assumption(0.25, "in a CUDA graph a kernel still costs about this fraction of an "
                                              "eager launch (about 1 of 4 us), so the saving is 75% of the "
                                              "stretch's launch overhead"),
    "attention_bwd_kernels": Assumption(1, "kernels of a fused attention backward, as the cost model counts "
                                           "SDPA"),
}


def _a(name: str):
    return ASSUMPTIONS[name].value


# ---------------------------------------------------------------------------------------------
# Findings, rules, report
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """One problem: where (nodes, block), why (evidence), what to change, and what it would save."""

    rule: str
    nodes: tuple[str, ...]
    block: str
    evidence: str
    change: str
    saving_s: float
    details: dict = field(default_factory=dict)
    source: str = ""   # the user's source line of the first node, when known

    @property
    def title(self) -> str:
        return RULES[self.rule].title if self.rule in RULES else self.rule

    def __str__(self) -> str:
        return (f"[{self.rule}] {self.block}: {self.change} (est. -{self.saving_s * 1e6:.1f} us/step)\n"
                f"    {self.evidence}")

    def to_dict(self) -> dict:
        return {**asdict(self), "nodes": list(self.nodes), "title": self.title}


@dataclass(frozen=True)
class LintRule:
    """A lint: ``check(ctx)`` yields Findings. ``needs_graph``: it reads shapes or edges of the graph."""

    id: str
    title: str
    doc: str
    check: Callable[["LintContext"], Iterable[Finding]]
    needs_graph: bool = True


RULES: dict[str, LintRule] = {}


def lint_rule(id: str, title: str, needs_graph: bool = True):
    """Register a check function as a lint; its docstring is the rule's documentation."""
    def add(fn):
        RULES[id] = LintRule(id, title, inspect.cleandoc(fn.__doc__ or ""), fn, needs_graph)
        return fn
    return add


class LintReport:
    """Findings sorted by estimated saving, plus the rules skipped and the assumptions used."""

    def __init__(self, model: str, hardware: str, step_time_s: float, findings: list[Finding],
                 skipped: dict[str, str], rules: list[str]):
        self.model, self.hardware, self.step_time_s = model, hardware, step_time_s
        self.findings = sorted(findings, key=lambda f: (-f.saving_s, f.rule, f.block, f.nodes))
        self.skipped, self.rules = skipped, rules

    def __iter__(self):
        return iter(self.findings)

    def __len__(self) -> int:
        return len(self.findings)

    def __getitem__(self, i):
        return self.findings[i]

    def by_rule(self, rule: str) -> list[Finding]:
        return [f for f in self.findings if f.rule == rule]

    def summary(self) -> str:
        counts = Counter(f.rule for f in self.findings)
        lines = [f"lint {self.model} on {self.hardware}: {len(self.findings)} findings "
                 f"({', '.join(f'{r} {n}' for r, n in sorted(counts.items())) or 'none'}), "
                 f"predicted step {self.step_time_s * 1e3:.3g} ms",
                 "  estimated savings overlap between findings; they do not add up"]
        lines += [f"  skipped {r}: {why}" for r, why in self.skipped.items()]
        return "\n".join(lines)

    def _rows(self, top: int | None, width: int):
        rows = []
        for i, f in enumerate(self.findings[:top], 1):
            nodes = ", ".join(f.nodes[:3]) + (f" +{len(f.nodes) - 3}" if len(f.nodes) > 3 else "")
            change = f.change if len(f.change) <= width else f.change[:width - 3] + "..."
            rows.append([i, f.rule, f.block, nodes, f"{f.saving_s * 1e3:.3g}",
                         f"{f.saving_s / self.step_time_s * 100:.2g}" if self.step_time_s else "-", change])
        return ["#", "rule", "block", "nodes", "saves ms", "% step", "change"], rows

    def table(self, top: int | None = 30, tablefmt: str = "simple", width: int = 90) -> str:
        headers, rows = self._rows(top, width)
        return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def to_markdown(self, top: int | None = 30) -> str:
        out = [f"```\n{self.summary()}\n```", "", self.table(top, tablefmt="github", width=10_000), ""]
        for i, f in enumerate(self.findings[:top], 1):
            out += [f"### {i}. {f.title}: `{f.block}` (est. -{f.saving_s * 1e3:.3g} ms/step)", "",
                    f"- nodes: {', '.join(f'`{n}`' for n in f.nodes)}",
                    f"- evidence: {f.evidence}", f"- change: {f.change}"]
            out += [f"- source: `{f.source}`"] if f.source else []
            out.append("")
        used = sorted({k for f in self.findings[:top] for k in f.details.get("assumptions", ())})
        if used:
            out += ["Assumptions:", ""] + [f"- `{k}` = {ASSUMPTIONS[k].value}: {ASSUMPTIONS[k].why}" for k in used]
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "hardware": self.hardware,
                "step_time_s": self.step_time_s, "rules": self.rules, "skipped": self.skipped,
                "assumptions": {k: {"value": list(a.value) if isinstance(a.value, tuple) else a.value,
                                    "why": a.why} for k, a in ASSUMPTIONS.items()},
                "findings": [_jsonable(f.to_dict()) for f in self.findings]}

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __repr__(self) -> str:
        return f"<LintReport {self.model}: {len(self.findings)} findings>\n{self.summary()}"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x if isinstance(x, (str, int, float, bool)) or x is None else str(x)


# ---------------------------------------------------------------------------------------------
# What every rule reads
# ---------------------------------------------------------------------------------------------

class LintContext:
    """The report's calls with their roofline times, grouped per node, and the graph (if any)."""

    def __init__(self, report: GraphReport, graph: fx.Graph | None, depth: int):
        self.report, self.graph, self.depth = report, graph, depth
        self.hw, self.precision, self.training = report.hardware, report.precision, report.training
        # sustained bandwidth of a large memory-bound kernel (the kernel model's pointwise share)
        self.bandwidth = self.hw.memory_bandwidth * self.hw.kernel_param("memory")["efficiency"]["pointwise"]
        self.times = report.call_times
        self.host_idle = report.host_idle
        self.step_s = float(report.step_time_s)
        self.by_node: dict[str, list[int]] = {}
        for i, c in enumerate(report.calls):
            self.by_node.setdefault(c.node, []).append(i)
        self.fx_nodes = {n.name: n for n in graph.nodes} if graph is not None else {}
        self.order = {name: i for i, name in enumerate(self.fx_nodes)}

    # per node
    def calls(self, name: str, phase: str | None = None, kernels_only: bool = True) -> list[int]:
        cs = self.report.calls
        return [i for i in self.by_node.get(name, ())
                if (phase is None or cs[i].phase == phase) and (cs[i].kernels or not kernels_only)]

    def time(self, idx: Iterable[int]) -> float:
        return float(sum(self.times[i].total_s for i in idx))

    def node_time(self, name: str) -> float:
        return self.time(self.calls(name))

    def classes(self, name: str, phase: str = "fwd") -> set[str]:
        return {self.report.calls[i].op_class for i in self.calls(name, phase)}

    def matrix_dtype(self, name: str) -> str | None:
        return next((self.report.calls[i].dtype for i in self.calls(name, "fwd")
                     if self.report.calls[i].op_class in MATRIX_CLASSES), None)

    def out_bytes(self, name: str) -> float:
        """Bytes the node writes in the forward, as costed."""
        return float(sum(self.report.calls[i].bytes_written for i in self.calls(name, "fwd")))

    def block(self, name: str, depth: int | None = None) -> str:
        info = self.report.nodes.get(name)
        return info.block(self.depth if depth is None else depth) if info else "(root)"

    def module(self, name: str) -> str:
        info = self.report.nodes.get(name)
        return (info.module or "(root)") if info else "(root)"

    def source(self, name: str) -> str:
        info = self.report.nodes.get(name)
        return info.source if info else ""

    def op(self, node: fx.Node) -> str:
        info = self.report.nodes.get(node.name)
        return info.op if info else str(node.target)

    def memory_s(self, nbytes: float) -> float:
        """Time to move ``nbytes`` in memory-bound kernels (the kernel model's ramp included)."""
        return float(memory_time("pointwise", nbytes, self.hw))

    def kernel_s(self, op_class: str, dtype: str | None, flops: float, nbytes: float, kernels: int = 1) -> float:
        return float(call_time(op_class, dtype, flops, nbytes, kernels, self.hw, self.precision).total_s)


def _val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _common_block(names: Iterable[str], ctx: LintContext) -> str:
    """The longest module path shared by the nodes (``(root)`` when none)."""
    paths = [ctx.module(n).split(".") for n in names if ctx.module(n) != "(root)"]
    if not paths:
        return "(root)"
    common = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common) or "(root)"


def _us(s: float) -> str:
    return f"{s * 1e6:.3g} us" if s < 1e-3 else f"{s * 1e3:.3g} ms"


def _mb(b: float) -> str:
    return f"{b / 1e9:.3g} GB" if b >= 1e9 else f"{b / 1e6:.3g} MB"


# ---------------------------------------------------------------------------------------------
# GEMM shapes of matrix nodes, from node.meta["val"]
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gemm:
    """A matrix node as GEMM(s): ``batch`` independent (m x k) @ (k x n) products.

    ``align`` maps each dimension that is a leading dimension (row stride) of some operand in the
    forward or backward GEMMs to (size, what it is in the model).
    """

    kind: str
    m: int
    n: int
    k: int
    batch: int
    align: dict
    depthwise: bool = False
    in_width: int = 0    # input elements per output row (K; a conv's Cin per group): sets the input traffic


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def _gemm_linear(node):
    x, w = _val(node.args[0]), _val(node.args[1])
    if x is None or w is None or w.dim() != 2:
        return None
    n, k = int(w.shape[0]), int(w.shape[1])
    return Gemm("linear", x.numel() // max(k, 1), n, k, 1, {"N": (n, "out_features"), "K": (k, "in_features")})


def _gemm_matmul(node, first: int = 0):
    a, b = _val(node.args[first]), _val(node.args[first + 1])
    if a is None or b is None or a.dim() < 2 or b.dim() < 2:
        return None
    k, n = int(a.shape[-1]), int(b.shape[-1])
    if b.dim() == 2:   # x @ W folds every leading dim of x into M
        m, batch = a.numel() // max(k, 1), 1
    else:
        m = int(a.shape[-2])
        batch = _prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    return Gemm("matmul", m, n, k, batch, {"N": (n, "last dim of the 2nd operand"),
                                           "K": (k, "last dim of the 1st operand")})


def _gemm_conv(node, transposed: bool = False):
    x, w, out = _val(node.args[0]), _val(node.args[1]), _val(node)
    if x is None or w is None or out is None or x.dim() < 3:
        return None
    groups = _conv_groups(node)
    cin_g = int(x.shape[1]) // groups
    cout_g = int(w.shape[1]) if transposed else int(w.shape[0]) // groups
    m = int(out.shape[0]) * _prod(out.shape[2:])
    return Gemm("conv", m, cout_g, cin_g * _prod(w.shape[2:]), groups,
                {"Cout": (cout_g, "out_channels" + (" per group" if groups > 1 else "")),
                 "Cin": (cin_g, "in_channels" + (" per group" if groups > 1 else ""))},
                depthwise=groups > 1 and cin_g == 1, in_width=cin_g)


def _conv_groups(node) -> int:
    op = str(getattr(node.target, "overloadpacket", node.target)).split(".")[-1]
    pos = {"convolution": 8, "conv_transpose1d": 6, "conv_transpose2d": 6, "conv_transpose3d": 6}.get(op, 6)
    g = node.args[pos] if len(node.args) > pos else node.kwargs.get("groups", 1)
    return int(g) if isinstance(g, int) else 1


def _gemm_convolution(node):
    transposed = len(node.args) > 6 and bool(node.args[6])
    return _gemm_conv(node, transposed)


# ATen op (short name) -> how to read its GEMM shape
GEMM_SHAPES: dict[str, Callable] = {
    "linear": _gemm_linear,
    "matmul": _gemm_matmul, "mm": _gemm_matmul, "bmm": _gemm_matmul,
    "addmm": lambda n: _gemm_matmul(n, 1), "baddbmm": lambda n: _gemm_matmul(n, 1),
    "conv1d": _gemm_conv, "conv2d": _gemm_conv, "conv3d": _gemm_conv, "convolution": _gemm_convolution,
    "conv_transpose1d": lambda n: _gemm_conv(n, True), "conv_transpose2d": lambda n: _gemm_conv(n, True),
    "conv_transpose3d": lambda n: _gemm_conv(n, True),
}


def _gemms(ctx: LintContext):
    """(node, Gemm, dtype, op_class) of every matrix node with a known shape, in graph order."""
    for node in ctx.graph.nodes:
        fn = GEMM_SHAPES.get(ctx.op(node)) if node.op == "call_function" else None
        dtype = ctx.matrix_dtype(node.name) if fn else None
        if fn is None or dtype is None:
            continue
        try:
            g = fn(node)
        except (TypeError, IndexError, ValueError):  # symbolic or unusual arguments: not a GEMM we read
            g = None
        if g is not None:
            yield node, g, dtype, "conv" if g.kind == "conv" else "matmul"


def _tensor_core_multiple(dtype: str, op_class: str, ctx: LintContext) -> int | None:
    """Elements per 16 bytes when the GEMM runs on tensor cores, else None (fp32 on SIMT cores)."""
    key = DTYPE_KEYS.get(dtype or "float32", "fp32")
    if key == "fp32":
        tf32 = ctx.precision.tf32_conv if op_class == "conv" else ctx.precision.tf32_matmul
        if not tf32:
            return None
    if key == "fp64":
        return None
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return max(1, _a("alignment_bytes") // size)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


# ---------------------------------------------------------------------------------------------
# The rules
# ---------------------------------------------------------------------------------------------

@lint_rule("tc-alignment", "tensor-core misalignment")
def check_alignment(ctx: LintContext):
    """GEMM/conv dimensions that are not a multiple of 16 bytes on tensor cores.

    Checked dimensions are those that become a leading dimension (row stride) of an operand in the
    forward, data-gradient or weight-gradient GEMM: K and N of a linear/matmul (M never is) and the
    channels per group of a conv. Multiples: 8 elements in bf16/fp16, 4 in TF32 (fp32 when torch
    allows TF32 for that op), 16 in fp8; fp32 without TF32 runs on SIMT cores and is not checked,
    nor are depthwise convs. Saving: the node's matrix calls at ``misaligned_slowdown`` x their
    roofline time, minus the same calls at the padded sizes (FLOPs and bytes scaled up by the
    padding, conservatively); reported only when padding wins (a 3-channel stem conv usually
    does not: padding 3 -> 8 channels costs more than the penalty).
    """
    slow = _a("misaligned_slowdown")
    for node, g, dtype, op_class in _gemms(ctx):
        mult = _tensor_core_multiple(dtype, op_class, ctx)
        if mult is None or g.depthwise:
            continue
        bad = {d: (size, _round_up(size, mult), what) for d, (size, what) in g.align.items() if size % mult}
        if not bad:
            continue
        scale = math.prod(p / s for s, p, _ in bad.values())
        now = padded = 0.0
        for i in ctx.calls(node.name):
            c, t = ctx.report.calls[i], ctx.times[i]
            if c.op_class not in MATRIX_CLASSES:
                continue
            now += max(t.compute_s, t.memory_s) * slow + t.launch_s
            padded += max(t.compute_s, t.memory_s) * scale + t.launch_s
        saving = now - padded
        if saving <= 0:
            continue
        dims = ", ".join(f"{what} {s} -> {p}" for s, p, what in bad.values())
        where = f"{ctx.op(node)} `{node.name}`" + (f" ({ctx.module(node.name)})" if ctx.module(node.name) != "(root)"
                                                     else "")
        yield Finding(
            "tc-alignment", (node.name,), ctx.module(node.name),
            evidence=f"{where} runs in {dtype} with {', '.join(f'{d}={s}' for d, (s, _, _) in bad.items())}, "
                     f"not a multiple of {mult} ({_a('alignment_bytes')} bytes): est. {slow:g}x slower tensor-core "
                     f"path (assumed); GEMM M={g.m} N={g.n} K={g.k}" + (f" x{g.batch}" if g.batch > 1 else ""),
            change=f"pad to a multiple of {mult}: {dims} "
                   + ("(zero-pad both operands, masking padded keys before a softmax, or change that size)"
                      if g.kind == "matmul" else "(zero-pad the weight in the graph, or change the layer width)"),
            saving_s=saving, source=ctx.source(node.name),
            details={"dims": {d: [s, p] for d, (s, p, _) in bad.items()}, "multiple": mult, "dtype": dtype,
                     "slowdown": slow, "flops_scale": scale,
                     "assumptions": ["alignment_bytes", "misaligned_slowdown"]})


@lint_rule("wave-quantization", "tile and wave quantization")
def check_waves(ctx: LintContext):
    """GEMMs whose output tiles leave the last wave over the SMs mostly idle.

    The kernel model's tile choice (``cost_models.kernels.gemm_choice``: the fastest tile and
    split-K for this GEMM on this device) gives the forward GEMM's tiles and waves over the SMs.
    Backward GEMMs have other grids and are not flagged. Flagged: 2+ waves with the last one at most
    ``max_last_wave_fill`` full, when a size within ``max_width_change`` drops a wave. The change: that
    size (N or M, whichever is nearer), its saving priced by the same model, and the widest size with
    the same number of waves (free capacity).
    """
    sms = ctx.hw.sm_count
    if not sms:
        return
    for node, g, dtype, op_class in _gemms(ctx):
        if _tensor_core_multiple(dtype, op_class, ctx) is None or g.depthwise:
            continue
        key, reg = regime(op_class, dtype, ctx.precision)
        params, peak = ctx.hw.kernel_param("matrix")[reg], ctx.hw.matrix_peak(key)
        choice = gemm_choice(g.batch, g.m, g.n, g.k, peak, sms, params)
        if choice.split_k > 1:
            continue
        (tm, tn), tiles, waves, slots = choice.tile, choice.tiles, choice.waves, choice.slots
        tiles_m, tiles_n = -(-g.m // tm), -(-g.n // tn)
        fill = (tiles - (waves - 1) * slots) / slots
        if waves < 2 or fill > _a("max_last_wave_fill"):
            continue
        fwd = [i for i in ctx.calls(node.name, "fwd") if ctx.report.calls[i].op_class in MATRIX_CLASSES]
        if not fwd:
            continue
        memory = sum(float(ctx.times[i].memory_s) for i in fwd)

        def t(m, n):
            return max(gemm_choice(g.batch, m, n, g.k, peak, sms, params).time_s, memory * (m * n) / (g.m * g.n))

        now = t(g.m, g.n)
        options = []
        for dim, size, tile, other in (("N", g.n, tn, tiles_m), ("M", g.m, tm, tiles_n)):
            fewer = ((waves - 1) * slots) // (g.batch * other)     # tiles along dim that fit one wave fewer
            same = (waves * slots) // (g.batch * other)
            smaller = fewer * tile if 0 < fewer * tile < size else None
            if smaller and (size - smaller) > _a("max_width_change") * size:
                smaller = None
            wider = same * tile if same * tile > size else None
            if smaller:
                m, n = (g.m, smaller) if dim == "N" else (smaller, g.n)
                options.append((now - t(m, n), dim, size, smaller, wider))
        if not options:
            continue
        saving, dim, size, smaller, wider = min(options, key=lambda o: (o[2] - o[3]) / o[2])  # nearest
        if saving <= 0:
            continue
        what = (g.align.get("N", g.align.get("Cout", (0, "N")))[1] if dim == "N"
                else "M = batch x output pixels" if g.kind == "conv" else "M = rows (batch x tokens)")
        yield Finding(
            "wave-quantization", (node.name,), ctx.module(node.name),
            evidence=f"{ctx.op(node)} `{node.name}` ({dtype}) M={g.m} N={g.n} K={g.k}"
                     + (f" x{g.batch}" if g.batch > 1 else "")
                     + f": {tiles} tiles of {tm}x{tn} ({slots} per wave on {sms} SMs) = {waves} waves, the last "
                       f"{fill:.0%} full; est. {_us(now)} forward",
            change=f"{what} {size} -> {smaller}: {waves - 1} wave(s), est. -{_us(saving)}"
                   + (f"; or widen to {wider} at about the same time" if wider else ""),
            saving_s=saving, source=ctx.source(node.name),
            details={"tiles": tiles, "waves": waves, "last_wave_fill": fill, "sm_count": sms, "tile": [tm, tn],
                     "dim": dim, "size": size, "suggested": smaller, "same_time_width": wider,
                     "assumptions": ["max_last_wave_fill", "max_width_change"]})


# Node categories for fusion: what a node's forward kernels are.
ELEMENTWISE = {"pointwise", "random"}
ROWWISE = {"norm", "softmax"}


def _category(ctx: LintContext, name: str) -> str:
    cls = ctx.classes(name)
    if not cls:
        return "view"
    if cls & set(MATRIX_CLASSES):
        return "matrix"
    if cls <= ELEMENTWISE:
        return "elementwise"
    if cls <= ELEMENTWISE | ROWWISE:
        return "rowwise"
    return "other"


# (producer category, consumer category) pairs one kernel can compute together: epilogues of
# GEMMs and chains of memory-bound kernels (a norm can absorb the elementwise op before it).
FUSABLE = {("matrix", "elementwise"), ("elementwise", "elementwise"), ("rowwise", "elementwise"),
           ("elementwise", "rowwise")}


def _users(node: fx.Node, ctx: LintContext) -> list[fx.Node]:
    """Users that launch kernels, looking through views."""
    out, stack = [], list(node.users)
    while stack:
        u = stack.pop()
        if u.op == "call_function" and _category(ctx, u.name) == "view" and ctx.op(u) != "output":
            stack.extend(u.users)
        else:
            out.append(u)
    return out


def _fusion(ctx: LintContext, names: set[str]):
    """Intermediates one fused kernel per chain would not round-trip through memory, among ``names``."""
    per = _a("fused_bytes_per_intermediate") if ctx.training else 2
    saved_bytes, consumers, edges = 0.0, set(), []
    for name in sorted(names, key=ctx.order.get):
        node = ctx.fx_nodes.get(name)
        if node is None or node.op != "call_function":
            continue
        users = _users(node, ctx)
        cat = _category(ctx, name)
        if not users or not all(u.name in names and (cat, _category(ctx, u.name)) in FUSABLE for u in users):
            continue
        saved_bytes += per * ctx.out_bytes(name)
        consumers.update(u.name for u in users)
        edges.append((name, users[0].name))
    kernels = sum(len(ctx.calls(c, "fwd")) * (2 if ctx.training else 1) for c in consumers)
    return saved_bytes, kernels, edges


def _ridge(ctx: LintContext, dtype: str | None, op_class: str) -> float:
    return peak_for(op_class, dtype, ctx.hw, ctx.precision) / ctx.bandwidth


@lint_rule("low-intensity", "low arithmetic intensity block")
def check_low_intensity(ctx: LintContext):
    """Memory-bound blocks (``report.rows("block", depth)``) that hold a large share of the step.

    Flagged: memory-bound or below the ridge point (a narrow GEMM wasting its tiles is priced
    compute-bound but still has low intensity), share >= ``min_block_share``. The evidence names what the time goes to
    (norms, activations, depthwise or narrow convs); the change is the fusion that lifts them: each
    intermediate a fused chain keeps on chip (GEMM epilogues: conv/linear -> activation; chains of
    norms, activations, residual adds) saves ``fused_bytes_per_intermediate`` x its bytes and the
    consumer's launches. Matrix nodes below the ridge point get a width note: a GEMM with N = K = w
    and large M has intensity about w x taps / element size (taps: a conv's kernel area), so the
    note gives the width where it reaches the ridge; a depthwise conv stays memory-bound at any width.
    """
    depth = ctx.depth
    members: dict[str, set[str]] = {}
    for name in ctx.by_node:
        if name in ctx.fx_nodes:
            members.setdefault(ctx.block(name, depth), set()).add(name)
    for row in ctx.report.rows("block", depth):
        block, share = row["block"], float(row["share"])
        if block == "(optimizer)" or share < _a("min_block_share"):
            continue
        names = members.get(block, set())
        by_class: Counter = Counter()
        for n in names:
            for i in ctx.calls(n):
                by_class[ctx.report.calls[i].op_class] += float(ctx.times[i].total_s)
        total = sum(by_class.values()) or 1.0
        mix = ", ".join(f"{c} {t / total:.0%}" for c, t in by_class.most_common(4))
        dtypes = Counter(ctx.matrix_dtype(n) for n in names if ctx.matrix_dtype(n))
        dtype = dtypes.most_common(1)[0][0] if dtypes else "bfloat16"
        mclass = "conv" if by_class.get("conv", 0) >= by_class.get("matmul", 0) else "matmul"
        ridge = _ridge(ctx, dtype, mclass)
        if row["bound"] != "memory" and float(row["ai"]) >= ridge:
            continue   # neither memory-bound nor below the ridge (a narrow GEMM the tiles waste is both)
        saved_bytes, kernels, edges = _fusion(ctx, names)
        nonmatrix = sum(ctx.node_time(n) for n in names if _category(ctx, n) in ("elementwise", "rowwise"))
        saving = min(ctx.memory_s(saved_bytes) + kernels * ctx.hw.kernel_param("memory")["latency_s"], nonmatrix)
        notes = []
        depthwise = [n for n in sorted(names, key=ctx.order.get) if _is_depthwise(ctx, n)]
        if depthwise:
            notes.append(f"{len(depthwise)} depthwise conv(s) stay memory-bound at any width: fuse their "
                         f"norm/activation, or merge them with the next pointwise conv")
        narrow = _narrow_gemms(ctx, names, ridge)
        if narrow:
            notes.append(f"narrow GEMMs: {', '.join(narrow[:3])}{', ...' if len(narrow) > 3 else ''}; "
                         f"intensity grows with width (2x channels, 2x FLOP/B)")
        pairs = ", ".join(f"{ctx.op(ctx.fx_nodes[p])}->{ctx.op(ctx.fx_nodes[c])}" for p, c in edges[:4])
        change = (f"fuse {len(edges)} memory-bound chain link(s) ({pairs}{', ...' if len(edges) > 4 else ''}): "
                  f"est. {_mb(saved_bytes)} less traffic and {kernels} fewer launches" if edges
                  else "no fusable chain found; the time is in the block's own kernels")
        if notes:
            change += "; " + "; ".join(notes)
        ordered = sorted((n for n in names if ctx.calls(n)), key=lambda n: (-ctx.node_time(n), ctx.order[n]))
        yield Finding(
            "low-intensity", tuple(ordered), block,
            evidence=f"{share:.0%} of the step ({_us(float(row['time_s']))}) at {float(row['ai']):.3g} FLOP/B, "
                     f"memory-bound (ridge {ridge:.0f} FLOP/B for {dtype} {mclass}); time by class: {mix}",
            change=change, saving_s=max(saving, 0.0), source="",
            details={"share": share, "ai": float(row["ai"]), "ridge": ridge, "time_by_class": dict(by_class),
                     "fused_edges": [list(e) for e in edges], "saved_bytes": saved_bytes,
                     "saved_launches": kernels, "depthwise": depthwise, "narrow": narrow,
                     "assumptions": ["min_block_share", "fused_bytes_per_intermediate"]})


def _elsize(dtype: str | None) -> int:
    return torch.empty((), dtype=getattr(torch, dtype or "float32")).element_size()


def _is_depthwise(ctx: LintContext, name: str) -> bool:
    node = ctx.fx_nodes.get(name)
    fn = GEMM_SHAPES.get(ctx.op(node)) if node is not None and node.op == "call_function" else None
    if fn is None or not ctx.op(node).startswith("conv"):
        return False
    g = fn(node)
    return g is not None and g.depthwise


def _narrow_gemms(ctx: LintContext, names: set[str], ridge: float) -> list[str]:
    out = []
    for name in sorted(names, key=lambda n: (-ctx.node_time(n), ctx.order[n])):
        node = ctx.fx_nodes.get(name)
        fn = GEMM_SHAPES.get(ctx.op(node)) if node is not None and node.op == "call_function" else None
        g = fn(node) if fn else None
        dtype = ctx.matrix_dtype(name)
        if g is None or g.depthwise or dtype is None:
            continue
        ai = 2 * g.n * g.k / (_elsize(dtype) * ((g.in_width or g.k) + g.n))   # large M: x and y traffic
        if ai < ridge / 2:
            out.append(f"{name} {g.in_width or g.k}->{g.n} ~{ai:.0f} FLOP/B (compute-bound from ~"
                       f"{_round_up(int(g.n * ridge / ai), 8)} channels)")
    return out


@lint_rule("launch-bound", "launch-bound stretch", needs_graph=False)
def check_launch_bound(ctx: LintContext):
    """Runs of consecutive tiny kernels whose launch overhead exceeds their work.

    A kernel is tiny when its work (max of compute and memory time) is below its fixed latency
    (the kernel model's ``latency_s``). A run of at least ``launch_run_min_kernels`` tiny kernels in
    one phase (views do not break it) is flagged. Overhead: the run's kernel latencies plus the GPU's
    waits for the host to dispatch them; saving: that times (1 - ``graph_launch_fraction``), what
    capturing it in a CUDA graph (or fusing it) removes.
    """
    calls, times = ctx.report.calls, ctx.times
    runs, run, phase = [], [], None
    for i, c in enumerate(calls):
        if not c.kernels:
            continue
        t = times[i]
        tiny = max(t.compute_s, t.memory_s) < t.launch_s
        if c.phase != phase or not tiny:
            runs.append(run)
            run = []
        phase = c.phase
        if tiny:
            run.append(i)
    runs.append(run)
    keep = 1 - _a("graph_launch_fraction")
    for run in runs:
        kernels = sum(calls[i].kernels for i in run)
        if kernels < _a("launch_run_min_kernels"):
            continue
        launch = sum(times[i].launch_s + ctx.host_idle[i] for i in run)
        work = sum(max(times[i].compute_s, times[i].memory_s) for i in run)
        nodes = tuple(dict.fromkeys(calls[i].node for i in run))
        phase = calls[run[0]].phase
        block = "(optimizer)" if phase == "opt" else _common_block(nodes, ctx)
        first, last = nodes[0], nodes[-1]
        yield Finding(
            "launch-bound", nodes, block,
            evidence=f"{kernels} consecutive {phase} kernels ({first} .. {last}, {len(nodes)} nodes), each with "
                     f"less work than its launch: {_us(launch)} of launch overhead vs {_us(work)} of work",
            change=f"capture the step in a CUDA graph (torch.cuda.graphs, or torch.compile(mode='reduce-overhead'))"
                   f" or fuse these {len(nodes)} ops into fewer kernels",
            saving_s=launch * keep, source=ctx.source(first),
            details={"phase": phase, "kernels": kernels, "launch_s": launch, "work_s": work,
                     "assumptions": ["launch_run_min_kernels", "graph_launch_fraction"]})


COPY_OPS = {"clone", "_to_copy", "copy_", "contiguous"}
VIEW_OPS = {"view", "reshape", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze", "flatten",
            "unflatten", "_unsafe_view", "alias", "detach", "view_as", "expand_as", "select", "slice",
            "movedim", "swapaxes", "split", "chunk", "unbind", "narrow", "getitem"}
PERMUTES = {"permute", "transpose", "t", "movedim", "swapaxes", "expand", "expand_as"}
FORMAT_OPS = {"contiguous", "clone", "to", "_to_copy"}


def _strided_origin(node: fx.Node, ctx: LintContext) -> fx.Node | None:
    """The permute/transpose/expand node that made a tensor argument of ``node`` non-contiguous."""
    for arg in node.all_input_nodes:
        v = _val(arg)
        if v is None or v.is_contiguous():
            continue
        cur = arg
        for _ in range(8):
            if ctx.op(cur) in PERMUTES or not cur.all_input_nodes:
                return cur
            cur = cur.all_input_nodes[0]
        return arg
    return None


def _strided_consumer(node: fx.Node, ctx: LintContext) -> fx.Node | None:
    """The nearest permute/transpose downstream of ``node`` (breadth first, a few hops): its backward
    hands back a strided gradient, which elementwise ops pass on to ``node``'s backward."""
    frontier, seen = list(node.users), set()
    for _ in range(6):
        nxt = []
        for u in frontier:
            if ctx.op(u) in PERMUTES:
                return u
            if u.name not in seen and u.op == "call_function":
                seen.add(u.name)
                nxt += list(u.users)
        frontier = nxt
    return None


def _memory_format_change(node: fx.Node) -> str | None:
    fmt = node.kwargs.get("memory_format")
    if fmt is None and len(node.args) > 1 and isinstance(node.args[1], torch.memory_format):
        fmt = node.args[1]
    return str(fmt).replace("torch.", "") if isinstance(fmt, torch.memory_format) else None


@lint_rule("layout-churn", "layout churn")
def check_layout_churn(ctx: LintContext):
    """Copies that only change a tensor's layout, and their bytes.

    Counted: ATen ``clone``/``copy_``/``contiguous``/``_to_copy`` calls that keep the dtype (bytes in
    = bytes out), attributed to the fx node that caused them: explicit conversions
    (``contiguous``, ``clone``/``to`` with a ``memory_format``), reshapes of permuted views, and ops
    (matmul, layer_norm, linear backward) that copy a non-contiguous input. Plain ``x.clone()``
    and casts are not layout churn. Saving: the copies' roofline time, forward and backward.
    """
    attention = {ctx.module(n.name) for n in ctx.graph.nodes if ctx.op(n) in SOFTMAX_OPS}

    def in_attention(node: fx.Node) -> bool:   # hand-written attention: SDPA would remove the copy
        m = ctx.module(node.name)
        return any(m == a or m.startswith(a + ".") for a in attention if a != "(root)")
    for node in ctx.graph.nodes:
        if node.op != "call_function":
            continue
        op = ctx.op(node)
        copies = [i for i in ctx.calls(node.name) if ctx.report.calls[i].op in COPY_OPS
                  and ctx.report.calls[i].bytes_read == ctx.report.calls[i].bytes_written]
        if not copies:
            continue
        fmt = _memory_format_change(node)
        v, x = _val(node), _val(node.all_input_nodes[0]) if node.all_input_nodes else None
        if op in FORMAT_OPS and fmt is None and op != "contiguous":
            continue   # a plain clone, or a cast (the precision rules' business)
        if op in ("to", "_to_copy") and v is not None and x is not None and v.dtype != x.dtype:
            continue
        origin = _strided_origin(node, ctx)
        nbytes = sum(ctx.report.calls[i].bytes_written for i in copies)
        if op in FORMAT_OPS:
            cause = f"explicit {op}" + (f" to {fmt}" if fmt else "") + (
                f" of the strided output of `{origin.name}` ({ctx.op(origin)})" if origin is not None else "")
            change = ("keep one layout end to end: let producer and consumer agree (channels-last pass for "
                      "convs) and drop the conversion" if fmt and fmt != "contiguous_format"
                      else "drop the copy: fold the permute into the consumer (a GEMM reads a transposed "
                           "operand directly) or permute once at the block boundary")
        elif origin is not None and op in VIEW_OPS:
            cause = f"{op} of the non-contiguous output of `{origin.name}` ({ctx.op(origin)}) copies it"
            change = (f"reorder so the {op} applies before the {ctx.op(origin)} (views of contiguous tensors are "
                      f"free), or fold the {ctx.op(origin)} into the consumer")
        elif origin is not None:
            cause = f"{op} copies its non-contiguous input from `{origin.name}` ({ctx.op(origin)})"
            change = (f"give {op} a contiguous input: produce it in the layout {op} reads"
                      + (" (fused SDPA takes strided q/k/v: sdpa pass)" if in_attention(node) else
                         ", e.g. compute the norm in the tensor's own layout" if op.endswith("norm") else ""))
        elif (later := _strided_consumer(node, ctx)) is not None:
            origin = later
            cause = (f"the backward of {op} copies a strided gradient; the nearest {ctx.op(later)} downstream "
                     f"is `{later.name}`")
            change = (f"fold the {ctx.op(later)} into its consumer (a GEMM reads a transposed operand"
                      + ("; fused SDPA takes strided q/k/v: sdpa pass" if in_attention(node) else "")
                      + ") so gradients flow back contiguous")
        else:
            cause = f"{op} copies a non-contiguous tensor (in its backward or an input view)"
            change = f"produce {op}'s inputs and gradients contiguous (check the views around `{node.name}`)"
        nodes = (node.name,) + ((origin.name,) if origin is not None else ())
        yield Finding(
            "layout-churn", nodes, ctx.module(node.name),
            evidence=f"{cause}: {len(copies)} copy kernel(s), {_mb(nbytes)} written per step "
                     f"({', '.join(sorted({ctx.report.calls[i].phase for i in copies}))})",
            change=change, saving_s=ctx.time(copies), source=ctx.source(node.name),
            details={"copies": len(copies), "bytes": nbytes, "memory_format": fmt,
                     "origin": origin.name if origin is not None else None})


def _cast_dtypes(node: fx.Node, ctx: LintContext):
    """(in dtype, out dtype) of a dtype-changing cast node, else None."""
    if node.op != "call_function" or ctx.op(node) not in ("to", "_to_copy", "type_as") or not node.all_input_nodes:
        return None
    x, v = _val(node.all_input_nodes[0]), _val(node)
    if x is None or v is None or x.dtype == v.dtype:
        return None
    return x.dtype, v.dtype


_VALUE_PRESERVING = VIEW_OPS | {"clone", "contiguous", "to", "_to_copy"}


def _fp32_matrix(ctx: LintContext):
    """fp32 matrix nodes grouped by top-level block: (block, [(node, now, bf16)])."""
    groups: dict[str, list] = {}
    for name in ctx.by_node:
        idx = [i for i in ctx.calls(name) if ctx.report.calls[i].op_class in MATRIX_CLASSES
               and ctx.report.calls[i].dtype == "float32"]
        if not idx:
            continue
        now = ctx.time(idx)
        bf16 = sum(ctx.kernel_s(ctx.report.calls[i].op_class, "bfloat16", ctx.report.calls[i].flops,
                                (ctx.report.calls[i].bytes_read + ctx.report.calls[i].bytes_written) / 2,
                                ctx.report.calls[i].kernels) for i in idx)
        groups.setdefault(ctx.block(name, 1), []).append((name, now, bf16))
    return groups


@lint_rule("fp32-matrix", "matrix ops in fp32", needs_graph=False)
def check_fp32_matrix(ctx: LintContext):
    """Matrix ops (GEMM, conv, attention) that run in fp32 and could run in bf16.

    One finding per top-level block. Saving: each fp32 matrix call's roofline time (TF32 where torch
    allows it, else SIMT fp32) minus the same call at bf16 (same FLOPs, half the bytes), forward and
    backward; master weights stay fp32 (the optimizer step is not counted).
    """
    for block, rows in _fp32_matrix(ctx).items():
        rows.sort(key=lambda r: r[2] - r[1])
        saving = sum(now - bf for _, now, bf in rows)
        if saving <= 0:
            continue
        ops = Counter(ctx.report.nodes[n].op for n, _, _ in rows)
        now = sum(r[1] for r in rows)
        yield Finding(
            "fp32-matrix", tuple(n for n, _, _ in rows), block,
            evidence=f"{sum(ops.values())} matrix op(s) in fp32 ({', '.join(f'{k} {v}' for k, v in ops.most_common())}"
                     f"): {_us(now)} per step; in bf16 est. {_us(now - saving)}",
            change="run them in bf16: torch.autocast(device_type='cuda', dtype=torch.bfloat16) or the "
                   "mixed-precision pass (fp32 master weights stay)",
            saving_s=saving, source=ctx.source(rows[0][0]),
            details={"ops": dict(ops), "time_s": now, "bf16_time_s": now - saving})


@lint_rule("cast-round-trip", "cast round trip")
def check_cast_round_trips(ctx: LintContext):
    """Casts back and forth: ``a -> b -> a`` through value-preserving ops only (views, clones).

    ``bf16 -> fp32 -> bf16`` is exact: both casts can go. ``fp32 -> bf16 -> fp32`` only rounds the
    values to bf16: dropping it changes results by less than bf16's epsilon. Saving: the two casts'
    copies, forward and backward (only the second when the first has other users).
    """
    for node in ctx.graph.nodes:
        dts = _cast_dtypes(node, ctx)
        if dts is None:
            continue
        cur, chain = node.all_input_nodes[0], [node.name]
        for _ in range(8):
            inner = _cast_dtypes(cur, ctx)
            if inner is not None or ctx.op(cur) not in _VALUE_PRESERVING or not cur.all_input_nodes:
                break
            chain.append(cur.name)
            cur = cur.all_input_nodes[0]
        inner = _cast_dtypes(cur, ctx)
        if inner is None or inner != (dts[1], dts[0]):
            continue
        chain.append(cur.name)
        first_only_here = len(cur.users) == 1
        idx = ctx.calls(node.name) + (ctx.calls(cur.name) if first_only_here else [])
        a, b = dtype_name(inner[0]), dtype_name(inner[1])
        exact = _elsize(a) < _elsize(b)
        yield Finding(
            "cast-round-trip", tuple(reversed(chain)), ctx.module(node.name),
            evidence=f"`{cur.name}` casts {a} -> {b} and `{node.name}` casts it back to {a}"
                     + (f" via {', '.join(reversed(chain[1:-1]))}" if len(chain) > 2 else "")
                     + f": {len(idx)} cast kernel(s), {_mb(sum(ctx.report.calls[i].bytes_written for i in idx))}"
                       " written per step",
            change=(f"drop both casts: {a} -> {b} -> {a} is exact" if exact
                    else f"drop the round trip (it only rounds the values to {b}), or keep the consumers in {b}"),
            saving_s=ctx.time(idx), source=ctx.source(node.name),
            details={"from": a, "to": b, "exact": exact})


SOFTMAX_OPS = {"softmax", "_softmax", "_safe_softmax"}
MATMUL_OPS = {"matmul", "bmm"}
SCORE_OPS = VIEW_OPS | {"mul", "div", "add", "sub", "masked_fill", "where", "to", "_to_copy", "clone",
                        "contiguous"}
PROB_OPS = VIEW_OPS | {"dropout", "native_dropout", "to", "_to_copy", "clone", "contiguous"}


def _score_matmul(node: fx.Node, ctx: LintContext) -> tuple[fx.Node, list[str]] | None:
    """Walk up from a softmax's input through scale/mask/views to the matmul making the scores."""
    cur, path = node.args[0], []
    for _ in range(8):
        if not isinstance(cur, fx.Node):
            return None
        if ctx.op(cur) in MATMUL_OPS:
            return cur, path
        if ctx.op(cur) not in SCORE_OPS:
            return None
        path.append(cur.name)
        cur = next((a for a in cur.args if isinstance(a, fx.Node) and _val(a) is not None
                    and _val(a).dim() >= 2), None)
    return None


def _value_matmul(node: fx.Node, ctx: LintContext) -> tuple[fx.Node, list[str]] | None:
    """Walk down from a softmax through dropout/views to the matmul that takes it as 1st operand."""
    cur, path = node, []
    for _ in range(8):
        users = list(cur.users)
        if len(users) != 1:
            return None
        u = users[0]
        if ctx.op(u) in MATMUL_OPS:
            return (u, path) if u.args[0] is cur else None
        if ctx.op(u) not in PROB_OPS:
            return None
        path.append(u.name)
        cur = u
    return None


def _4d(shape) -> list[int]:
    s = [int(x) for x in shape]
    return [_prod(s[:-3]) if len(s) > 3 else 1] + s[-3:] if len(s) >= 3 else [1, 1] + s


@lint_rule("unfused-attention", "attention without a fused kernel")
def check_attention(ctx: LintContext):
    """Hand-written attention: softmax between two matmuls (scale, mask, dropout, views allowed).

    The unfused chain materializes the score tensor [.., Lq, Lk] several times (matmul writes it,
    scale and softmax read and write it, dropout and the second matmul read it; the backward does
    the same with its gradient). Saving: the roofline time of every node of the chain, forward and
    backward, minus a fused SDPA kernel's (torch's SDPA FLOP formulas, q/k/v/out traffic, backward
    recomputes the scores) -- the way the cost model costs ``scaled_dot_product_attention``.
    """
    for node in ctx.graph.nodes:
        if node.op != "call_function" or ctx.op(node) not in SOFTMAX_OPS:
            continue
        up, down = _score_matmul(node, ctx), _value_matmul(node, ctx)
        if up is None or down is None:
            continue
        (qk, pre), (av, post) = up, down
        q, kt, v, s = _val(qk.args[0]), _val(qk.args[1]), _val(av.args[1]), _val(node)
        dtype = ctx.matrix_dtype(qk.name)
        if q is None or kt is None or v is None or s is None or dtype is None:
            continue
        qs, vs = _4d(q.shape), _4d(v.shape)
        ks = _4d(kt.shape)
        ks[-2:] = ks[-1], ks[-2]          # k^T [.., d, Lk] -> k [.., Lk, d]
        el = _elsize(dtype)
        qkvo = (2 * _prod(qs) + _prod(ks) + _prod(vs)) * el   # out has q's shape (d_v = d here)
        fwd = ctx.kernel_s("attention", dtype, flop_counter.sdpa_flop_count(qs, ks, vs), qkvo)
        bwd = (ctx.kernel_s("attention", dtype, flop_counter.sdpa_backward_flop_count(qs, qs, ks, vs),
                            2 * qkvo + (_prod(qs) + _prod(ks) + _prod(vs)) * el, _a("attention_bwd_kernels"))
               if ctx.training else 0.0)
        chain = [qk.name, *reversed(pre), node.name, *post, av.name]
        now = sum(ctx.node_time(n) for n in chain)
        moved = sum(ctx.report.calls[i].bytes_read + ctx.report.calls[i].bytes_written
                    for n in chain for i in ctx.calls(n))
        fused_bytes = qkvo * (3 if ctx.training else 1)
        saving = now - fwd - bwd
        if saving <= 0:
            continue
        score_bytes = s.numel() * el
        yield Finding(
            "unfused-attention", tuple(chain), _common_block(chain, ctx),
            evidence=f"softmax `{node.name}` between matmuls `{qk.name}` and `{av.name}`: the score tensor "
                     f"{list(s.shape)} ({_mb(score_bytes)} in {dtype}) goes through memory; the chain moves "
                     f"{_mb(moved)} per step in {_us(now)}, a fused kernel est. {_mb(fused_bytes)} in {_us(fwd + bwd)}",
            change="use F.scaled_dot_product_attention(q, k, v, scale=...) (the sdpa pass rewrites this "
                   "pattern): scores stay on chip",
            saving_s=saving, source=ctx.source(node.name),
            details={"q": qs, "k": ks, "v": vs, "score_shape": list(s.shape), "score_bytes": score_bytes,
                     "chain_time_s": now, "fused_time_s": fwd + bwd, "chain_bytes": moved,
                     "assumptions": ["attention_bwd_kernels"]})


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _graph_of(report: GraphReport) -> fx.Graph | None:
    """The captured graph a report carries (``report.captured``), if its shapes are concrete."""
    g = report.captured
    g = g.graph if isinstance(g, Captured) else g.graph if isinstance(g, fx.GraphModule) else g
    if not isinstance(g, fx.Graph):
        return None
    for n in g.nodes:
        v = _val(n)
        if n.op == "placeholder" and v is not None and any(isinstance(d, torch.SymInt) for d in v.shape):
            return None   # a symbolic capture: shapes are formulas, the report was made concrete with .at()
    return g


def lint(model_or_captured_or_report, example_inputs=None, hardware=None, dtype=None, *,
         training: bool = True, depth: int = 2, rules: Iterable[str] | None = None,
         min_saving_s: float = 0.0) -> LintReport:
    """Run the lints in :data:`RULES` on a model, a ``Captured`` graph or a ``GraphReport``.

    ``hardware``: a preset or profile (default h100; a report keeps its own). ``dtype`` costs the
    model as if cast (as in :func:`fxopt.analyze`). ``depth``: the module-path depth of the blocks
    the low-intensity lint rolls up. ``rules``: ids to run (default all). Findings below
    ``min_saving_s`` are dropped. A report without its graph runs only the rules that need no
    shapes; the others are listed in ``skipped``.
    """
    obj = model_or_captured_or_report
    names = list(RULES) if rules is None else list(rules)
    unknown = [r for r in names if r not in RULES]
    if unknown:
        raise InputError(f"unknown lint rule(s) {unknown}; known: {sorted(RULES)}")
    if isinstance(obj, GraphReport):
        if dtype is not None:
            raise InputError("lint(report, dtype=...): the report is already costed; pass dtype to "
                             "fxopt.analyze, or lint the model with dtype")
        if hardware is not None and load_hardware(hardware).name != obj.hardware.name:
            raise InputError(f"the report was costed on {obj.hardware.name}, not {hardware}; re-run "
                             f"fxopt.analyze(..., hardware={hardware!r}) or lint the model")
        report, graph = obj, _graph_of(obj)
    elif isinstance(obj, Captured):
        report, graph = analyze(obj, hardware=hardware or DEFAULT_PRESET, training=training, dtype=dtype), obj.graph
    elif isinstance(obj, nn.Module):
        if example_inputs is None:
            raise InputError("lint(model) needs example_inputs (a tensor, tuple or dict of kwargs), or pass "
                             "fxopt.capture(model, example_inputs) or a report from fxopt.analyze")
        dt = parse_dtype(dtype)
        model, inputs = _cast(obj, example_inputs, dt) if dt is not None else (obj, example_inputs)
        captured = capture(model, inputs)
        report, graph = analyze(captured, hardware=hardware or DEFAULT_PRESET, training=training), captured.graph
    else:
        raise InputError(f"lint() takes an nn.Module (with example_inputs), a Captured or a GraphReport; "
                         f"got {type(obj).__name__}")
    if report.is_symbolic:
        raise InputError("lint needs concrete sizes: pass report.at(batch=N), or analyze without dynamic_batch")
    ctx = LintContext(report, graph, depth)
    findings, skipped = [], {}
    for rid in names:
        rule = RULES[rid]
        if rule.needs_graph and graph is None:
            skipped[rid] = ("needs the captured graph's concrete shapes: lint the model or "
                            "fxopt.capture(...) instead of a report without them")
            continue
        findings += [f for f in rule.check(ctx) if f.saving_s >= min_saving_s]
    return LintReport(report.model, report.hardware.name, ctx.step_s, findings, skipped, names)


# communication-bound steps of a report analyzed with distributed= (issue 16; the check lives with
# the distributed cost model)
from .distributed import check_comm_bound  # noqa: E402
from ..cost_models.hardware import DEFAULT_PRESET

lint_rule("comm-bound", "communication-bound step (many GPUs)", needs_graph=False)(check_comm_bound)
