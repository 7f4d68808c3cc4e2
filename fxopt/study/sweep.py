"""``fxopt.sweep``: cost every variant of a model family over a grid of hyper-parameters.

Each grid point builds its variant on the ``meta`` device (nothing allocated, so full-size models
cost no memory) and analyzes one training step on fake tensors. The table says, per variant,
parameters, FLOPs, predicted step time, throughput, MFU, arithmetic intensity and activation
memory, and marks the Pareto front: the variants no other variant beats on both predicted time
and model size (parameters), or on both time and FLOPs. ``measure=True`` also times each
variant on the GPU and shows predicted beside measured.
"""
from __future__ import annotations

import csv
import inspect
import io
import itertools
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn
from torch.utils._pytree import tree_flatten

from ..analyze import UnknownOpWarning, analyze, parse_dtype
from ..capture import normalize_inputs
from ..errors import FxoptError, InputError, ModelSpecError
from ..report import GraphReport
from .scaling import _with_context
from ..cost_models.hardware import DEFAULT_PRESET

__all__ = ["sweep", "SweepResult", "MeasureError", "parse_grid", "load_factory"]

SCHEMA = "fxopt.sweep/1"


class MeasureError(FxoptError):
    """``measure=True`` needs a CUDA GPU."""


@dataclass
class SweepResult:
    """One row per grid point (dicts: the grid's parameters, then the metrics), in grid order."""

    grid: dict
    rows: list[dict]
    hardware: str
    measured: bool = False
    reports: list[GraphReport] = field(default_factory=list, repr=False)
    elapsed_s: float = 0.0

    METRICS = ("n_params", "flops", "matrix_flops", "bytes", "step_time_s", "throughput", "mfu", "ai",
               "activation_bytes", "batch", "pareto_params", "pareto_flops")
    MEASURED = ("measured_s", "measured_throughput", "error")

    @property
    def columns(self) -> list[str]:
        return list(self.grid) + list(self.METRICS) + (list(self.MEASURED) if self.measured else [])

    def front(self, by: str = "params") -> list[dict]:
        """The Pareto-optimal rows on (predicted time, params) or (predicted time, FLOPs)."""
        if by not in ("params", "flops"):
            raise InputError(f"front(by={by!r}): choose 'params' or 'flops'")
        return [r for r in self.rows if r[f"pareto_{by}"]]

    def table(self, tablefmt: str = "simple") -> str:
        head = [*self.grid, "params M", "GFLOP", "step ms", "samples/s", "MFU %", "FLOP/B", "act GB"]
        if self.measured:
            head += ["measured ms", "meas. samples/s", "pred/meas"]
        head.append("front")
        body = []
        for r in self.rows:
            line = [*(r[k] for k in self.grid), f"{r['n_params'] / 1e6:.3g}", f"{r['flops'] / 1e9:,.4g}",
                    f"{r['step_time_s'] * 1e3:.4g}", f"{r['throughput']:,.0f}", f"{r['mfu'] * 100:.3g}",
                    f"{r['ai']:.3g}", f"{r['activation_bytes'] / 1e9:.3g}"]
            if self.measured:
                m = r.get("measured_s")
                line += ["-" if m is None else f"{m * 1e3:.4g}",
                         "-" if m is None else f"{r['measured_throughput']:,.0f}",
                         "-" if m is None else f"{r['step_time_s'] / m:.2f}"]
            line.append(" ".join(k for k, flag in (("P", r["pareto_params"]), ("F", r["pareto_flops"])) if flag))
            body.append(line)
        note = ("front: P = no variant is both faster and bigger (params); F = ... faster and more FLOPs "
                f"(predicted on {self.hardware})")
        return tabulate(body, headers=head, tablefmt=tablefmt, disable_numparse=True) + "\n" + note

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "hardware": self.hardware, "grid": self.grid, "measured": self.measured,
                "columns": self.columns, "rows": [{k: r.get(k) for k in self.columns} for r in self.rows]}

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow(r)
        return buf.getvalue()

    def __repr__(self) -> str:
        return f"<SweepResult {len(self.rows)} variants>\n{self.table()}"


# ---------------------------------------------------------------------------------------------
# building one variant


def _call(fn: Callable, params: dict, what: str):
    """``fn`` with the grid parameters it accepts (all of them if it takes ``**kwargs``)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return fn(**params)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return fn(**params)
    accepted = {k: v for k, v in params.items() if k in sig.parameters}
    missing = [n for n, p in sig.parameters.items() if p.default is p.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in accepted]
    if missing:
        raise InputError(f"{what} needs {missing}, which the grid {sorted(params)} does not give; add them to "
                         f"the grid (one value each) or give them defaults")
    return fn(**accepted)


def _make(factory, inputs_fn, params: dict):
    out = _call(factory, params, f"factory {getattr(factory, '__name__', factory)}")
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module) and inputs_fn is None:
        return out
    if not isinstance(out, nn.Module):
        raise InputError(f"factory(**{params}) returned {type(out).__name__}; return an nn.Module (or a "
                         f"(module, inputs) tuple when no example_inputs_fn is given)")
    if inputs_fn is None:
        raise InputError("sweep() needs example_inputs_fn(**params), unless factory returns (module, inputs)")
    return out, _call(inputs_fn, params, f"example_inputs_fn {getattr(inputs_fn, '__name__', inputs_fn)}")


def _build(factory, inputs_fn, params: dict, meta: bool):
    """On the meta device (nothing allocated); a model whose __init__ needs real tensors: on the CPU."""
    if meta:
        try:
            with torch.device("meta"):
                return _make(factory, inputs_fn, params)
        except FxoptError:
            raise
        except Exception:
            pass
    return _make(factory, inputs_fn, params)


def _batch(inputs) -> int:
    args, kwargs = normalize_inputs(inputs)
    leaf = next((t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.dim()), None)
    return int(leaf.shape[0]) if leaf is not None else 1


def _metrics(report: GraphReport, batch: int) -> dict:
    t = report.totals
    flops = sum(c.flops for c in report.calls)
    matrix = t["matrix_flops_fwd"] + t["matrix_flops_bwd"]
    step = float(t["step_time_s"])
    return {"n_params": int(t["params"]), "flops": int(flops), "matrix_flops": int(matrix), "bytes": int(t["bytes"]),
            "step_time_s": step, "throughput": batch / step if step else 0.0, "mfu": float(t["mfu"]),
            "ai": flops / t["bytes"] if t["bytes"] else 0.0, "activation_bytes": int(t["activation_bytes"]),
            "batch": batch}


def _mark_fronts(rows: list[dict]) -> None:
    """Pareto: minimize predicted time, maximize params (FLOPs): nobody is at least as fast AND as big."""
    for value in ("params", "flops"):
        key = "n_params" if value == "params" else "flops"
        for r in rows:
            r[f"pareto_{value}"] = not any(
                o["step_time_s"] <= r["step_time_s"] and o[key] >= r[key]
                and (o["step_time_s"] < r["step_time_s"] or o[key] > r[key]) for o in rows)


# ---------------------------------------------------------------------------------------------
# measuring on the GPU


def _measure(factory, inputs_fn, params: dict, training: bool, dtype, optimizer, warmup: int = 3,
             iters: int = 10, repeats: int = 3) -> float:
    """Median seconds of one step (forward, backward with ones as output gradients, optimizer
    step; the step fxopt.analyze costs) over ``repeats`` timings of ``iters`` steps, CUDA events."""
    from ..cost_models.trace import OPTIMIZERS
    torch.manual_seed(0)
    with torch.device("cuda"):
        model, inputs = _make(factory, inputs_fn, params)
    model = model.to("cuda").train(training)
    args, kwargs = normalize_inputs(inputs)
    move = lambda t: t.to("cuda") if isinstance(t, torch.Tensor) else t
    args, kwargs = tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
    if dtype is not None:
        model = model.to(dtype)
        cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
        args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    params_ = [p for p in model.parameters() if p.requires_grad]
    opt = OPTIMIZERS[optimizer](params_) if training and optimizer and params_ else None
    grads = None

    def step():
        nonlocal grads
        if not training:
            with torch.no_grad():
                model(*args, **kwargs)
            return
        outs = [t for t in tree_flatten(model(*args, **kwargs))[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if grads is None:
            grads = [torch.ones_like(t) for t in outs]
        torch.autograd.backward(outs, grads)
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / iters)
    del model, opt, grads
    torch.cuda.empty_cache()
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------
# progress


class _Progress:
    """One stderr line, rewritten in place on a terminal (tqdm is not a dependency of fxopt)."""

    def __init__(self, total: int, enabled):
        self.total, self.t0 = total, time.perf_counter()
        self.enabled = sys.stderr.isatty() if enabled is None else bool(enabled)
        self.tty = sys.stderr.isatty()

    def update(self, i: int, params: dict) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / i * (self.total - i) if i else 0.0
        text = " ".join(f"{k}={v}" for k, v in params.items()) if i < self.total else "done"
        line = f"fxopt sweep {i}/{self.total} [{elapsed:.1f} s, eta {eta:.1f} s] {text}"
        sys.stderr.write(("\r\033[K" + line) if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------


def _check_grid(grid) -> dict:
    if not isinstance(grid, dict) or not grid:
        raise InputError(f"grid must be a dict of parameter -> list of values, e.g. {{'width': [64, 96]}}; "
                         f"got {grid!r}")
    out = {}
    for k, v in grid.items():
        values = list(v) if isinstance(v, (list, tuple, range)) else [v]
        if not values:
            raise InputError(f"grid[{k!r}] is empty; give at least one value")
        out[str(k)] = values
    return out


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_used(grid: dict, factory, inputs_fn) -> None:
    """A grid parameter that no function takes would silently repeat one variant."""
    fns = [f for f in (factory, inputs_fn) if f is not None]
    unused = [k for k in grid if not any(_accepts(f, k) for f in fns)]
    if unused:
        raise InputError(f"grid parameter(s) {unused} are taken by neither the factory nor example_inputs_fn "
                         f"(their signatures); rename them or add them as parameters")


def sweep(factory: Callable[..., nn.Module], grid: dict, example_inputs_fn: Callable | None = None,
          hardware=DEFAULT_PRESET, measure: bool = False, *, training: bool = True, dtype=None,
          optimizer: str | None = "sgd", meta: bool = True, progress: bool | None = None) -> SweepResult:
    """Analyze ``factory(**point)`` on ``example_inputs_fn(**point)`` for every point of the grid.

    ``grid``: parameter -> list of values; the points are their cartesian product (in dict
    order). Each function receives the grid parameters its signature accepts. ``factory`` may
    instead return ``(module, inputs)`` (then leave ``example_inputs_fn`` out). ``meta``: build
    on the meta device (falls back to the CPU if the factory needs real tensors). ``measure``:
    also time each variant's training step on the CUDA GPU. ``progress``: a stderr progress
    line (default: when stderr is a terminal).
    """
    if measure and not torch.cuda.is_available():
        raise MeasureError(f"sweep(measure=True) times each variant on a CUDA GPU, and torch {torch.__version__} "
                           f"sees none here; run without measure=True for predictions only, or on a GPU machine")
    grid = _check_grid(grid)
    _check_used(grid, factory, example_inputs_fn)
    dtype = parse_dtype(dtype)
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    bar = _Progress(len(points), progress)
    rows, reports, unknown = [], [], {}
    t0 = time.perf_counter()
    try:
        for i, params in enumerate(points):
            bar.update(i, params)
            model, inputs = _build(factory, example_inputs_fn, params, meta)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnknownOpWarning)
                try:
                    report = analyze(model, inputs, hardware=hardware, training=training, dtype=dtype,
                                     optimizer=optimizer)
                except FxoptError as exc:
                    raise _with_context(exc, f"variant {params}: {exc}") from exc
            del model
            unknown.update(report.unknown_ops)
            row = {**params, **_metrics(report, _batch(inputs))}
            if measure:
                try:
                    row["measured_s"] = _measure(factory, example_inputs_fn, params, training, dtype, optimizer)
                    row["measured_throughput"] = row["batch"] / row["measured_s"]
                    row["error"] = row["step_time_s"] / row["measured_s"] - 1
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row.update(measured_s=None, measured_throughput=None, error="out of memory")
            rows.append(row)
            reports.append(report)
        bar.update(len(points), {})
    finally:
        bar.close()
    if unknown:
        warnings.warn(f"no cost formula for {unknown}; counted as memory traffic with 0 FLOPs", UnknownOpWarning,
                      stacklevel=2)
    _mark_fronts(rows)
    name = hardware if isinstance(hardware, str) else getattr(hardware, "name", str(hardware))
    return SweepResult(grid, rows, name, measure, reports, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# command-line helpers (``fxopt sweep file.py:factory --grid width=64,96 depth=2,3``)


def _value(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_grid(items: list[str]) -> dict:
    """``["width=64,96,128", "depth=2,3"]`` -> ``{"width": [64, 96, 128], "depth": [2, 3]}``."""
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or not name.strip() or not values.strip():
            raise InputError(f"--grid entries look like name=v1,v2,...; got {item!r}")
        grid[name.strip()] = [_value(v.strip()) for v in values.split(",") if v.strip()]
    return grid


def load_factory(spec: str):
    """``path/to/file.py:factory`` -> (factory, the file's ``example_inputs`` or None, display name)."""
    from pathlib import Path

    from ..workloads.models import load_spec_file
    module, name = load_spec_file(spec, "sweep needs MODEL as path/to/file.py:factory", "model")
    path = spec.rpartition(":")[0]
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelSpecError(f"{path} defines no function {name!r}")
    return factory, getattr(module, "example_inputs", None), f"{Path(path).stem}:{name}"
