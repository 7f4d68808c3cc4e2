"""The predicted memory of one training step over time, checked against the device's memory.

Walks the predicted timeline (fxopt.timeline) slice by slice and keeps, at each point:

- weights, gradients and optimizer state: the parameters' bytes; a parameter's gradient is
  allocated when the backward first reaches a node that reads it (``zero_grad(set_to_none=True)``
  frees them each step); optimizer state is steady (SGD momentum 1x, AdamW 2x the parameters);
- comm buffers: DDP's gradient buckets (one flat copy of the gradients, unless
  ``gradient_as_bucket_view=True``) for a report analyzed with ``distributed=``;
- inputs: the batch;
- activations saved for backward (``GraphReport.saved_bytes``, the distinct storages a
  ``saved_tensors_hooks`` pass recorded per fx node): added at the node's forward, freed when
  its backward has run. A checkpointed block keeps only its inputs through the forward and
  re-creates its saved activations for the span of its own backward;
- transient: the bytes the running forward/backward slice writes (its outputs being produced,
  gradients in flight), a rough working set on top; the optimizer updates in place.

Allocator caching and fragmentation are not modelled: on a GPU, ``max_memory_allocated`` is the
figure this predicts, ``max_memory_reserved`` is higher. Known approximations: a batch tensor
the first layer saves counts under inputs and activations (one batch too many); a checkpointed
block is charged its external inputs even when an earlier node saves them already, and its
output, first saved inside it, counts as freed although the next node keeps it (for blocks
whose input and output have one size, as residual blocks do, the two cancel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..cost_models.trace import OPTIMIZER_NODE
from ..errors import AnalysisError
from ..report import GraphReport
from ..render.timeline import predicted_timeline

__all__ = ["MemoryPoint", "MemoryCurve", "FitOption", "memory_curve", "COMPONENTS"]

COMPONENTS = ("weights", "grads", "optimizer_state", "comm_buffers", "inputs", "activations", "transient")
# optimizer -> state bytes per parameter byte (steady state, fp32 states of fp32 params)
STATE_PER_PARAM = {"sgd": 1.0, "adamw": 2.0, "adam": 2.0, "None": 0.0, "none": 0.0}
GB = 1e9


@dataclass(frozen=True)
class MemoryPoint:
    t_s: float      # end of the slice
    node: str
    phase: str
    bytes: dict     # component -> bytes

    @property
    def total(self) -> float:
        return float(sum(self.bytes.values()))


@dataclass(frozen=True)
class FitOption:
    change: str
    saves_bytes: float
    cost: str        # what it costs, in words (predicted recompute time, a smaller batch, numerics)
    fits: bool       # whether this change alone brings the peak under the device memory


@dataclass
class MemoryCurve:
    model: str
    hardware: str
    capacity_bytes: int              # device memory (0: unknown)
    points: list[MemoryPoint]
    checkpointed: tuple = ()
    options: list[FitOption] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> MemoryPoint:
        return max(self.points, key=lambda p: p.total)

    @property
    def peak_bytes(self) -> float:
        return self.peak.total

    def peak_of(self, component: str) -> float:
        return max(p.bytes[component] for p in self.points)

    @property
    def fits(self) -> bool | None:
        return None if not self.capacity_bytes else self.peak_bytes <= self.capacity_bytes

    @property
    def shortfall_bytes(self) -> float:
        return max(0.0, self.peak_bytes - self.capacity_bytes) if self.capacity_bytes else 0.0

    def verdict(self) -> str:
        peak = self.peak
        where = f"at {peak.node} ({peak.phase}, {peak.t_s * 1e3:.3g} ms into the step)"
        if not self.capacity_bytes:
            return f"predicted peak {peak.total / GB:.3g} GB {where}; device memory unknown"
        if self.fits:
            return (f"fits: predicted peak {peak.total / GB:.3g} GB {where} of {self.capacity_bytes / GB:.3g} GB "
                    f"on {self.hardware} ({(self.capacity_bytes - peak.total) / GB:.3g} GB free)")
        return (f"does not fit, by {self.shortfall_bytes / GB:.3g} GB: predicted peak {peak.total / GB:.3g} GB "
                f"{where}, {self.hardware} has {self.capacity_bytes / GB:.3g} GB")

    def summary(self) -> str:
        peak = self.peak
        ckpt = "checkpointed: " + ", ".join(self.checkpointed) if self.checkpointed else "no checkpointing"
        lines = [f"memory of {self.model} ({ckpt}):",
                 "  " + self.verdict(),
                 "  at the peak: " + ", ".join(f"{k} {v / GB:.3g} GB" for k, v in peak.bytes.items() if v)]
        if self.options:
            lines.append("  ways to fit, cheapest first:")
            lines += [f"    - {o.change}: saves {o.saves_bytes / GB:.3g} GB, costs {o.cost}"
                      f"{'' if o.fits else ' (not enough alone)'}" for o in self.options]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def to_dict(self) -> dict:
        return {"schema": "fxopt.memory/1", "model": self.model, "hardware": self.hardware,
                "capacity_bytes": self.capacity_bytes, "peak_bytes": self.peak_bytes, "fits": self.fits,
                "shortfall_bytes": self.shortfall_bytes, "verdict": self.verdict(),
                "checkpointed": list(self.checkpointed), "notes": self.notes,
                "options": [o.__dict__ for o in self.options],
                "points": [{"t_s": p.t_s, "node": p.node, "phase": p.phase, **p.bytes} for p in self.points]}


def _nbytes(val) -> int:
    if isinstance(val, torch.Tensor):
        return val.untyped_storage().nbytes() if not val.is_meta else val.numel() * val.element_size()
    return 0


def _graph_facts(report: GraphReport):
    """Parameter bytes, the node whose backward first produces each gradient, input bytes and batch.

    Needs the captured graph; a report re-evaluated with ``.at()`` has none and falls back to
    4 bytes per parameter, all gradients at the start of the backward and no input bytes.
    """
    cap = report.captured
    if cap is None:
        return float(report.params * 4), None, 0.0, None
    gm = cap.graph_module
    params = dict(gm.named_parameters(remove_duplicate=False))
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    grads: dict[str, float] = {}   # node -> gradient bytes allocated at its backward
    param_bytes, seen = 0.0, set()
    for n in gm.graph.nodes:
        if n.op != "get_attr" or n.target not in params or not params[n.target].requires_grad:
            continue
        p = params[n.target]
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        param_bytes += nbytes
        users = [u.name for u in n.users]
        if users:  # the last user in forward order runs first in the backward
            first_bwd = max(users, key=lambda u: order[u])
            grads[first_bwd] = grads.get(first_bwd, 0.0) + nbytes
    inputs, batch = 0.0, None
    for n in cap.placeholders():
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            inputs += val.numel() * val.element_size()
            if batch is None and val.dim():
                batch = int(val.shape[0])
    return param_bytes, grads, inputs, batch


def _block_inputs(report: GraphReport, block: str, depth: int) -> float:
    """Bytes of the tensors a block reads from outside itself (what checkpointing keeps)."""
    cap = report.captured
    if cap is None:
        return 0.0
    inside = {n for n, info in report.nodes.items() if info.block(depth) == block}
    seen, total = set(), 0.0
    for n in cap.graph.nodes:
        if n.name not in inside:
            continue
        for a in n.all_input_nodes:
            if a.name not in inside and a.op != "get_attr" and a.name not in seen:
                seen.add(a.name)
                total += _nbytes(a.meta.get("val"))
    return total


def memory_curve(report: GraphReport, *, checkpoint=(), depth: int = 1, optimizer_state_bytes: float | None = None,
                 capacity_bytes: int | None = None, suggest: bool = True) -> MemoryCurve:
    """The predicted memory over one step of ``report`` (a concrete training GraphReport).

    ``checkpoint``: module paths (blocks at ``depth``) run under activation checkpointing.
    ``optimizer_state_bytes`` overrides the state size (e.g. bf16 states: half).
    ``capacity_bytes``: device memory (default: the report's ``hardware.memory_bytes``).
    """
    if report.is_symbolic:
        raise AnalysisError("a memory curve needs concrete sizes: use report.at(batch=N)")
    if not report.training:
        raise AnalysisError("memory_curve() predicts a training step; this report is forward only")
    blocks = {r["block"] for r in report.rows("block", depth)}
    unknown = set(checkpoint) - blocks
    if unknown:
        raise AnalysisError(f"checkpoint={sorted(unknown)}: no such block at depth {depth}; blocks: {sorted(blocks)}")
    param_bytes, grad_at, input_bytes, _ = _graph_facts(report)  # grad_at: consumed as gradients appear
    opt = report.nodes[OPTIMIZER_NODE].op if OPTIMIZER_NODE in report.nodes else "None"
    state = param_bytes * STATE_PER_PARAM.get(opt, 1.0) if optimizer_state_bytes is None else optimizer_state_bytes
    if any(getattr(v, "free_symbols", None) for v in report.saved_bytes.values()):
        raise AnalysisError("saved-activation sizes are formulas (an input that is a view of a larger tensor "
                            "gets a symbolic storage): pass contiguous inputs, e.g. x[:n].clone()")
    saved = {k: float(v) for k, v in report.saved_bytes.items()}
    ckpt = {b: _block_inputs(report, b, depth) for b in checkpoint}
    node_block = {n: info.block(depth) for n, info in report.nodes.items()}
    block_saved = {b: sum(v for n, v in saved.items() if node_block.get(n) == b) for b in ckpt}
    tl = predicted_timeline(report)
    steps = [s for s in tl.slices if s.args.get("phase") in ("fwd", "bwd", "opt")]
    # a node's (a checkpointed block's) saved activations go after its last backward slice
    last_node = {s.args["node"]: i for i, s in enumerate(steps) if s.args["phase"] == "bwd"}
    last_block = {node_block.get(s.args["node"]): i for i, s in enumerate(steps) if s.args["phase"] == "bwd"}
    written = _written(report)
    comp = dict.fromkeys(COMPONENTS, 0.0)
    comp.update(weights=param_bytes, optimizer_state=state, inputs=input_bytes, comm_buffers=_ddp_buffers(report))
    points, live_ckpt, in_ckpt_fwd, added = [], {}, set(), set()
    grad_of = dict(grad_at or {})  # node -> parameter-gradient bytes its backward produces
    for i, s in enumerate(steps):
        node, phase = s.args["node"], s.args["phase"]
        block = node_block.get(node)
        if phase == "fwd":
            if block in ckpt:
                if block not in in_ckpt_fwd:  # the block's inputs are kept for the recompute
                    in_ckpt_fwd.add(block)
                    comp["activations"] += ckpt[block]
            elif node not in added:  # a node's calls may span several slices (host waits between them)
                added.add(node)
                comp["activations"] += saved.get(node, 0.0)
        if phase == "bwd":
            if grad_at is None:
                comp["grads"] = param_bytes
            else:
                comp["grads"] += grad_at.pop(node, 0.0)
            if block in ckpt and block not in live_ckpt:  # recompute: the block's saved set comes back
                live_ckpt[block] = block_saved[block]
                comp["activations"] += block_saved[block]
        elif phase == "opt" and grad_at is not None:
            comp["grads"] = param_bytes  # every gradient exists by the optimizer step
        # what the slice writes, less the parameter gradients it produces (.grad takes them, no copy);
        # the optimizer step updates in place
        made = grad_of.get(node, 0.0) if phase == "bwd" else 0.0
        comp["transient"] = max(0.0, written.get((node, phase), 0.0) - made) if phase != "opt" else 0.0
        points.append(MemoryPoint(s.end_s, node, phase, dict(comp)))
        if phase == "bwd":  # after the slice ran: free what the backward no longer needs
            if block in ckpt:
                if last_block.get(block) == i:
                    comp["activations"] -= live_ckpt.pop(block) + ckpt[block]
            elif last_node.get(node) == i:
                comp["activations"] -= saved.get(node, 0.0)
    cap = report.hardware.memory_bytes if capacity_bytes is None else capacity_bytes
    curve = MemoryCurve(report.model, report.hardware.name, int(cap or 0), points, tuple(checkpoint))
    dist = getattr(report, "distributed", None)
    if dist is not None and getattr(dist.spec, "strategy", "ddp") != "ddp":
        curve.notes.append(f"{dist.spec.strategy}: sharded weights, gradients and states are not modelled here; "
                           f"the curve is one unsharded replica")
    if not cap:
        curve.notes.append(f"{report.hardware.name} states no memory size (memory_bytes): the fit is not checked")
    if suggest and curve.fits is False:
        curve.options = ways_to_fit(report, curve, depth=depth, state=state, param_bytes=param_bytes)
    return curve


def _ddp_buffers(report: GraphReport) -> float:
    """DDP's flat gradient buckets, which live as long as the model (none with bucket views)."""
    dist = getattr(report, "distributed", None)
    if dist is None or getattr(dist.spec, "strategy", "") != "ddp" or dist.spec.gradient_as_bucket_view:
        return 0.0
    return float(sum(b.nbytes for b in getattr(dist, "buckets", None) or []))


def _written(report: GraphReport) -> dict:
    out: dict = {}
    for c in report.calls:
        key = (c.node, c.phase)
        out[key] = out.get(key, 0.0) + float(c.bytes_written)
    return out


def ways_to_fit(report: GraphReport, curve: MemoryCurve, *, depth: int, state: float,
                param_bytes: float) -> list[FitOption]:
    """Cheapest first: bf16 optimizer states (no time), checkpoint blocks (recompute), a smaller batch."""
    need, cap = curve.shortfall_bytes, curve.capacity_bytes
    options = []
    if state > 0:
        saves = state / 2
        options.append(FitOption("keep optimizer states in bf16", saves, "no step time; numerics (use "
                                 "stochastic rounding or an fp32 master copy if training diverges)", saves >= need))
    plan = _checkpoint_plan(report, curve)
    if plan is not None:
        blocks, after, recompute = plan
        step = float(report.totals["step_time_s"])
        options.append(FitOption(f"activation checkpointing of {_names(blocks)}", curve.peak_bytes - after.peak_bytes,
                                 f"{recompute * 1e3:.3g} ms recompute per step (+{recompute / step * 100:.2g} %)",
                                 bool(after.fits)))
    _, _, _, batch = _graph_facts(report)
    peak = curve.peak.bytes
    fixed = peak["weights"] + peak["grads"] + peak["optimizer_state"]
    per_batch = curve.peak_bytes - fixed  # inputs, activations and the working set scale with the batch
    if batch and per_batch > 0 and cap > fixed:
        new = math.floor(batch * (cap - fixed) / per_batch)
        if 0 < new < batch:
            options.append(FitOption(f"batch {batch} -> {new} (activations scale with the batch)",
                                     per_batch * (1 - new / batch), f"{new / batch:.0%} of the samples per step; "
                                     "re-tune the learning rate or accumulate gradients", True))
        elif new <= 0:
            options.append(FitOption(f"shard weights, gradients and optimizer states (FSDP / ZeRO): even a batch of "
                                     f"1 does not fit, they alone need {fixed / GB:.3g} GB", 0.0,
                                     "more devices (or a device with more memory)", False))
    return options


def _names(blocks: list[str], n: int = 6) -> str:
    return ", ".join(blocks[:n]) + (f" and {len(blocks) - n} more" if len(blocks) > n else "")


def _checkpoint_plan(report: GraphReport, curve: MemoryCurve, depths=(1, 2, 3)):
    """Blocks to checkpoint, greedily by activation bytes freed per second of recompute, at the
    module depth whose plan fits with the least recompute (else the one with the lowest peak).
    Each candidate plan is checked on the curve itself: checkpointing a block that holds most of
    the model only moves the peak into its backward."""
    best = None  # (fits, -recompute or -peak, blocks, curve, recompute)
    for depth in depths:
        rows = [r for r in report.rows("block", depth) if r["block"] != "(root)"]
        gain = []
        for r in rows:
            saves = float(r["saved_bytes"]) - _block_inputs(report, r["block"], depth)
            if saves > 0:
                gain.append((saves / max(float(r["fwd_time_s"]), 1e-12), r["block"], float(r["fwd_time_s"])))
        chosen, recompute, after = [], 0.0, None
        for _, block, t in sorted(gain, reverse=True):
            chosen.append(block)
            recompute += t
            after = memory_curve(report, checkpoint=chosen, depth=depth, capacity_bytes=curve.capacity_bytes,
                                 suggest=False)
            if after.fits:
                break
        if after is None or after.peak_bytes >= curve.peak_bytes:
            continue
        key = (bool(after.fits), -recompute if after.fits else -after.peak_bytes)
        if best is None or key > best[0]:
            best = (key, list(chosen), after, recompute)
    return None if best is None else best[1:]
