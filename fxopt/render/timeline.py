"""The predicted timeline of one training step, and Chrome-trace (Perfetto) JSON for any timeline.

The cost model records a step's ATen calls in the order they run (forward node by node, the
backward as autograd runs it, then the optimizer), each with its predicted time
(``GraphReport.call_times``), after the time the device waits for the host to launch it
(``GraphReport.host_idle``, eager dispatch, when the report has it). Laid end to end on one
stream they are the step as the device runs it: one slice per run of consecutive calls of one fx
node and phase, on one track per phase, the waits on a track of their own. A report analyzed with
``distributed=`` adds its DDP buckets' all-reduces on a communication track (placed from the
backward's start, as fxopt/study/distributed.py overlaps them) and, before the optimizer, the bucket
copies and the exposed wait for the collectives, so the timeline still ends at the step time.

Chrome trace format: "X" (complete) events in microseconds, one process per timeline and one
thread (track) per phase/stream, named by "M" metadata events; ``ui.perfetto.dev`` and
``chrome://tracing`` open it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import AnalysisError
from ..report import GraphReport

__all__ = ["Slice", "Timeline", "predicted_timeline", "chrome_trace"]

PHASE_TRACK = {"fwd": "forward", "bwd": "backward", "opt": "optimizer", "comm": "communication"}
HOST_WAIT = "device waits for host"
EXPOSED = "exposed communication"


@dataclass(frozen=True)
class Slice:
    """One span on a track: a node's forward (or backward) calls, the optimizer, a collective."""

    name: str
    track: str
    start_s: float
    dur_s: float
    args: dict = field(default_factory=dict)

    @property
    def end_s(self) -> float:
        return self.start_s + self.dur_s


@dataclass
class Timeline:
    title: str
    slices: list[Slice]
    source: str  # "predicted (cost model, <hardware>)" or "measured (torch.profiler, <device>)"

    @property
    def end_s(self) -> float:
        return max((s.end_s for s in self.slices), default=0.0)

    def tracks(self) -> list[str]:
        """Track names in order of first appearance."""
        return list(dict.fromkeys(s.track for s in self.slices))

    def to_chrome_trace(self) -> dict:
        return chrome_trace([self])

    def export_chrome_trace(self, path: str | Path) -> Path:
        return write_chrome_trace([self], path)

    def to_dict(self) -> dict:
        return {"title": self.title, "source": self.source, "slices": [asdict(s) for s in self.slices]}


def predicted_timeline(report: GraphReport, comm: list[Slice] | None = None) -> Timeline:
    """One step as the cost model predicts it: calls end to end, grouped per (node, phase).

    ``comm``: collectives (track "communication") from a distributed what-if, drawn beside the
    compute tracks; they do not move the compute slices (overlap is the what-if's to model).
    """
    if report.is_symbolic:
        raise AnalysisError("a timeline needs concrete sizes: use report.at(batch=N)")
    slices: list[Slice] = []
    t = 0.0
    cur = None  # (node, phase) of the open slice
    acc: dict = {}
    idle = getattr(report, "host_idle", None) or [0.0] * len(report.calls)
    dist = getattr(report, "distributed", None)
    bwd_start, tail_done = None, dist is None
    for call, ct, wait in zip(report.calls, report.call_times, idle):
        wait = float(wait)
        key = (call.node, call.phase)
        if call.phase == "bwd" and bwd_start is None:
            bwd_start = t
        if call.phase == "opt" and not tail_done:  # DDP: the optimizer waits for the last all-reduce
            if cur is not None:
                slices.append(_node_slice(report, cur, acc))
                cur = None
            t = _comm_tail(slices, dist, t)
            tail_done = True
        empty = cur == key and acc["dur"] == 0  # only metadata/view calls so far: nothing to split
        if cur is not None and (key != cur or wait > 0) and not empty:
            slices.append(_node_slice(report, cur, acc))
            cur = None
        if wait > 0:  # the device idles until the host has launched this call (eager dispatch)
            slices.append(Slice("waiting for the host", HOST_WAIT, t, wait, {"phase": "wait", "before": call.node}))
            t += wait
            if cur is not None:
                acc["start"] = t
        if cur is None:
            cur, acc = key, {"start": t, "dur": 0.0, "kernels": 0, "flops": 0, "bytes": 0, "compute": 0.0,
                             "memory": 0.0, "launch": 0.0}
        dur = float(ct.total_s)
        acc["dur"] += dur
        acc["kernels"] += call.kernels
        acc["flops"] += call.flops
        acc["bytes"] += call.bytes_read + call.bytes_written
        for term in ("compute", "memory", "launch"):
            acc[term] += float(getattr(ct, f"{term}_s", 0.0))
        t += dur
    if cur is not None:
        slices.append(_node_slice(report, cur, acc))
    if not tail_done:
        _comm_tail(slices, dist, t)
    if comm is None and dist is not None:
        comm = _buckets(dist, bwd_start or 0.0)
    slices += list(comm or [])
    return Timeline(f"{report.model}: predicted step on {report.hardware.name}", slices,
                    f"predicted (cost model, {report.hardware.name})")


def _comm_tail(slices: list, dist, t: float) -> float:
    """After the backward: DDP's bucket copies on the compute stream, then the wait for the
    collectives the backward did not hide (``report.distributed``, fxopt/study/distributed.py)."""
    for name, track, dur in (("DDP bucket copies", "backward", getattr(dist, "bucket_copy_s", 0.0)),
                             ("waiting for collectives", EXPOSED, getattr(dist, "exposed_comm_s", 0.0))):
        if dur and float(dur) > 0:
            slices.append(Slice(name, track, t, float(dur), {"phase": "comm"}))
            t += float(dur)
    return t


def _buckets(dist, bwd_start: float) -> list[Slice]:
    """DDP buckets' all-reduces on the communication track (their times count from the backward's start)."""
    out = []
    for b in getattr(dist, "buckets", None) or []:
        args = {"phase": "comm", "bucket": b.index, "bytes": b.nbytes, "params": len(b.params),
                "ready_s": b.ready_s}
        out.append(Slice(f"all-reduce bucket {b.index} ({b.nbytes / 2**20:.3g} MiB)", PHASE_TRACK["comm"],
                         bwd_start + b.start_s, b.end_s - b.start_s, args))
    return out


def _node_slice(report: GraphReport, key: tuple, acc: dict) -> Slice:
    node, phase = key
    info = report.nodes.get(node)
    terms = {k: acc[k] for k in ("compute", "memory", "launch")}
    args = {"node": node, "phase": phase, "op": info.op if info else "", "module": info.module if info else "",
            "kernels": acc["kernels"], "flops": acc["flops"], "bytes": acc["bytes"],
            "bound": max(terms, key=terms.get) if any(terms.values()) else "none"}
    if info and info.source:
        args["source"] = info.source
    label = f"{info.module}:{node}" if info and info.module else node
    return Slice(label, PHASE_TRACK.get(phase, phase), acc["start"], acc["dur"], args)


def chrome_trace(timelines: list[Timeline]) -> dict:
    """Chrome trace JSON (a dict) with one process per timeline and one thread per track."""
    events: list[dict] = []
    for pid, tl in enumerate(timelines, 1):
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": tl.title}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        tids = {track: i for i, track in enumerate(tl.tracks(), 1)}
        for track, tid in tids.items():
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": track}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                           "args": {"sort_index": tid}})
        for s in tl.slices:
            events.append({"ph": "X", "name": s.name, "cat": s.track, "pid": pid, "tid": tids[s.track],
                           "ts": s.start_s * 1e6, "dur": s.dur_s * 1e6, "args": _plain(s.args)})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"producer": "fxopt", "timelines": [tl.source for tl in timelines]}}


def write_chrome_trace(timelines: list[Timeline], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(timelines)))
    return path


def _plain(args: dict) -> dict:
    """JSON-safe args (sympy numbers and the like become floats or strings)."""
    out = {}
    for k, v in args.items():
        if isinstance(v, (str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (int, float)):
            out[k] = v
        else:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                out[k] = str(v)
    return out
