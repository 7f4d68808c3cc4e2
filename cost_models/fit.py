"""Fit the kernel-time parameters (``cost_models.kernels``) to measured per-op times.

The same fit serves ``fxopt calibrate`` on a device and ``fxopt calibrate --import`` of a
published table: measurements become ATen calls on fake tensors, costed by ``ops.cost_call``
(so a fitted layer norm has exactly the traffic rule the analysis applies) and timed by the one
kernel-time function; a Nelder-Mead search on log-parameters minimizes the mean absolute log
error. Held-out error is reported on rows not fitted (``split``).

Import format (CSV, one ATen op per row; extra columns are ignored):
- ``op``: ``mm`` | ``bmm`` | ``linear`` (matrix, columns ``b``, ``m``, ``n``, ``k``: b x [m,k] @ [k,n];
  linear: m rows, k in-features, n out-features, with bias) or ``add`` ``sub`` ``mul`` ``div`` ``pow``
  (tensor-tensor), ``addu`` ``mulu`` ``divu`` ``subu`` ``powu`` (tensor-scalar), ``relu`` ``gelu`` ``tanh``,
  ``layer_norm``, ``softmax`` (columns ``rows``, ``cols``: a [rows, cols] tensor, normalized over cols);
- ``dtype``: ``float32`` (FFMA for matrix ops), ``tf32``, ``bfloat16``, ``float16``;
- ``seconds`` (or ``latency_ms``); optional ``device`` to pick rows with ``--device``.
NeuSight's published tables (``OPName``, ``Latency`` in ms, ``Device``, ``B M N K`` / ``B H``; fp32,
TF32 off) are read as they are.
"""
from __future__ import annotations

import csv
import functools
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fxopt.errors import HardwareError

from .hardware import Hardware
from .ops import cost_call
from .roofline import Precision, call_time

MATRIX_OPS = ("mm", "bmm", "linear")
BINARY = ("add", "sub", "mul", "div", "pow")
UNARY = ("relu", "gelu", "tanh")
SCALAR = tuple(f"{o}u" for o in BINARY)
ROW_OPS = ("layer_norm", "softmax")
KNOWN_OPS = MATRIX_OPS + BINARY + UNARY + SCALAR + ROW_OPS
NEUSIGHT_OPS = {"ln": "layer_norm"}
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16}


class ProfileImportError(HardwareError):
    """A measurement table could not be read; the message names the row and column."""


@dataclass(frozen=True)
class Measurement:
    op: str
    dtype: str
    dims: tuple          # (b, m, n, k) for matrix ops, (rows, cols) otherwise
    seconds: float
    device: str = ""
    source: str = ""

    @property
    def op_class(self) -> str:
        """The class a held-out error is reported under (NeuSight's: BMM, FC, elementwise, ...)."""
        return {"linear": "linear", "mm": "bmm", "bmm": "bmm", "layer_norm": "layer_norm",
                "softmax": "softmax"}.get(self.op, "elementwise")

    @property
    def regime(self) -> str | None:
        if self.op not in MATRIX_OPS:
            return None
        return {"float32": "fp32", "tf32": "tf32"}.get(self.dtype, "bf16")


# ---- reading tables ----------------------------------------------------------------------

def read_table(path: "str | Path", device: str | None = None) -> list[Measurement]:
    """Measurements from a CSV in the import format or NeuSight's; ``device`` keeps one device's rows."""
    path = Path(path)
    try:
        rows = list(csv.DictReader(path.open()))
    except OSError as exc:
        raise ProfileImportError(f"cannot read {path}: {exc}") from exc
    if not rows:
        raise ProfileImportError(f"{path} has no rows")
    neusight = "OPName" in rows[0]
    need = ("OPName", "Latency") if neusight else ("op", "dtype")
    missing = [c for c in need if c not in rows[0]]
    if missing or (not neusight and not {"seconds", "latency_ms"} & set(rows[0])):
        raise ProfileImportError(f"{path}: missing column(s) {missing or ['seconds (or latency_ms)']}; "
                           f"the columns are documented in fxopt.cost_models.fit")
    out = []
    for i, r in enumerate(rows, start=2):
        if device and (r.get("Device") or r.get("device") or "") != device:
            continue
        out.append(_row(r, neusight, path, i))
    if device and not out:
        devices = sorted({r.get("Device") or r.get("device") or "" for r in rows})
        raise ProfileImportError(f"{path} has no rows for device {device!r}; it has {devices}")
    return out


def _row(r: dict, neusight: bool, path, line: int) -> Measurement:
    def num(col, cast=int):
        try:
            return cast(r[col])
        except (KeyError, TypeError, ValueError):
            raise ProfileImportError(f"{path}:{line}: column {col!r} must be a number, got {r.get(col)!r}") from None
    if neusight:
        op = NEUSIGHT_OPS.get(r["OPName"], r["OPName"])
        dtype, seconds = "float32", num("Latency", float) * 1e-3
        dims = tuple(num(c) for c in "BMNK") if op in MATRIX_OPS else (num("B"), num("H"))
        device = r.get("Device", "")
    else:
        op, dtype = r["op"], r["dtype"]
        seconds = num("seconds", float) if r.get("seconds") not in (None, "") else num("latency_ms", float) * 1e-3
        dims = tuple(num(c) for c in "bmnk") if op in MATRIX_OPS else (num("rows"), num("cols"))
        device = r.get("device", "")
    if op not in KNOWN_OPS:
        raise ProfileImportError(f"{path}:{line}: column 'op' has {op!r}; known ops: {', '.join(KNOWN_OPS)}")
    if dtype not in DTYPES:
        raise ProfileImportError(f"{path}:{line}: column 'dtype' has {dtype!r}; known: {sorted(DTYPES)}")
    if seconds <= 0 or min(dims) <= 0:
        raise ProfileImportError(f"{path}:{line}: sizes and time must be positive")
    return Measurement(op, dtype, dims, seconds, device, str(path.name))


def read_xla_matmul(path: "str | Path") -> list[Measurement]:
    """OpenXLA's H100 GEMM table (``../shared/calibration/xla/h100_matmul.csv``): FLOP/s per shape."""
    out = []
    for r in csv.DictReader(Path(path).open()):
        b, m, n, k = (int(r[c]) for c in "bmnk")
        dtype = "tf32" if r["dtype"].startswith("f32") else "bfloat16"
        out.append(Measurement("bmm" if b > 1 else "mm", dtype, (b, m, n, k), 2.0 * b * m * n * k /
                               float(r["flops_per_s"]), "NVIDIA H100 80GB HBM3", r["source"]))
    return out


# ---- costing a measurement as the analysis would -----------------------------------------

_FAKE = FakeTensorMode()


@functools.lru_cache(maxsize=None)
def call_cost(op: str, dtype: str, dims: tuple):
    """The ``CallCost`` of the ATen call a measured row ran, on fake tensors."""
    dt = DTYPES[dtype]
    with _FAKE:
        t = lambda *s: torch.empty(*s, dtype=dt)
        if op in ("mm", "bmm"):
            b, m, n, k = dims
            args = (t(m, k), t(k, n)) if b == 1 else (t(b, m, k), t(b, k, n))
            func = torch.ops.aten.mm.default if b == 1 else torch.ops.aten.bmm.default
        elif op == "linear":
            b, m, n, k = dims
            func, args = torch.ops.aten.addmm.default, (t(n), t(b * m, k), t(k, n))
        else:
            rows, cols = dims
            x = t(rows, cols)
            if op in BINARY:
                packet = getattr(torch.ops.aten, op)
                func, args = (packet.Tensor_Tensor if op == "pow" else packet.Tensor), (x, t(rows, cols))
            elif op in SCALAR:
                packet = getattr(torch.ops.aten, op[:-1])
                func, args = (packet.Tensor_Scalar if op == "powu" else packet.Scalar), (x, 2.0)
            elif op == "layer_norm":
                func, args = torch.ops.aten.native_layer_norm.default, (x, [cols], t(cols), t(cols), 1e-5)
            elif op == "softmax":
                func, args = torch.ops.aten._softmax.default, (x, -1, False)
            else:
                func, args = getattr(torch.ops.aten, op).default, (x,)
        out = func(*args)
    return cost_call(func, args, {}, out)


def predict(m: Measurement, hw: Hardware) -> float:
    """The model's time for one measured row."""
    c = call_cost(m.op, m.dtype, m.dims)
    prec = Precision(tf32_matmul=m.dtype == "tf32", tf32_conv=m.dtype == "tf32")
    return float(call_time(c.op_class, c.dtype, c.flops, c.bytes_read + c.bytes_written, c.kernels, hw, prec,
                           gemms=c.gemms, kind=c.kind).total_s)


# ---- fitting -----------------------------------------------------------------------------

def mape(rows: list[Measurement], hw: Hardware) -> float:
    """Mean absolute percentage error of the model on ``rows``."""
    return sum(abs(predict(m, hw) - m.seconds) / m.seconds for m in rows) / max(len(rows), 1)


def split(rows: list[Measurement], test_share: float = 0.3) -> tuple[list, list]:
    """Fit / held-out split by shape (a stable hash of op and dims), so no shape is in both."""
    key = lambda m: zlib.crc32(f"{m.op}{m.dims}".encode()) % 1000 / 1000
    return [m for m in rows if key(m) >= test_share], [m for m in rows if key(m) < test_share]


# parameter name -> (path in kernel_model, lower, upper)
MATRIX_PARAMS = {"eff": (0.05, 1.0), "k_half": (1.0, 2048.0), "reuse": (0.01, 24.0), "latency_s": (5e-7, 3e-5),
                 "reduce_bw": (2e11, 5e13)}
SMALL_KERNEL_BYTES = 4 * 2 ** 20
MEMORY_PARAMS = {"latency_s": (5e-7, 3e-5), "ramp_bytes": (1e3, 6e7)}


def with_params(hw: Hardware, section: str, values: dict, regime: str | None = None) -> Hardware:
    """A copy of ``hw`` whose kernel model has ``values`` in ``section`` (per ``regime``)."""
    km = {k: (dict(v) if isinstance(v, dict) else v) for k, v in hw.kernel_model.items()}
    if section == "matrix":
        km.setdefault("matrix", {})
        km["matrix"] = {r: dict(p) for r, p in km["matrix"].items()}
        km["matrix"][regime] = {**km["matrix"].get(regime, {}), **values}
    else:
        sec = dict(km.get("memory", {}))
        eff = {**sec.get("efficiency", {}), **values.get("efficiency", {})}
        sec.update({k: v for k, v in values.items() if k != "efficiency"})
        sec["efficiency"] = eff
        km["memory"] = sec
    return replace(hw, kernel_model=km)


def _loss(rows, hw) -> float:
    return sum(abs(math.log(predict(m, hw) / m.seconds)) for m in rows) / len(rows)


def _nelder_mead(f, x0: list, steps: list, iters: int) -> list:
    """A small Nelder-Mead minimizer (bounded by the caller's transform); returns the best point."""
    pts = [list(x0)] + [[x + (s if i == j else 0.0) for j, x in enumerate(x0)] for i, s in enumerate(steps)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = sorted(range(len(pts)), key=vals.__getitem__)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        centroid = [sum(p[j] for p in pts[:-1]) / (len(pts) - 1) for j in range(len(x0))]
        move = lambda t: [c + t * (w - c) for c, w in zip(centroid, pts[-1])]
        refl = move(-1.0)
        fr = f(refl)
        if fr < vals[0]:
            exp = move(-2.0)
            fe = f(exp)
            pts[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = refl, fr
        else:
            con = move(0.5)
            fc = f(con)
            if fc < vals[-1]:
                pts[-1], vals[-1] = con, fc
            else:   # shrink towards the best
                pts = [pts[0]] + [[b + 0.5 * (x - b) for b, x in zip(pts[0], p)] for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    return pts[min(range(len(pts)), key=vals.__getitem__)]


def _fit(rows, hw, names: list, bounds: dict, start: dict, make, iters: int) -> dict:
    lo = [math.log(bounds[n][0]) for n in names]
    hi = [math.log(bounds[n][1]) for n in names]
    clamp = lambda x: [min(max(v, a), b) for v, a, b in zip(x, lo, hi)]
    values = lambda x: {n: math.exp(v) for n, v in zip(names, clamp(x))}
    loss = lambda x: _loss(rows, make(values(x)))
    best = [math.log(start[n]) for n in names]
    for step in (1.0, 0.3, 0.1):   # restarts with a fresh, smaller simplex: the tile choice makes the
        best = _nelder_mead(loss, best, [step] * len(names), iters)   # surface rugged
    return {n: _round(v) for n, v in values(best).items()}


def _round(v: float) -> float:
    return float(f"{v:.4g}")


def fit_matrix(rows: list[Measurement], hw: Hardware, regime: str, iters: int = 120,
               names: "list[str] | None" = None) -> dict:
    """Fitted ``eff``, ``k_half``, ``reuse``, ``latency_s``, ``reduce_bw`` (or just ``names``) of one
    matrix regime."""
    rows = [m for m in rows if m.regime == regime]
    if not rows:
        return {}
    names = list(names or MATRIX_PARAMS)
    start = {n: hw.kernel_param("matrix")[regime][n] or 1.0 for n in names}
    return _fit(rows, hw, names, MATRIX_PARAMS, start, lambda v: with_params(hw, "matrix", v, regime), iters)


def fit_memory(rows: list[Measurement], hw: Hardware, iters: int = 150) -> dict:
    """Fitted memory-bound parameters: latency, ramp, and the sustained efficiency per class."""
    rows = [m for m in rows if m.regime is None]
    if not rows:
        return {}
    costs = [call_cost(m.op, m.dtype, m.dims) for m in rows]
    classes = sorted({c.op_class for c in costs})
    # latency and the ramp show only in small kernels; a table without any keeps the profile's
    small = min(c.bytes_read + c.bytes_written for c in costs) < SMALL_KERNEL_BYTES
    names = (list(MEMORY_PARAMS) if small else []) + [f"eff:{c}" for c in classes]
    bounds = {**MEMORY_PARAMS, **{f"eff:{c}": (0.05, 1.2) for c in classes}}
    mp = hw.kernel_param("memory")
    start = {**{n: mp[n] for n in MEMORY_PARAMS}, **{f"eff:{c}": mp["efficiency"].get(c, 0.8) for c in classes}}

    def values(v: dict) -> dict:
        out = {n: v[n] for n in MEMORY_PARAMS if n in v}
        out["efficiency"] = {n[4:]: v[n] for n in v if n.startswith("eff:")}
        return out
    fitted = _fit(rows, hw, names, bounds, start, lambda v: with_params(hw, "memory", values(v)), iters)
    return values(fitted)


def fit_profile(rows: list[Measurement], hw: Hardware, source: str, iters: int = 120) -> Hardware:
    """``hw`` with every kernel-model section the rows measure fitted to them."""
    for regime in ("fp32", "tf32", "bf16"):
        vals = fit_matrix(rows, hw, regime, iters)
        if vals:
            hw = with_params(hw, "matrix", vals, regime)
    vals = fit_memory(rows, hw, iters)
    if vals:
        hw = with_params(hw, "memory", vals)
    km = dict(hw.kernel_model)
    km["source"] = source
    return replace(hw, kernel_model=km)


def device_hardware(spec_json: "str | Path") -> Hardware:
    """A Hardware for a NeuSight device file (SMs, clock, bandwidth GB/s, fp32 GFLOP/s, L2 MB)."""
    import json
    d = json.loads(Path(spec_json).read_text())
    fp32 = d["SingleFLOPs"] * 1e9
    return Hardware(name=d["Device"], description=d["Device"], memory_bandwidth=d["Mem_Bw"] * 1e9,
                    tensor_flops={"tf32": fp32, "bf16": fp32, "fp16": fp32}, vector_flops={"fp32": fp32},
                    sm_count=d["Num_Sm"], l2_bytes=int(d["L2Cache"] * 2 ** 20),
                    memory_bytes=int(d["Dev_Mem"] * 2 ** 30), source=f"NeuSight device file {Path(spec_json).name}")
