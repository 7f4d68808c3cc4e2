"""Measure a whole training step of the user's own loop: data loader, host, kernels, collectives.

``profile_training(loop)`` drives a generator function that runs the user's loop and yields once
after each step; ``with trace_training() as t: ... t.step()`` does the same from inside a loop.
The first ``warmup`` steps run without the profiler (nothing is recorded, nothing slows them
down), the next ``steps`` run under ``torch.profiler`` (CPU activity, plus CUDA on a GPU), each
inside an ``fxopt.step#N`` range, after which the profiler stops again.

The profiler's own Chrome trace is the one input of the analysis (the format HolisticTraceAnalysis
and Perfetto read). Per step, on the thread that runs the loop:

- data wait: DataLoader ``__next__`` (torch names the range ``enumerate(DataLoader)#...``);
- forward: from the end of the batch fetch to the first autograd engine call; backward: the span
  of ``autograd::engine::evaluate_function`` calls; optimizer: ``Optimizer.step#`` and
  ``Optimizer.zero_grad#`` ranges;
- collectives: gloo/NCCL/c10d events on any thread or stream; exposed = the part no compute
  overlaps;
- device busy: GPU kernels and copies (launched by this step's ops); on the CPU the ATen ops
  themselves (outside the data wait), split into matrix ops (torch's FLOP registry: mm, conv,
  SDPA) and the rest; host-to-device copies: ``Memcpy HtoD`` on the GPU;
- host gaps: step time in which the device does nothing and the loop neither waits for data nor
  for a collective: Python and kernel launches (on the CPU: Python between ATen ops).

HolisticTraceAnalysis (``holistictraceanalysis`` 0.5) was checked and is not used: its temporal
breakdown, idle time and overlap analyses are defined over GPU kernel events, so a CPU trace
yields nothing, it does not know DataLoader or optimizer ranges, and it installs ~80 packages
(jupyterlab, pandas, plotly). The arithmetic needed here is interval unions on one trace.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile as torch_profile

from ..errors import FxoptError

log = logging.getLogger(__name__)

__all__ = ["profile_training", "trace_training", "TraceTraining", "TrainingProfile", "Verdict", "ProfileTrainingError"]

STEP = "fxopt.step#"
DATA = "enumerate(DataLoader)#"
OPTIMIZER = ("Optimizer.step#", "Optimizer.zero_grad#")
BACKWARD = "autograd::engine::evaluate_function"
COLLECTIVE = re.compile(r"nccl|gloo:|c10d::|all_?reduce|all_?gather|reduce_scatter|broadcast|all_?to_?all", re.I)
MATRIX_KERNEL = re.compile(r"gemm|conv|cutlass|xmma|flash|fmha|cudnn|wgrad|dgrad|fprop|attention", re.I)
H2D = re.compile(r"HtoD", re.I)
DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


class ProfileTrainingError(FxoptError):
    """The loop cannot be profiled (not a generator, too few steps, nothing recorded)."""


@dataclass(frozen=True)
class Verdict:
    kind: str        # input-bound, communication-bound, host-bound, memory-bound kernels, compute-bound
    share: float     # of the median step
    evidence: str
    change: str


# What holds a step back, in the order it is judged: (kind, metric, share of the step at which it
# holds the step back, the change to try). Past these, the device is busy: the kernels decide.
RULES = [
    ("input-bound", "data_wait_s", 0.2,
     "raise DataLoader num_workers, set pin_memory=True and persistent_workers=True, raise prefetch_factor; "
     "move augmentation to the GPU"),
    ("communication-bound", "comm_exposed_s", 0.2,
     "let the backward hide the collectives: DDP bucket_cap_mb (smaller first buckets start earlier), "
     "gradient_as_bucket_view=True, no_sync() with gradient accumulation; fewer, larger collectives"),
    ("host-bound", "host_gap_s", 0.3,
     "give the device more work per launch: a larger batch, CUDA graphs (torch.compile mode='reduce-overhead'), "
     "fewer small kernels (fxopt optimize fusion, torch.compile)"),
]
KERNEL_RULES = {
    "memory-bound kernels": "cut bytes: fuse pointwise and normalization chains (fxopt optimize --backend triton, "
                            "torch.compile), bf16 autocast, channels-last",
    "compute-bound": "the device is busy with matrix math: bf16 autocast / TF32, tensor-core friendly shapes "
                     "(multiples of 64), then see `fxopt report` for per-node efficiency",
}
METRICS = ("wall_s", "data_wait_s", "h2d_s", "forward_s", "backward_s", "optimizer_s", "comm_s", "comm_exposed_s",
           "device_busy_s", "device_idle_s", "host_gap_s", "matrix_s", "other_kernel_s")


# ---- interval arithmetic (microseconds) --------------------------------------------------------

def _union(iv) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(iv):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(iv) -> float:
    return sum(b - a for a, b in iv)


def _intersect(x, y) -> list[tuple[float, float]]:
    """Intersection of two unions (sorted, disjoint)."""
    out, i, j = [], 0, 0
    while i < len(x) and j < len(y):
        a, b = max(x[i][0], y[j][0]), min(x[i][1], y[j][1])
        if a < b:
            out.append((a, b))
        if x[i][1] < y[j][1]:
            i += 1
        else:
            j += 1
    return out


def _minus(x, y) -> list[tuple[float, float]]:
    """x without y (both unions)."""
    out = []
    for a, b in x:
        cur = a
        for c, d in y:
            if d <= cur or c >= b:
                continue
            if c > cur:
                out.append((cur, c))
            cur = max(cur, d)
        if cur < b:
            out.append((cur, b))
    return out


def _clip(iv, lo, hi):
    return [(max(a, lo), min(b, hi)) for a, b in iv if b > lo and a < hi]


# ---- the result -----------------------------------------------------------------------------------

@dataclass
class TrainingProfile:
    device: str
    steps: list[dict]                 # per profiled step: METRICS in seconds
    verdict: Verdict
    also: list[Verdict]
    collectives: dict                 # name -> {"count", "seconds"} over the profiled steps
    warmup: int
    unprofiled_step_s: list[float]    # wall time of each step outside the profiled window
    rank: int | None = None
    notes: list[str] = field(default_factory=list)
    trace: dict = field(default_factory=dict, repr=False)   # torch.profiler's Chrome trace
    phases: list[dict] = field(default_factory=list, repr=False)  # measured phase slices (absolute us)

    def median(self, metric: str) -> float:
        return statistics.median(s[metric] for s in self.steps)

    def summary(self) -> str:
        wall = self.median("wall_s")
        pct = lambda m: f"{self.median(m) * 1e3:8.3f} ms {self.median(m) / wall * 100:5.1f} %" if wall else "-"
        who = f" (rank {self.rank})" if self.rank is not None else ""
        lines = [f"training loop on {self.device}{who}: {len(self.steps)} profiled steps after {self.warmup} warm-up; "
                 f"median step {wall * 1e3:.3f} ms",
                 f"  verdict: {self.verdict.kind}: {self.verdict.evidence}",
                 f"  try: {self.verdict.change}"]
        lines += [f"  also {v.kind}: {v.evidence}" for v in self.also]
        labels = [("data wait", "data_wait_s"), ("host-to-device", "h2d_s"), ("forward (span)", "forward_s"),
                  ("backward (span)", "backward_s"), ("optimizer", "optimizer_s"), ("collectives", "comm_s"),
                  ("  exposed", "comm_exposed_s"), ("device busy", "device_busy_s"), ("  matrix", "matrix_s"),
                  ("  other kernels", "other_kernel_s"), ("device idle", "device_idle_s"),
                  ("host gaps", "host_gap_s")]
        lines.append("  per step (median):")
        lines += [f"    {k:16s}{pct(m)}" for k, m in labels]
        if self.collectives:
            lines.append("  collectives: " + ", ".join(f"{k} x{v['count']} ({v['seconds'] * 1e3:.3f} ms)"
                                                       for k, v in self.collectives.items()))
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {"schema": "fxopt.profile_training/1", "device": self.device, "rank": self.rank,
                "torch": torch.__version__, "warmup": self.warmup,
                "median": {m: self.median(m) for m in METRICS}, "steps": self.steps,
                "verdict": self.verdict.__dict__, "also": [v.__dict__ for v in self.also],
                "collectives": self.collectives, "unprofiled_step_s": self.unprofiled_step_s, "notes": self.notes}

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def chrome_trace(self) -> dict:
        """torch.profiler's trace plus an "fxopt: step phases" process (one track per phase)."""
        events = list(self.trace.get("traceEvents", []))
        pid = "fxopt"
        tracks = list(dict.fromkeys(p["track"] for p in self.phases))
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": "fxopt: step phases"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": -1}})
        for i, t in enumerate(tracks, 1):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": i, "args": {"name": t}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": i, "args": {"sort_index": i}})
        for p in self.phases:
            events.append({"ph": "X", "name": p["name"], "cat": "fxopt", "pid": pid,
                           "tid": tracks.index(p["track"]) + 1, "ts": p["ts"], "dur": p["dur"],
                           "args": {"step": p["step"]}})
        return {**{k: v for k, v in self.trace.items() if k != "traceEvents"}, "traceEvents": events}

    def export_chrome_trace(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.chrome_trace()))
        return path


# ---- driving the loop -----------------------------------------------------------------------------

class TraceTraining:
    """``with trace_training(steps, warmup) as t:`` ... ``t.step()`` after each step; then ``t.result``.

    Outside the profiled window ``step()`` only reads the clock.
    """

    def __init__(self, steps: int = 20, warmup: int = 5, *, activities=None):
        if not isinstance(steps, int) or steps < 1 or not isinstance(warmup, int) or warmup < 0:
            raise ProfileTrainingError(f"steps must be an int >= 1 and warmup an int >= 0, got steps={steps!r}, "
                                       f"warmup={warmup!r}")
        self.steps, self.warmup = steps, warmup
        cuda = torch.cuda.is_available()
        self.activities = activities or ([ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
        self.result: TrainingProfile | None = None
        self._n = 0            # step() calls so far
        self._prof = None
        self._range = None
        self._done = False
        self._last = 0.0
        self._walls: list[float] = []

    def __enter__(self) -> "TraceTraining":
        self._last = time.perf_counter()
        if self.warmup == 0:
            self._start()
        return self

    def step(self) -> None:
        now = time.perf_counter()
        if self._prof is None:
            self._walls.append(now - self._last)
        self._n += 1
        if self._prof is not None:
            self._range.__exit__(None, None, None)
            if self._n - self.warmup >= self.steps:
                self._stop()
            else:
                self._open()
        elif not self._done and self._n == self.warmup:
            self._start()
        self._last = time.perf_counter()

    def _start(self) -> None:
        log.info("profiling %d training steps after %d warm-up steps", self.steps, self.warmup)
        self._prof = torch_profile(activities=self.activities)
        self._prof.__enter__()
        self._open()

    def _open(self) -> None:
        self._range = record_function(f"{STEP}{self._n - self.warmup}")
        self._range.__enter__()

    def _stop(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof, self._prof, self._done = self._prof, None, True
        prof.__exit__(None, None, None)
        self._trace = _export(prof)
        log.info("profiler stopped after %d steps; %d trace events", self._n - self.warmup,
                 len(self._trace.get("traceEvents", [])))

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._prof is not None:  # the loop ended inside the window: close the open step
            self._range.__exit__(None, None, None)
            self._stop()
        if exc_type is not None:
            return
        profiled = self._n - self.warmup
        if not self._done or profiled < 1:
            raise ProfileTrainingError(f"the loop ran {self._n} steps; profiling needs at least warmup + 1 = "
                                       f"{self.warmup + 1} (call t.step() once after each training step, or lower "
                                       f"warmup)")
        self.result = analyze_trace(self._trace, warmup=self.warmup, unprofiled=self._walls)


def trace_training(steps: int = 20, warmup: int = 5, *, activities=None) -> TraceTraining:
    """Context manager: profile the ``steps`` steps after the first ``warmup`` ``t.step()`` calls."""
    return TraceTraining(steps, warmup, activities=activities)


def profile_training(loop, steps: int = 20, warmup: int = 5, *, activities=None) -> TrainingProfile:
    """Profile the user's own training loop: ``loop`` is a generator function (or generator) that
    runs it and yields once after each step. Runs ``warmup + steps`` steps, then closes the loop."""
    gen = loop() if inspect.isgeneratorfunction(loop) else loop
    if not inspect.isgenerator(gen):
        raise ProfileTrainingError(f"profile_training() needs a generator function that yields after each "
                                   f"training step (def train(): ... for batch in loader: ...; yield), got "
                                   f"{type(loop).__name__}")
    tracer = TraceTraining(steps, warmup, activities=activities)
    try:
        with tracer:
            for _ in range(warmup + steps):
                try:
                    next(gen)
                except StopIteration:
                    break
                tracer.step()
    finally:
        gen.close()
    return tracer.result


def _export(prof) -> dict:
    fd, path = tempfile.mkstemp(suffix=".json", prefix="fxopt-trace-")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        return json.loads(Path(path).read_text())
    finally:
        os.unlink(path)


# ---- analysis -------------------------------------------------------------------------------------

def _matrix_ops() -> set[str]:
    from ..cost_models.ops import MATRIX_FORMULAS  # torch's FLOP registry: mm, addmm, conv, SDPA, ...
    names = {k.replace(".", "::", 1) for k in MATRIX_FORMULAS}
    return names | {"aten::linear", "aten::matmul", "aten::conv1d", "aten::conv2d", "aten::conv3d",
                    "aten::scaled_dot_product_attention", "aten::mkldnn_convolution"}


def analyze_trace(trace: dict, *, warmup: int = 0, unprofiled=()) -> TrainingProfile:
    """Per-step breakdown and verdict of a torch.profiler Chrome trace with ``fxopt.step#N`` ranges."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps_ev = sorted((e for e in events if e["name"].startswith(STEP) and e.get("cat") == "user_annotation"),
                      key=lambda e: e["ts"])
    if not steps_ev:
        raise ProfileTrainingError("the trace has no fxopt.step# ranges: was the loop run under trace_training()?")
    loop_tid = steps_ev[0]["tid"]
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    device = [e for e in events if e.get("cat") in DEVICE_CATS]
    gpu = bool(device)
    matrix_ops = _matrix_ops()
    steps, phases, coll = [], [], {}
    for i, st in enumerate(steps_ev):
        lo, hi = st["ts"], st["ts"] + st["dur"]
        inside = [e for e in host if e is not st and e["ts"] >= lo and e["ts"] + e["dur"] <= hi]
        main = [e for e in inside if e["tid"] == loop_tid]
        iv = lambda evs: _union((e["ts"], e["ts"] + e["dur"]) for e in evs)
        data = iv(e for e in main if e["name"].startswith(DATA))
        opt = iv(e for e in main if e["name"].startswith(OPTIMIZER))
        bwd_ev = [e for e in inside if e["name"].startswith(BACKWARD)]
        comm_host = [e for e in inside if COLLECTIVE.search(e["name"])]
        for e in comm_host:
            if e["tid"] != loop_tid or not any(p["ts"] <= e["ts"] and e["ts"] + e["dur"] <= p["ts"] + p["dur"]
                                               for p in comm_host if p is not e):
                rec = coll.setdefault(e["name"], {"count": 0, "seconds": 0.0})
                rec["count"] += 1
                rec["seconds"] += e["dur"] * 1e-6
        if gpu:  # whatever the device runs during this step's wall time (kernels lag their launches)
            mine = [e for e in device if e["ts"] < hi and e["ts"] + e["dur"] > lo]
            cl = lambda evs: _clip(iv(evs), lo, hi)
            comm = cl(e for e in mine if COLLECTIVE.search(e["name"]))
            busy = cl(mine)
            compute = cl(e for e in mine if not COLLECTIVE.search(e["name"]))  # may overlap the collectives
            for e in mine:
                if COLLECTIVE.search(e["name"]) and lo <= e["ts"] < hi:
                    rec = coll.setdefault(e["name"], {"count": 0, "seconds": 0.0})
                    rec["count"] += 1
                    rec["seconds"] += e["dur"] * 1e-6
            matrix = cl(e for e in mine if e.get("cat") == "kernel" and MATRIX_KERNEL.search(e["name"])
                        and not COLLECTIVE.search(e["name"]))
            h2d = _length(cl(e for e in mine if e.get("cat") == "gpu_memcpy" and H2D.search(e["name"])))
        else:
            comm = iv(comm_host)
            ops = [e for e in main if e["name"].startswith("aten::")]
            busy = _minus(_minus(iv(ops), data), comm)
            compute = busy
            matrix = _minus(_minus(iv(e for e in ops if e["name"] in matrix_ops), data), comm)
            h2d = 0.0
        wall = hi - lo
        exposed = _minus(comm, compute)
        gaps = _minus(_minus(_minus([(lo, hi)], busy), data), comm)
        bwd = (min(e["ts"] for e in bwd_ev), max(e["ts"] + e["dur"] for e in bwd_ev)) if bwd_ev else None
        fwd_end = bwd[0] if bwd else (opt[0][0] if opt else hi)
        fwd_start = max([lo] + [b for a, b in data if b <= fwd_end])
        m = {"wall_s": wall, "data_wait_s": _length(data), "h2d_s": h2d,
             "forward_s": max(0.0, fwd_end - fwd_start), "backward_s": (bwd[1] - bwd[0]) if bwd else 0.0,
             "optimizer_s": _length(opt), "comm_s": _length(comm), "comm_exposed_s": _length(_clip(exposed, lo, hi)),
             "device_busy_s": _length(_clip(busy, lo, hi)), "device_idle_s": wall - _length(_clip(busy, lo, hi)),
             "host_gap_s": _length(gaps), "matrix_s": _length(_clip(matrix, lo, hi))}
        m["other_kernel_s"] = max(0.0, _length(_clip(compute, lo, hi)) - m["matrix_s"])  # collectives apart
        steps.append({"step": i, **{k: v * 1e-6 for k, v in m.items()}})
        tracks = [("data wait", data), ("optimizer", opt), ("collective", _clip(comm, lo, hi)),
                  ("collective exposed", _clip(exposed, lo, hi)), ("host gap", gaps)]
        tracks += [("forward", [(fwd_start, fwd_end)] if fwd_end > fwd_start else []),
                   ("backward", [bwd] if bwd else [])]
        phases.append({"name": f"step {i}", "track": "step", "ts": lo, "dur": wall, "step": i})
        for track, ivs in tracks:
            phases += [{"name": track, "track": track, "ts": a, "dur": b - a, "step": i} for a, b in ivs]
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else None
    name = torch.cuda.get_device_name() if gpu and torch.cuda.is_available() else ("cuda" if gpu else "cpu")
    result = TrainingProfile(name, steps, Verdict("", 0, "", ""), [], coll, warmup, list(unprofiled), rank,
                             trace=trace, phases=phases)
    loader = next((e["name"].split("#", 1)[1].split(".")[0] for e in host if e["name"].startswith(DATA)), None)
    result.verdict, result.also = _verdicts(result, loader)
    if not gpu:
        result.notes.append("CPU: the device is the host; device busy = ATen op time, host gaps = Python between ops")
    return result


def _verdicts(res: TrainingProfile, loader: str | None) -> tuple[Verdict, list[Verdict]]:
    """The first rule whose share of the median step passes its threshold; the others that pass too."""
    wall = res.median("wall_s")
    n = len(res.steps)
    found = []
    for kind, metric, threshold, change in RULES:
        share = res.median(metric) / wall if wall else 0.0
        if share >= threshold:
            what = {"data_wait_s": "waiting for the next batch", "comm_exposed_s": "collectives no compute hides",
                    "host_gap_s": "device idle while the host runs Python / launches"}[metric]
            extra = ""
            if metric == "data_wait_s" and loader:
                extra = (f"; {loader} is the single-process loader (num_workers=0)"
                         if "SingleProcess" in loader else f"; loader {loader}")
            found.append(Verdict(kind, share, f"{what}: {res.median(metric) * 1e3:.3f} ms of {wall * 1e3:.3f} ms per "
                                              f"step ({share:.0%}, median of {n} steps){extra}", change))
    busy, matrix, other = res.median("device_busy_s"), res.median("matrix_s"), res.median("other_kernel_s")
    kind = "memory-bound kernels" if other > matrix else "compute-bound"
    kernels = Verdict(kind, busy / wall if wall else 0.0,
                      f"device busy {busy * 1e3:.3f} ms of {wall * 1e3:.3f} ms per step: matrix ops "
                      f"{matrix * 1e3:.3f} ms,"
                      f" other kernels {other * 1e3:.3f} ms", KERNEL_RULES[kind])
    if found:
        return found[0], found[1:]
    return kernels, []


# ---- command line -------------------------------------------------------------------------------

def load_loop(spec: str):
    """``path/to/file.py:train_fn`` -> the generator function ``train_fn`` of that file."""
    from ..workloads.models import load_spec_file
    module, name = load_spec_file(spec, "profile-training needs LOOP as path/to/file.py:train_fn", "loop",
                                  ProfileTrainingError)
    fn = getattr(module, name, None)
    if not inspect.isgeneratorfunction(fn):
        raise ProfileTrainingError(f"{spec.rpartition(':')[0]} defines no generator function {name!r}: write `def {name}(): ... "
                                   f"for batch in loader: <train step>; yield`")
    return fn


def add_cli(sub) -> None:
    p = sub.add_parser("profile-training", help="measure your own training loop: data wait, forward/backward/"
                                                "optimizer, collectives, host gaps, and what holds it back")
    p.add_argument("loop", help="path/to/file.py:train_fn, a generator function that runs your training loop "
                                "and yields once after each step")
    p.add_argument("--steps", type=int, default=20, help="profiled steps")
    p.add_argument("--warmup", type=int, default=5, help="steps run first without the profiler")
    p.add_argument("--trace", default=None, metavar="STEP.json",
                   help="write the Chrome trace (torch.profiler's events + fxopt's step phases) for "
                        "ui.perfetto.dev or chrome://tracing")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    res = profile_training(load_loop(args.loop), steps=args.steps, warmup=args.warmup)
    if args.trace:
        res.export_chrome_trace(args.trace)
    print(res.to_json() if args.format == "json" else res.summary())
    if args.trace and args.format != "json":
        print(f"wrote {args.trace} (open it in ui.perfetto.dev or chrome://tracing)")
    return 0
