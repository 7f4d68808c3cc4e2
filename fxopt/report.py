"""GraphReport: the cost of one training step per ATen call, rolled up per node, op class and block.

Numbers are ints/floats, or sympy expressions when the graph was captured with a symbolic batch;
``report.at(batch=256)`` turns a symbolic report into a concrete one.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace

import sympy
from tabulate import tabulate

from .cost_models.hardware import Hardware
from .cost_models.layout import conv_factor
from .cost_models.ops import MATRIX_CLASSES
from .cost_models.kernels import critical_path, host_time
from .cost_models.roofline import Precision, bound, call_time
from .nodeinfo import NodeInfo

SCHEMA = "fxopt.graph_report/1"
OPTIMIZER_WORDS = {"sgd": "SGD momentum", "adamw": "AdamW", None: "no optimizer step"}
BY = ("node", "op", "block")


@dataclass(frozen=True)
class CallRow:
    """One ATen call of the step, attributed to an fx node and a phase (fwd, bwd, opt)."""

    node: str
    phase: str
    op: str
    op_class: str
    flops: object
    bytes_read: object
    bytes_written: object
    kernels: int
    dtype: str | None
    known: bool
    conv_layout: tuple | None = None
    gemms: tuple = ()          # the call's (b, m, n, k) GEMMs (formulas in a symbolic report)
    kind: str | None = None    # matrix kernel kind (cost_models.ops.matrix_kind)
    traffic: str = ""          # the real-traffic rule, when the kernel moves more than the minimum
    extra_bytes: object = 0    # bytes beyond the minimum traffic (included in bytes_read)

    @property
    def matrix(self) -> bool:
        return self.op_class in MATRIX_CLASSES


def row_time(c: CallRow, hw: Hardware, precision: Precision, flops=None, nbytes=None):
    """Predicted time of one call (optionally with other FLOPs/bytes, e.g. a formula's)."""
    flops = c.flops if flops is None else flops
    nbytes = c.bytes_read + c.bytes_written if nbytes is None else nbytes
    return call_time(c.op_class, c.dtype, flops, nbytes, c.kernels, hw, precision, time_factor(c, hw),
                     gemms=c.gemms, kind=c.kind)


def time_factor(c: CallRow, hw: Hardware) -> float:
    """Slowdown of a call over the roofline: a conv in its slower memory layout on this device."""
    return conv_factor(c.conv_layout, hw.layout_table()) if c.conv_layout else 1.0


class _Acc:
    """Sums of one group of calls; the bound is the term that holds most of the group's time."""

    FIELDS = ("fwd_flops", "bwd_flops", "matrix_flops", "bytes_read", "bytes_written", "extra_bytes", "kernels",
              "time_s", "fwd_time_s", "bwd_time_s", "opt_time_s", "compute_s", "memory_s", "latency_s", "host_bound_s")

    def __init__(self):
        for f in self.FIELDS:
            setattr(self, f, 0)
        self.by_bound: Counter = Counter()
        self.classes: Counter = Counter()

    def add(self, row: CallRow, kt, row_bound: str, idle: float = 0.0) -> None:
        """``kt``: the call's KernelTime; its roof time counts as compute or memory, whichever
        bounds it; ``idle``: GPU time waiting for the host before this call."""
        t = kt.total_s + idle
        roof = kt.total_s - kt.latency_s
        if row_bound == "compute":
            self.compute_s += roof
        else:
            self.memory_s += roof
        self.latency_s += kt.latency_s
        self.host_bound_s += idle
        self.extra_bytes += row.extra_bytes
        flops_field = "fwd_flops" if row.phase == "fwd" else "bwd_flops"
        setattr(self, flops_field, getattr(self, flops_field) + row.flops)
        self.matrix_flops += row.flops if row.matrix else 0
        self.bytes_read += row.bytes_read
        self.bytes_written += row.bytes_written
        self.kernels += row.kernels
        self.time_s += t
        field = {"fwd": "fwd_time_s", "opt": "opt_time_s"}.get(row.phase, "bwd_time_s")
        setattr(self, field, getattr(self, field) + t)
        if row_bound != "?":
            self.by_bound[row_bound] += float(t)
        if row.kernels:
            self.classes[row.op_class] += float(t) if not isinstance(t, sympy.Basic) else 1

    def values(self) -> dict:
        flops = self.fwd_flops + self.bwd_flops
        nbytes = self.bytes_read + self.bytes_written
        return {**{f: getattr(self, f) for f in self.FIELDS}, "bytes": nbytes,
                "ai": _ratio(flops, nbytes),
                "bound": self.by_bound.most_common(1)[0][0] if self.by_bound else "-"}


def _ratio(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return a / b if b != 0 else 0
    return a / b if b else 0.0


class GraphReport:
    """Per-call costs of one step plus the node metadata needed to roll them up."""

    def __init__(self, *, model: str, calls: list[CallRow], nodes: dict[str, NodeInfo], hardware: Hardware,
                 precision: Precision, params: int, saved_bytes: dict, symbols: dict | None = None,
                 training: bool = True, inputs: str = "", captured=None, optimizer: str | None = None):
        self.model, self.calls, self.nodes, self.hardware = model, calls, nodes, hardware
        self.optimizer = optimizer       # the step's optimizer ("sgd" momentum, "adamw") or None
        self.precision, self.params, self.saved_bytes = precision, params, saved_bytes
        self.symbols = symbols or {}     # user name -> sympy.Symbol
        self.training, self.inputs = training, inputs
        self.captured = captured         # the graph the calls came from (lint reads its shapes); None
                                         # for a report re-evaluated with .at() (shapes are formulas)
        self._times = [row_time(c, hardware, precision) for c in calls]
        self._host_idle = self._critical_path()
        self.distributed = None          # a DistributedCost (fxopt/study/distributed.py) when analyzed with distributed=

    @property
    def call_times(self) -> list:
        """The predicted KernelTime of each call (compute, memory, latency), parallel to ``calls``."""
        return self._times

    @property
    def host_idle(self) -> list:
        """Per call, the GPU time spent waiting for the host to launch it (eager dispatch);
        zeros in a symbolic report, whose step is the GPU's sum."""
        return self._host_idle

    def _critical_path(self) -> list:
        if self.is_symbolic or not self.calls:
            return [0.0] * len(self.calls)
        gpu = [float(t.total_s) for t in self._times]
        host = [host_time(c.phase, c.kernels, self.hardware) for c in self.calls]
        return critical_path(gpu, host)[2]

    # ---- shape of the report ------------------------------------------------------------
    @property
    def is_symbolic(self) -> bool:
        return bool(self.symbols)

    def at(self, **values: int) -> "GraphReport":
        """The concrete report at the given symbol values, e.g. ``report.at(batch=256)``."""
        unknown = set(values) - set(self.symbols)
        if unknown:
            from .errors import AnalysisError
            raise AnalysisError(f"report has no symbol(s) {sorted(unknown)}; it has {sorted(self.symbols)}")
        subs = {self.symbols[k]: v for k, v in values.items()}

        def conc(x):
            return _concrete(x.xreplace(subs)) if isinstance(x, sympy.Basic) else x

        calls = [replace(c, flops=conc(c.flops), bytes_read=conc(c.bytes_read),
                         bytes_written=conc(c.bytes_written), extra_bytes=conc(c.extra_bytes),
                         gemms=tuple(tuple(conc(d) for d in g) for g in c.gemms)) for c in self.calls]
        saved = {k: conc(v) for k, v in self.saved_bytes.items()}
        rest = {k: v for k, v in self.symbols.items() if k not in values}
        inputs = self.inputs + " at " + ", ".join(f"{k}={v}" for k, v in values.items())
        return GraphReport(model=self.model, calls=calls, nodes=self.nodes, hardware=self.hardware,
                           precision=self.precision, params=self.params, saved_bytes=saved, symbols=rest,
                           training=self.training, inputs=inputs, optimizer=self.optimizer)

    @property
    def unknown_ops(self) -> dict[str, int]:
        """ATen ops with no cost formula, with their call counts (never silently zero)."""
        return dict(Counter(c.op for c in self.calls if not c.known))

    # ---- numbers --------------------------------------------------------------------------
    def _bound(self, t) -> str:
        return "?" if isinstance(t.total_s, sympy.Basic) else bound(t.compute_s, t.memory_s, t.launch_s)

    def _group(self, key) -> dict:
        groups: dict = {}
        for c, t, idle in zip(self.calls, self._times, self._host_idle):
            k = key(c)
            if k is None:
                continue
            groups.setdefault(k, _Acc()).add(c, t, self._bound(t), idle)
        return groups

    @property
    def totals(self) -> dict:
        """Step totals; with ``distributed``, plus comm_bytes/comm_time_s/exposed_comm_s, and the
        exposed communication in step_time_s."""
        out = self._one_gpu_totals()
        return out if self.distributed is None else self.distributed.adjust(out)

    def _one_gpu_totals(self) -> dict:
        def total(pred):
            return (sum((c.flops for c in self.calls if pred(c)), 0))
        step = self.step_time_s
        acc = _Acc()
        for c, t, idle in zip(self.calls, self._times, self._host_idle):
            acc.add(c, t, self._bound(t), idle)
        matrix = total(lambda c: c.matrix and c.phase == "fwd") + total(lambda c: c.matrix and c.phase == "bwd")
        return {
            "matrix_flops_fwd": total(lambda c: c.matrix and c.phase == "fwd"),
            "matrix_flops_bwd": total(lambda c: c.matrix and c.phase == "bwd"),
            "other_flops_fwd": total(lambda c: not c.matrix and c.phase == "fwd"),
            "other_flops_bwd": total(lambda c: not c.matrix and c.phase == "bwd"),
            "optimizer_flops": total(lambda c: c.phase == "opt"),
            "bytes": (sum((c.bytes_read + c.bytes_written for c in self.calls), 0)),
            "kernels": sum(c.kernels for c in self.calls),
            "step_time_s": step,
            "gpu_time_s": step - acc.host_bound_s,
            "compute_bound_s": acc.compute_s, "memory_bound_s": acc.memory_s, "latency_s": acc.latency_s,
            "host_bound_s": acc.host_bound_s,
            "fwd_time_s": acc.fwd_time_s, "bwd_time_s": acc.bwd_time_s, "optimizer_time_s": acc.opt_time_s,
            "min_bytes": (sum((c.bytes_read + c.bytes_written - c.extra_bytes for c in self.calls), 0)),
            "mfu": (_ratio(matrix, step * self.hardware.bf16_peak)),
            "params": self.params,
            "activation_bytes": (sum(self.saved_bytes.values(), 0)),
            "unknown_ops": sum(self.unknown_ops.values()),
        }

    @property
    def step_time_s(self):
        """Kernel times plus the GPU's waits for the host (the critical path of an eager step)."""
        return sum((t.total_s for t in self._times), 0) + sum(self._host_idle)

    def rows(self, by: str = "node", depth: int = 1) -> list[dict]:
        """Rows hottest first. ``by``: node, op (op class) or block (module path at ``depth``)."""
        if by not in BY:
            from .errors import FxoptError
            raise FxoptError(f"by={by!r}: choose one of {BY}")
        keys = {"node": lambda c: c.node, "op": lambda c: c.op_class if c.kernels else None,
                "block": lambda c: self.nodes[c.node].block(depth)}
        groups = self._group(keys[by])
        step = self.step_time_s
        out = []
        for k, acc in groups.items():
            row = {by: k, **acc.values(), "share": _ratio(acc.time_s, step)}
            if by == "node":
                info = self.nodes[k]
                row.update(op=info.op, op_class=acc.classes.most_common(1)[0][0] if acc.classes else "view",
                           module=info.module, source=info.source, saved_bytes=self.saved_bytes.get(k, 0))
            elif by == "block":
                row["saved_bytes"] = sum((v for n, v in self.saved_bytes.items()
                                          if self.nodes[n].block(depth) == k), 0)
            out.append(row)
        return sorted(out, key=lambda r: -_sort_key(r["time_s"]))

    # ---- rendering ------------------------------------------------------------------------
    _COLUMNS = {
        "node": [("node", "node"), ("op", "op"), ("op_class", "class"), ("module", "module")],
        "op": [("op", "op class")],
        "block": [("block", "block")],
    }
    _NUMBERS = [("fwd_flops", "fwd GFLOP", 1e-9), ("bwd_flops", "bwd GFLOP", 1e-9), ("bytes", "MB", 1e-6),
                ("ai", "FLOP/B", 1), ("kernels", "kernels", 1), ("time_s", "time ms", 1e3),
                ("bound", "bound", None), ("share", "share %", 100)]

    # a symbolic report shows formulas of the additive quantities; times need concrete sizes
    _SYMBOLIC = ("fwd_flops", "bwd_flops", "bytes", "kernels")

    def _table_rows(self, by: str, top: int, depth: int):
        numbers = [n for n in self._NUMBERS if not self.is_symbolic or n[0] in self._SYMBOLIC]
        cols = self._COLUMNS[by] + [(k, h) for k, h, _ in numbers]
        scale = {k: s for k, _, s in self._NUMBERS}
        body = [[_fmt(r[k], scale.get(k)) for k, _ in cols] for r in self.rows(by, depth)[:top]]
        return [h for _, h in cols], body

    def table(self, top: int = 30, by: str = "node", depth: int = 1, tablefmt: str = "simple") -> str:
        headers, body = self._table_rows(by, top, depth)
        return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True)

    def summary(self) -> str:
        t = self.totals
        lines = [
            f"{self.model} ({self.inputs}), {self._step_words()} on "
            f"{self.hardware.name}",
            f"  params             {_fmt(t['params'], 1e-6)} M",
            f"  matrix FLOPs       fwd {_fmt(t['matrix_flops_fwd'], 1e-9)} G, bwd {_fmt(t['matrix_flops_bwd'], 1e-9)} G",
            f"  other FLOPs        fwd {_fmt(t['other_flops_fwd'], 1e-9)} G, bwd {_fmt(t['other_flops_bwd'], 1e-9)} G, "
            f"optimizer {_fmt(t['optimizer_flops'], 1e-9)} G",
            f"  bytes moved        {_fmt(t['bytes'], 1e-9)} GB in {t['kernels']} kernels",
            f"  activations saved  {_fmt(t['activation_bytes'], 1e-9)} GB",
            f"  kernel times       {self.hardware.profile_kind()}",
        ]
        if self.is_symbolic:
            lines.append(f"  (symbolic in {', '.join(sorted(self.symbols))}: use .at({next(iter(self.symbols))}=N) "
                         f"for times, bounds and shares)")
        else:
            lines.append(f"  predicted step     {_fmt(t['step_time_s'], 1e3)} ms, MFU {_fmt(t['mfu'], 100)} %")
            lines.append(f"  time split         compute {_fmt(t['compute_bound_s'], 1e3)} ms, memory "
                         f"{_fmt(t['memory_bound_s'], 1e3)} ms, kernel latency {_fmt(t['latency_s'], 1e3)} ms, "
                         f"host-bound {_fmt(t['host_bound_s'], 1e3)} ms")
        if self.distributed is not None:
            lines.append(self.distributed.summary())
        if self.unknown_ops:
            lines.append(f"  UNKNOWN ops (no cost formula, counted as memory traffic only): {self.unknown_ops}")
        return "\n".join(lines)

    def _step_words(self) -> str:
        """What was costed, with the assumptions a reader needs: optimizer and TF32 use."""
        tf32 = (f"TF32 matmul {'on' if self.precision.tf32_matmul else 'off'}, "
                f"conv {'on' if self.precision.tf32_conv else 'off'}")
        if not self.training:
            return f"forward ({tf32})"
        opt = OPTIMIZER_WORDS.get(self.optimizer, str(self.optimizer))
        return f"training step ({opt}, {tf32})"

    def to_markdown(self, top: int = 30, by: str = "node", depth: int = 1) -> str:
        return f"```\n{self.summary()}\n```\n\n{self.table(top, by, depth, tablefmt='github')}\n"

    def to_dict(self, depth: int = 1) -> dict:
        return _jsonable({
            "schema": SCHEMA, "model": self.model, "inputs": self.inputs, "training": self.training,
            "hardware": self.hardware.name, "symbols": sorted(self.symbols), "optimizer": self.optimizer,
            "tf32": {"matmul": self.precision.tf32_matmul, "conv": self.precision.tf32_conv},
            "totals": self.totals, "unknown_ops": self.unknown_ops,
            "nodes": self.rows("node"), "op_classes": self.rows("op"), "blocks": self.rows("block", depth),
            "profile": self.hardware.profile_kind(),
            **({"distributed": self.distributed.to_dict()} if self.distributed is not None else {}),
        })

    def to_json(self, depth: int = 1, indent: int = 1) -> str:
        return json.dumps(self.to_dict(depth), indent=indent)

    def __repr__(self) -> str:
        return f"<GraphReport {self.model}: {len(self.calls)} calls>\n{self.summary()}"


def _concrete(x):
    return x if isinstance(x, (int, float)) else int(x) if x.is_Integer else float(x)


def _sort_key(x) -> float:
    if isinstance(x, sympy.Basic):  # symbolic: order by the value at symbol = 1
        return float(x.subs({s: 1 for s in x.free_symbols}))
    return float(x)


def _fmt(x, scale) -> str:
    if scale is None or isinstance(x, str):
        return str(x)
    if isinstance(x, sympy.Basic):
        return str(sympy.nsimplify(x * scale, rational=False).evalf(4))
    v = x * scale
    return f"{v:,.0f}" if isinstance(x, int) and scale == 1 else f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, sympy.Basic):
        return str(x) if x.free_symbols else _concrete(x)
    return x
