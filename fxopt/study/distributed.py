"""Many GPUs: what data-parallel communication adds to a costed training step.

``apply(report, spec)`` takes the one-GPU step of :func:`fxopt.analyze` (the per-GPU batch is the
batch of its inputs) and the :class:`Distributed` spec, and returns a :class:`DistributedCost`:

- **DDP** (``torch.nn.parallel.DistributedDataParallel``): gradients go into buckets as DDP's
  reducer forms them after its first iteration (in the order gradients become ready, per dtype,
  a first bucket of 1 MiB then ``bucket_mb``); each bucket's all-reduce starts when its last
  gradient is ready in the backward timeline (the report's per-call backward times, in order)
  and after the previous bucket's (one NCCL stream); what runs past the backward's end is exposed.
- **FSDP** (``fully_shard``, ``strategy="fsdp"`` = FULL_SHARD / ZeRO-3, ``"shard_grad_op"`` =
  ZeRO-2): one unit per module at ``fsdp_depth`` (as ``fully_shard`` is applied per block); each
  unit all-gathers its parameters before its forward and (FULL_SHARD) again before its backward,
  the next unit's all-gather prefetched while the current one computes, and reduce-scatters its
  gradients when they are ready. Compute waits for late all-gathers: those waits are exposed.
  ``"hsdp"`` (``fully_shard`` on a 2-D mesh): FULL_SHARD within each node, replicas across nodes;
  each unit's gradient shard is then all-reduced across nodes (each GPU over its own NIC).

Collectives are costed by :mod:`fxopt.cost_models.comm` on a cluster preset. Only exposed
communication adds to ``step_time_s``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from tabulate import tabulate
from torch import fx

from ..cost_models.comm import Cluster, CommTime, cluster_presets, collective_time, inter_node_time, load_cluster
from ..cost_models.names import OPTIMIZER_NODE, dtype_name
from ..errors import AnalysisError, HardwareError, InputError
from ..cost_models.hardware import DEFAULT_PRESET

log = logging.getLogger(__name__)

__all__ = ["Distributed", "DistributedCost", "apply", "ddp_buckets", "gpu_scaling", "GPUScaling",
           "calibrate_comm", "check_comm_bound"]

STRATEGIES = ("ddp", "fsdp", "shard_grad_op", "hsdp")
REGATHER = ("fsdp", "hsdp")   # FULL_SHARD within the shard group: parameters gathered again for the backward
MIB = 1024 * 1024                       # torch's bucket_cap_mb is in MiB
DDP_FIRST_BUCKET_MB = 1.0               # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_DEFAULT_BUCKET_MB = 25.0            # DistributedDataParallel(bucket_cap_mb=None)
DEFAULT_CLUSTER = {"h100": "h100-ib", "h200": "h200-ib", "a100": "a100-ib"}
# optimizer state per parameter byte (SGD momentum: 1 buffer; AdamW: 2), for FSDP's memory saving
OPTIMIZER_STATE = {"sgd": 1, "adamw": 2, "None": 0}
DTYPE_SIZES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}


@dataclass(frozen=True)
class Distributed:
    """How the step is run on many GPUs. ``grad_dtype``: the dtype gradients are communicated in
    (None: the parameters' own; "bf16": e.g. DDP's bf16 compression hook)."""

    world_size: int
    strategy: str = "ddp"
    gpus_per_node: int | None = None   # default: the cluster's
    cluster: str | None = None         # default: the hardware preset's cluster (h100 -> h100-ib)
    bucket_mb: float = DDP_DEFAULT_BUCKET_MB
    first_bucket_mb: float | None = None   # None: torch's rule (1 MiB with the default bucket_mb, else bucket_mb)
    grad_dtype: str | None = None
    fsdp_depth: int | None = None      # module-path depth of FSDP units (None: the shallowest with 4+ units)
    prefetch: bool = True
    algorithm: str = "auto"            # inter-node all-reduce: auto, ring or tree
    gradient_as_bucket_view: bool = False   # DDP's flag: True skips the copies back from the buckets
    batched_grad_copy: bool = False         # DDP's flag (recent torch): copies into a bucket as one kernel

    def __post_init__(self):
        checks = [
            (isinstance(self.world_size, int) and self.world_size >= 1, "world_size must be an int >= 1"),
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}"),
            (self.gpus_per_node is None or (isinstance(self.gpus_per_node, int) and self.gpus_per_node >= 1),
             "gpus_per_node must be an int >= 1 (or None: the cluster's)"),
            (self.bucket_mb > 0 and (self.first_bucket_mb is None or self.first_bucket_mb > 0),
             "bucket_mb and first_bucket_mb must be > 0"),
            (self.grad_dtype is None or self.grad_dtype in DTYPE_SIZES,
             f"grad_dtype must be None or one of {sorted(DTYPE_SIZES)}"),
            (self.fsdp_depth is None or (isinstance(self.fsdp_depth, int) and self.fsdp_depth >= 1),
             "fsdp_depth must be None or an int >= 1"),
            (self.algorithm in ("auto", "ring", "tree"), "algorithm must be auto, ring or tree"),
        ]
        bad = [why for ok, why in checks if not ok]
        if bad:
            raise InputError(f"Distributed({self.world_size=}, {self.strategy=}, ...): " + "; ".join(bad))

    @classmethod
    def parse(cls, spec) -> "Distributed | None":
        """None, a Distributed, a dict of its fields, or a world size."""
        if spec is None or isinstance(spec, Distributed):
            return spec
        if isinstance(spec, int) and not isinstance(spec, bool):
            return cls(world_size=spec)
        if isinstance(spec, dict):
            unknown = set(spec) - {f.name for f in fields(cls)}
            if unknown or "world_size" not in spec:
                raise InputError(f"distributed={spec!r}: needs world_size; unknown keys {sorted(unknown)}; "
                                 f"known: {[f.name for f in fields(cls)]}")
            return cls(**spec)
        raise InputError(f"distributed= takes a dict (e.g. {{'world_size': 64, 'strategy': 'ddp'}}), an int or "
                         f"fxopt.Distributed(...); got {type(spec).__name__}")

    def check(self, hardware_name: str, training: bool = True, dynamic_batch: bool = False) -> Cluster:
        """Everything ``analyze(..., distributed=self)`` needs, checked before any capture."""
        if not training:
            raise InputError("distributed= costs gradient communication: it needs training=True")
        if dynamic_batch:
            raise InputError("distributed= needs concrete sizes (the timeline of one step): drop dynamic_batch, "
                             "or cost report.at(batch=N) with fxopt.distributed.apply")
        return self.resolve(hardware_name)

    def resolve(self, hardware_name: str) -> Cluster:
        """The cluster this spec runs on, checked against the world size (call before analyzing)."""
        name = self.cluster or DEFAULT_CLUSTER.get(hardware_name)
        if name is None:
            raise HardwareError(f"no default cluster for hardware {hardware_name!r}: pass cluster= one of "
                                f"{cluster_presets()} or a cluster JSON path")
        c = load_cluster(name)
        if self.gpus_per_node is not None and self.gpus_per_node != c.gpus_per_node:
            c = replace(c, gpus_per_node=self.gpus_per_node)
        if self.world_size > c.gpus_per_node and self.world_size % c.gpus_per_node:
            raise InputError(f"world_size {self.world_size} spans nodes of {c.gpus_per_node} GPUs but is not a "
                             f"multiple of it; use whole nodes or set gpus_per_node")
        return c


# ---------------------------------------------------------------------------------------------
# Parameters and when their gradients are ready
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str           # FQN (the first name of a tied parameter)
    index: int          # registration order (model.parameters())
    numel: int
    dtype: str          # "float32", ...
    nodes: tuple        # fx nodes that read it (through get_attr)
    ready_s: float      # its gradient is complete, seconds after the backward starts
    fwd_use_s: float    # first forward use, seconds after the step starts
    bwd_use_s: float    # first backward call of a node that reads it
    slot: int = 0       # its place among the gradients one backward node yields together

    def nbytes(self, dtype: str | None = None) -> int:
        return self.numel * (DTYPE_SIZES[dtype] if dtype else getattr(torch, self.dtype).itemsize)


def _graph_module(report) -> fx.GraphModule:
    cap = report.captured
    gm = getattr(cap, "graph_module", cap)
    if not isinstance(gm, fx.GraphModule):
        raise AnalysisError("distributed costs need the captured graph (parameters and their users); this report "
                            "has none (a .at() re-evaluation?): analyze with concrete sizes and distributed=")
    return gm


def _call_seconds(report) -> list[float]:
    """Each call's place on the GPU timeline: its kernel time plus the GPU's wait for the host
    before it (``report.host_idle``, when the cost model has it)."""
    idle = getattr(report, "host_idle", None) or [0.0] * len(report.calls)
    return [float(t.total_s) + float(i) for t, i in zip(report.call_times, idle)]


def _timelines(report):
    """Per node: (first fwd start, first bwd start, last bwd end); forward and backward totals."""
    fwd, bwd, t_f, t_b = {}, {}, 0.0, 0.0
    for c, dt in zip(report.calls, _call_seconds(report)):
        if c.phase == "fwd":
            fwd.setdefault(c.node, t_f)
            t_f += dt
        elif c.phase == "bwd":
            start, _ = bwd.get(c.node, (t_b, 0.0))
            t_b += dt
            bwd[c.node] = (start, t_b)
    return fwd, bwd, t_f, t_b


def _grad_nodes(node: fx.Node, bwd: dict, seen=None) -> list[str]:
    """The nodes whose backward produces ``node``'s gradient: its users that have backward calls,
    looking through users without any (a free view of a weight)."""
    seen = set() if seen is None else seen
    out = []
    for u in node.users:
        if u.name in seen:
            continue
        seen.add(u.name)
        out += [u.name] if u.name in bwd else _grad_nodes(u, bwd, seen)
    return out


# Eager autograd hands the gradients one backward node yields together to DDP in the order of
# that node's inputs. Where eager runs an exported node as other ops, the order differs: F.linear
# is addmm(bias, input, weight.t()), so its bias comes first and its weight last (after t()).
GRAD_ORDER = {torch.ops.aten.linear.default: {2: 0, 0: 1, 1: 2}}


def _slot(node: fx.Node, attrs: list[fx.Node]) -> int:
    """Where a parameter (read by ``attrs``) sits among ``node``'s gradient outputs."""
    pos = next((i for i, a in enumerate(node.args) if a in attrs), 0)
    return GRAD_ORDER.get(node.target, {}).get(pos, pos)


def parameters(report) -> list[Param]:
    """The trainable parameters of the report's graph with their gradient-ready times."""
    gm = _graph_module(report)
    fwd, bwd, _, t_b = _timelines(report)
    by_id: dict[int, tuple[int, str, torch.nn.Parameter]] = {}
    for i, (name, p) in enumerate(gm.named_parameters()):
        if p.requires_grad:
            by_id[id(p)] = (i, name, p)
    attrs: dict[int, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj = gm
            for part in n.target.split("."):
                obj = getattr(obj, part, None)
            if id(obj) in by_id:
                attrs.setdefault(id(obj), []).append(n)
    fx_nodes, out = {n.name: n for n in gm.graph.nodes}, []
    for pid, (i, name, p) in by_id.items():
        nodes = [u for a in attrs.get(pid, []) for u in _grad_nodes(a, bwd)]
        if not nodes:
            log.info("parameter %s gets no gradient in this step: not communicated", name)
            continue
        users = [u for a in attrs.get(pid, []) for u in a.users]
        last = max(nodes, key=lambda n: bwd[n][1])
        out.append(Param(name, i, p.numel(), dtype_name(p.dtype), tuple(nodes),
                         ready_s=bwd[last][1], fwd_use_s=min((fwd[u.name] for u in users if u.name in fwd), default=0.0),
                         bwd_use_s=min(bwd[n][0] for n in nodes), slot=_slot(fx_nodes[last], attrs[pid])))
    return out


# ---------------------------------------------------------------------------------------------
# DDP
# ---------------------------------------------------------------------------------------------

def ddp_buckets(params: list[Param], bucket_bytes: int, first_bucket_bytes: int,
                grad_dtype: str | None = None) -> list[list[Param]]:
    """Buckets as DDP's reducer rebuilds them after the first iteration: parameters in the order
    their gradients become ready (ties, one backward node's outputs: in the order eager autograd
    yields them, see GRAD_ORDER; then registration order), one running bucket per dtype
    that closes when it reaches its limit (the first limit ``first_bucket_bytes``, then
    ``bucket_bytes``), leftovers last (torch's ``compute_bucket_assignment_by_size``)."""
    order = sorted(params, key=lambda p: (p.ready_s, p.slot, p.index))
    open_: dict[str, list] = {}
    limits: dict[str, int] = {}
    done = []
    for p in order:
        key = grad_dtype or p.dtype
        bucket = open_.setdefault(key, [])
        bucket.append(p)
        limit = limits.setdefault(key, first_bucket_bytes)
        if sum(q.nbytes(grad_dtype) for q in bucket) >= limit:
            done.append(bucket)
            open_[key] = []
            limits[key] = bucket_bytes
    return done + [b for b in open_.values() if b]


@dataclass(frozen=True)
class Bucket:
    index: int
    params: tuple[str, ...]
    nbytes: int
    ready_s: float     # its last gradient is ready (s after the backward starts)
    start_s: float
    end_s: float
    comm: CommTime


def overlap(ready_and_times: list[tuple[float, float]], backward_s: float) -> tuple[list[tuple[float, float]], float]:
    """One communication stream: item i starts when it is ready and item i-1 is done. Returns the
    (start, end) of each and the time past ``backward_s`` (exposed)."""
    out, free = [], 0.0
    for ready, dt in ready_and_times:
        start = max(ready, free)
        free = start + dt
        out.append((start, free))
    return out, max(0.0, free - backward_s)


def _bucket_copies(report, params: list[Param], buckets: list, spec: Distributed) -> float:
    """DDP's own kernels on the compute stream (torch's reducer), costed like any kernel the cost
    model sees. Into the bucket: one kernel per gradient that copies and divides by the world size
    (``mul_out``), or with ``batched_grad_copy`` one ``_foreach_copy_`` plus one ``div_`` per
    bucket; with ``zero_grad(set_to_none=True)`` this copy stays even with
    ``gradient_as_bucket_view`` (torch's docs). Back to ``.grad`` after the all-reduce: one copy per
    gradient, unless the gradients are bucket views."""
    from ..cost_models.roofline import call_time
    hw, prec = report.hardware, report.precision
    kernel = lambda cls, dtype, numel, nbytes: float(call_time(cls, dtype, numel, 2 * nbytes, 1, hw, prec).total_s)
    by_name = {p.name: p for p in params}
    if spec.batched_grad_copy:
        groups = [[by_name[n] for n in b.params] for b in buckets]
        t = sum(kernel("memory", g[0].dtype, 0, sum(p.nbytes() for p in g)) +
                kernel("pointwise", g[0].dtype, sum(p.numel for p in g), sum(p.nbytes() for p in g)) for g in groups)
    else:
        t = sum(kernel("pointwise", p.dtype, p.numel, p.nbytes()) for p in params)
    if not spec.gradient_as_bucket_view:
        t += sum(kernel("memory", p.dtype, 0, p.nbytes()) for p in params)
    return t


def _ddp(params, spec: Distributed, cluster: Cluster, backward_s: float):
    first = spec.first_bucket_mb or (DDP_FIRST_BUCKET_MB if spec.bucket_mb == DDP_DEFAULT_BUCKET_MB else spec.bucket_mb)
    groups = ddp_buckets(params, int(spec.bucket_mb * MIB), int(first * MIB), spec.grad_dtype)
    comms = [collective_time("all_reduce", sum(p.nbytes(spec.grad_dtype) for p in g), spec.world_size, cluster,
                             spec.algorithm) for g in groups]
    ready = [max(p.ready_s for p in g) for g in groups]
    spans, exposed = overlap(list(zip(ready, (c.time_s for c in comms))), backward_s)
    buckets = [Bucket(i, tuple(p.name for p in g), int(c.nbytes), r, s, e, c)
               for i, (g, c, r, (s, e)) in enumerate(zip(groups, comms, ready, spans))]
    return buckets, exposed


# ---------------------------------------------------------------------------------------------
# FSDP
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    name: str                 # module path (``(root)`` for parameters above fsdp_depth)
    params: tuple[str, ...]
    param_bytes: int          # all-gathered (parameter dtype)
    grad_bytes: int           # reduce-scattered (grad_dtype)
    fwd_need_s: float
    bwd_need_s: float
    ready_s: float
    all_gather: CommTime
    reduce_scatter: CommTime
    replica_all_reduce: CommTime | None = None   # HSDP: the gradient shard across nodes


MAX_UNIT_SHARE = 0.25   # automatic FSDP units: none holds more than this share of the parameters


def fsdp_units(params: list[Param], depth: int | None) -> dict[str, list[Param]]:
    """Parameters grouped per module at ``depth`` (``layer1.0.conv1.weight`` -> ``layer1`` at 1);
    ``None``: the shallowest depth at which no unit holds more than MAX_UNIT_SHARE of the
    parameters (ViT: per block ``blocks.N``, not one ``blocks`` unit), as users apply
    ``fully_shard`` per block."""
    if depth is None:
        deepest, total = max((p.name.count(".") for p in params), default=1), sum(p.numel for p in params)
        fits = lambda d: max(sum(p.numel for p in u) for u in fsdp_units(params, d).values()) <= MAX_UNIT_SHARE * total
        depth = next((d for d in range(1, deepest + 1) if fits(d)), deepest)
    units: dict[str, list[Param]] = {}
    for p in params:
        parts = p.name.split(".")[:-1]
        units.setdefault(".".join(parts[:depth]) or "(root)", []).append(p)
    return units


def _stall_run(order: list[tuple[float, float]], prefetch: bool, comm_free: float = 0.0):
    """Compute reaches unit k at ``need_k`` (no waiting); unit k's all-gather takes ``t_k`` on one
    stream, issued when unit k-1 starts (prefetch) or when unit k is reached. Returns the stall
    before each unit and the stream's end."""
    stall, prev_start, stalls = 0.0, 0.0, []
    for k, (need, t) in enumerate(order):
        need += stall
        issue = (prev_start if prefetch else need) if k else 0.0
        start = max(issue, comm_free)
        comm_free = start + t
        wait = max(0.0, comm_free - need)
        stall += wait
        stalls.append(stall)
        prev_start = need + wait
    return stalls, comm_free


def shard_group(spec: Distributed, cluster: Cluster) -> int:
    """GPUs one parameter is sharded over: all (FSDP), or one node's (HSDP)."""
    return min(spec.world_size, cluster.gpus_per_node) if spec.strategy == "hsdp" else spec.world_size


def _fsdp(params, spec: Distributed, cluster: Cluster, forward_s: float, backward_s: float):
    shard = shard_group(spec, cluster)
    replicas = spec.world_size // shard
    units = []
    for name, ps in fsdp_units(params, spec.fsdp_depth).items():
        pb, gb = sum(p.nbytes() for p in ps), sum(p.nbytes(spec.grad_dtype) for p in ps)
        units.append(Unit(name, tuple(p.name for p in ps), pb, gb, min(p.fwd_use_s for p in ps),
                          min(p.bwd_use_s for p in ps), max(p.ready_s for p in ps),
                          collective_time("all_gather", pb, shard, cluster, spec.algorithm),
                          collective_time("reduce_scatter", gb, shard, cluster, spec.algorithm),
                          inter_node_time("all_reduce", gb / shard, replicas, cluster, spec.algorithm)
                          if spec.strategy == "hsdp" else None))
    fwd = sorted(units, key=lambda u: u.fwd_need_s)
    fwd_stalls, _ = _stall_run([(u.fwd_need_s, u.all_gather.time_s) for u in fwd], spec.prefetch)
    bwd = sorted(units, key=lambda u: u.bwd_need_s)
    if spec.strategy in REGATHER:
        bwd_stalls, free = _stall_run([(u.bwd_need_s, u.all_gather.time_s) for u in bwd], spec.prefetch)
    else:                         # SHARD_GRAD_OP keeps them from the forward
        bwd_stalls, free = [0.0] * len(bwd), 0.0
    stall_at = dict(zip((u.name for u in bwd), bwd_stalls))
    # reduce-scatters follow on the same stream once their gradients are ready (shifted by the stalls)
    rs = sorted((u.ready_s + stall_at[u.name], _reduce_s(u)) for u in units)
    bwd_stall = bwd_stalls[-1] if bwd_stalls else 0.0
    _, tail = overlap(rs, backward_s + bwd_stall) if rs else ([], 0.0)
    tail = max(tail, free - backward_s - bwd_stall, 0.0)
    exposed = (fwd_stalls[-1] if fwd_stalls else 0.0) + bwd_stall + tail
    return units, exposed


def _reduce_s(u: Unit) -> float:
    return u.reduce_scatter.time_s + (u.replica_all_reduce.time_s if u.replica_all_reduce else 0.0)


def _state_bytes(report, params) -> tuple[int, int]:
    """Per-GPU (parameter, optimizer state) bytes of an unsharded replica (gradients: as parameters)."""
    pb = sum(p.nbytes() for p in params)
    opt = report.nodes.get(OPTIMIZER_NODE)
    return pb, OPTIMIZER_STATE.get(opt.op if opt else "None", 0) * pb


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------

@dataclass
class DistributedCost:
    """What ``spec`` adds to the one-GPU step of a report. Times in seconds, per GPU."""

    spec: Distributed
    cluster: Cluster
    compute_s: float          # the one-GPU step (forward, backward, optimizer)
    forward_s: float
    backward_s: float
    comm_bytes: int           # bytes of the collectives each GPU takes part in, per step
    comm_time_s: float        # their summed time (overlapped or not)
    exposed_comm_s: float     # what the compute could not hide
    per_gpu_batch: int | None = None
    buckets: list[Bucket] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)
    state_bytes: int = 0      # params + grads + optimizer state of one unsharded replica
    memory_saved_bytes: int = 0
    bucket_copy_s: float = 0.0  # DDP's kernels around the all-reduces on the compute stream

    @property
    def step_time_s(self) -> float:
        return self.compute_s + self.exposed_comm_s + self.bucket_copy_s

    @property
    def exposed_share(self) -> float:
        return self.exposed_comm_s / self.step_time_s if self.step_time_s else 0.0

    @property
    def throughput(self) -> float | None:
        """Samples per second over all GPUs (needs the per-GPU batch)."""
        return self.spec.world_size * self.per_gpu_batch / self.step_time_s if self.per_gpu_batch else None

    def adjust(self, totals: dict) -> dict:
        """A report's totals with communication: comm fields added, the exposed part in step_time_s."""
        step = totals["step_time_s"] + self.exposed_comm_s + self.bucket_copy_s
        mfu = totals["mfu"] * totals["step_time_s"] / step if step else totals["mfu"]
        return {**totals, "step_time_s": step, "mfu": mfu, "comm_bytes": self.comm_bytes,
                "comm_time_s": self.comm_time_s, "exposed_comm_s": self.exposed_comm_s,
                "ddp_bucket_copy_s": self.bucket_copy_s, "world_size": self.spec.world_size}

    def summary(self) -> str:
        s = self.spec
        what = (f"{len(self.buckets)} gradient buckets (all-reduce)" if s.strategy == "ddp" else
                f"{len(self.units)} units (all-gather{' x2' if s.strategy in REGATHER else ''} + reduce-scatter"
                f"{' + all-reduce across nodes' if s.strategy == 'hsdp' else ''})")
        lines = [f"  distributed        {s.strategy} on {s.world_size} GPUs ({self.cluster.name}, "
                 f"{self.cluster.gpus_per_node}/node): {what}",
                 f"  communication      {self.comm_bytes / 1e6:,.1f} MB, {self.comm_time_s * 1e3:.3g} ms, exposed "
                 f"{self.exposed_comm_s * 1e3:.3g} ms ({self.exposed_share * 100:.1f} % of the step)"
                 + (f"; DDP bucket copies {self.bucket_copy_s * 1e3:.3g} ms" if self.bucket_copy_s else "")]
        if self.memory_saved_bytes:
            lines.append(f"  sharding saves     {self.memory_saved_bytes / 1e9:.3g} GB per GPU of "
                         f"{self.state_bytes / 1e9:.3g} GB params+grads+optimizer state")
        return "\n".join(lines)

    def table(self, tablefmt: str = "simple") -> str:
        if self.buckets:
            rows = [[b.index, len(b.params), f"{b.nbytes / MIB:.2f}", f"{b.ready_s * 1e3:.3f}",
                     f"{b.start_s * 1e3:.3f}", f"{b.end_s * 1e3:.3f}", b.comm.algorithm] for b in self.buckets]
            return tabulate(rows, ["bucket", "params", "MiB", "ready ms", "start ms", "end ms", "algorithm"],
                            tablefmt=tablefmt, disable_numparse=True) + \
                f"\n(backward ends at {self.backward_s * 1e3:.3f} ms)"
        rows = [[u.name, len(u.params), f"{u.param_bytes / MIB:.2f}", f"{u.all_gather.time_s * 1e6:.0f}",
                 f"{u.reduce_scatter.time_s * 1e6:.0f}"] for u in self.units]
        return tabulate(rows, ["unit", "params", "MiB", "all-gather us", "reduce-scatter us"], tablefmt=tablefmt,
                        disable_numparse=True)

    def to_dict(self) -> dict:
        return {"spec": asdict(self.spec), "cluster": self.cluster.name, "compute_s": self.compute_s,
                "comm_bytes": self.comm_bytes, "comm_time_s": self.comm_time_s,
                "exposed_comm_s": self.exposed_comm_s, "step_time_s": self.step_time_s,
                "memory_saved_bytes": self.memory_saved_bytes,
                "buckets": [{"params": list(b.params), "nbytes": b.nbytes, "ready_s": b.ready_s, "start_s": b.start_s,
                             "end_s": b.end_s, "algorithm": b.comm.algorithm} for b in self.buckets],
                "units": [{"name": u.name, "param_bytes": u.param_bytes, "grad_bytes": u.grad_bytes,
                           "all_gather_s": u.all_gather.time_s, "reduce_scatter_s": u.reduce_scatter.time_s}
                          for u in self.units]}


def _batch(report) -> int | None:
    cap = report.captured
    for n in getattr(getattr(cap, "graph", None), "nodes", ()):
        v = n.meta.get("val")
        if n.op == "placeholder" and isinstance(v, torch.Tensor) and v.dim() and isinstance(v.shape[0], int):
            return v.shape[0]
    return None


def apply(report, spec, *, params: list[Param] | None = None, compute_scale: float = 1.0) -> DistributedCost:
    """The communication of ``spec`` on ``report``'s step (``compute_scale``: what-if factor on
    every call's time, e.g. 2 for a twice larger per-GPU batch)."""
    spec = Distributed.parse(spec)
    if report.is_symbolic:
        raise InputError("distributed costs need concrete sizes: use report.at(batch=N) of a concrete capture, "
                         "or analyze without dynamic_batch")
    if not report.training:
        raise InputError("distributed costs are for training steps (gradients); analyze with training=True")
    cluster = spec.resolve(report.hardware.name)
    params = parameters(report) if params is None else params
    fwd, bwd, forward_s, backward_s = _timelines(report)
    compute_s = sum(_call_seconds(report))
    if compute_scale != 1.0:
        params = [replace(p, ready_s=p.ready_s * compute_scale, fwd_use_s=p.fwd_use_s * compute_scale,
                          bwd_use_s=p.bwd_use_s * compute_scale) for p in params]
        compute_s, forward_s, backward_s = (x * compute_scale for x in (compute_s, forward_s, backward_s))
    param_b, opt_b = _state_bytes(report, params)
    cost = DistributedCost(spec, cluster, compute_s, forward_s, backward_s, 0, 0.0, 0.0, _batch(report),
                           state_bytes=2 * param_b + opt_b)
    if spec.world_size == 1:
        return cost
    if spec.strategy == "ddp":
        cost.buckets, cost.exposed_comm_s = _ddp(params, spec, cluster, backward_s)
        cost.bucket_copy_s = _bucket_copies(report, params, cost.buckets, spec)
        cost.comm_bytes = sum(b.nbytes for b in cost.buckets)
        cost.comm_time_s = sum(b.comm.time_s for b in cost.buckets)
    else:
        cost.units, cost.exposed_comm_s = _fsdp(params, spec, cluster, forward_s, backward_s)
        gathers = 2 if spec.strategy in REGATHER else 1
        replica = [u.replica_all_reduce for u in cost.units if u.replica_all_reduce]
        cost.comm_bytes = int(sum(gathers * u.param_bytes + u.grad_bytes for u in cost.units) +
                              sum(c.nbytes for c in replica))
        cost.comm_time_s = sum(gathers * u.all_gather.time_s + _reduce_s(u) for u in cost.units)
        n, biggest = shard_group(spec, cluster), max((u.param_bytes for u in cost.units), default=0)
        if spec.strategy in REGATHER:   # sharded over n; unsharded: two units' parameters (prefetch), one's grads
            kept = (2 * param_b + opt_b) / n + 3 * biggest
        else:                         # ZeRO-2: parameters stay whole; gradients and state sharded
            kept = param_b + (param_b + opt_b) / n + biggest
        cost.memory_saved_bytes = max(0, int(cost.state_bytes - kept))
    return cost


# ---------------------------------------------------------------------------------------------
# Scaling table: one analysis, every world size
# ---------------------------------------------------------------------------------------------

@dataclass
class GPUScaling:
    """Predicted step per world size (same per-GPU batch: weak scaling)."""

    model: str
    hardware: str
    costs: list[DistributedCost]

    def rows(self) -> list[dict]:
        base = self.costs[0].compute_s
        return [{"gpus": c.spec.world_size, "step_time_s": c.step_time_s, "exposed_comm_s": c.exposed_comm_s,
                 "comm_time_s": c.comm_time_s, "exposed_share": c.exposed_share, "throughput": c.throughput,
                 "efficiency": base / c.step_time_s} for c in self.costs]

    def table(self, tablefmt: str = "simple") -> str:
        body = [[r["gpus"], f"{r['step_time_s'] * 1e3:.2f}", f"{r['exposed_comm_s'] * 1e3:.2f}",
                 f"{r['exposed_share'] * 100:.1f}", f"{r['throughput']:,.0f}" if r["throughput"] else "-",
                 f"{r['efficiency'] * 100:.1f}"] for r in self.rows()]
        c = self.costs[0]
        head = (f"{self.model} on {c.cluster.name} ({self.hardware}), {c.spec.strategy}, per-GPU batch "
                f"{c.per_gpu_batch}: predictions\n")
        return head + tabulate(body, ["GPUs", "step ms", "exposed comm ms", "exposed %", "samples/s",
                                      "scaling eff. %"], tablefmt=tablefmt, disable_numparse=True)

    def to_dict(self) -> dict:
        return {"model": self.model, "hardware": self.hardware, "rows": self.rows(),
                "spec": asdict(self.costs[0].spec), "cluster": self.costs[0].cluster.name}

    def plot(self, path: str) -> None:
        """Step time (compute + exposed comm) and scaling efficiency against GPUs (log2 axis)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = self.rows()
        g = [r["gpus"] for r in rows]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.bar([str(x) for x in g], [self.costs[0].compute_s * 1e3] * len(g), label="compute")
        a.bar([str(x) for x in g], [r["exposed_comm_s"] * 1e3 for r in rows],
              bottom=[self.costs[0].compute_s * 1e3] * len(g), label="exposed communication")
        a.set_xlabel("GPUs"), a.set_ylabel("step (ms)"), a.legend(), a.set_title(f"{self.model}: step time")
        b.plot(g, [r["efficiency"] * 100 for r in rows], marker="o")
        b.set_xscale("log", base=2), b.set_xlabel("GPUs"), b.set_ylabel("scaling efficiency (%)")
        b.set_ylim(0, 105), b.set_title("predicted (weak scaling)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def gpu_scaling(model_or_report, example_inputs=None, gpus=(1, 8, 64, 512, 4096), *, hardware=DEFAULT_PRESET,
                dtype=None, **spec) -> GPUScaling:
    """Predicted step time, exposed communication, throughput and scaling efficiency per world
    size. ``spec``: the other :class:`Distributed` fields (strategy, cluster, bucket_mb, ...)."""
    from ..analyze import analyze
    from ..report import GraphReport
    if not gpus or any(not isinstance(n, int) or n < 1 for n in gpus):
        raise InputError(f"gpus must be world sizes >= 1, got {gpus!r}")
    specs = [Distributed(world_size=n, **spec) for n in gpus]   # checked before the analysis
    if isinstance(model_or_report, GraphReport):
        report = model_or_report
    else:
        from ..cost_models.hardware import load_hardware
        for s in specs:
            s.check(load_hardware(hardware).name)
        report = analyze(model_or_report, example_inputs, hardware=hardware, dtype=dtype)
    params = parameters(report)
    return GPUScaling(report.model, report.hardware.name, [apply(report, s, params=params) for s in specs])


# ---------------------------------------------------------------------------------------------
# Lint: communication-bound steps
# ---------------------------------------------------------------------------------------------

COMM_BOUND_SHARE = 0.10      # flag a step whose exposed communication is at least this share
TINY_PARAM_BYTES = 64 * 1024  # "many tiny parameters": most of them below this


def _what_ifs(report, cost: DistributedCost) -> list[tuple[str, float]]:
    """(change, step time per sample at the current batch after it) for each remedy."""
    spec, params, base = cost.spec, parameters(report), cost.step_time_s
    options = []
    if spec.grad_dtype is None and any(p.dtype == "float32" for p in params):
        options.append(("communicate gradients in bf16 (DDP: register_comm_hook(None, bf16_compress_hook); FSDP2: "
                        "MixedPrecisionPolicy(reduce_dtype=torch.bfloat16))", replace(spec, grad_dtype="bf16"), 1))
    if spec.strategy == "ddp" and not (spec.gradient_as_bucket_view and spec.batched_grad_copy):
        options.append(("DistributedDataParallel(gradient_as_bucket_view=True, batched_grad_copy=True) (the latter "
                        "where your torch has it): no per-parameter copies into and out of the buckets",
                        replace(spec, gradient_as_bucket_view=True, batched_grad_copy=True), 1))
    for mb in (5, 10, 50, 100):
        if spec.strategy == "ddp" and mb != spec.bucket_mb:
            options.append((f"DistributedDataParallel(bucket_cap_mb={mb})", replace(spec, bucket_mb=mb), 1))
    for other in ("ddp", "fsdp", "hsdp"):
        if other != spec.strategy:
            options.append((f"strategy {other}", replace(spec, strategy=other), 1))
    options.append(("double the per-GPU batch (time per sample; fewer steps per epoch)", spec, 2))
    out = []
    for change, s, scale in options:
        c = apply(report, s, params=params, compute_scale=scale)
        out.append((change, c.step_time_s / scale))
    return sorted(((ch, base - t) for ch, t in out if t < base), key=lambda x: -x[1])


def check_comm_bound(ctx):
    """Communication-bound step: with ``distributed=``, the exposed communication (what the
    backward cannot hide) is at least ``COMM_BOUND_SHARE`` of the step. The finding names the
    cause (a per-GPU batch too small to hide the all-reduces, a large last bucket that starts
    only when the backward ends, many tiny parameters paying latency) and the remedy with the
    largest estimated saving (gradient dtype, bucket size, FSDP vs DDP, a larger batch), each
    estimated by re-running the distributed cost with that change."""
    from .lint import Finding
    report = ctx.report
    cost = getattr(report, "distributed", None)
    if cost is None or cost.spec.world_size == 1 or cost.exposed_share < COMM_BOUND_SHARE:
        return []
    causes = []
    if cost.comm_time_s > cost.backward_s:
        causes.append(f"communication ({cost.comm_time_s * 1e3:.3g} ms) outlasts the whole backward "
                      f"({cost.backward_s * 1e3:.3g} ms): the per-GPU batch ({cost.per_gpu_batch}) is too small to hide it")
    if cost.buckets:
        last = cost.buckets[-1]
        if last.end_s - max(last.start_s, cost.backward_s) > 0.5 * cost.exposed_comm_s:
            causes.append(f"the last bucket ({last.nbytes / MIB:.1f} MiB, {len(last.params)} params) starts only "
                          f"when the backward ends and takes {last.comm.time_s * 1e3:.3g} ms")
    params = parameters(report)
    tiny = sum(p.nbytes() < TINY_PARAM_BYTES for p in params)
    if tiny > len(params) / 2:
        causes.append(f"{tiny} of {len(params)} parameters are under {TINY_PARAM_BYTES // 1024} KiB (latency-bound "
                      f"collectives where they end a bucket)")
    remedies = _what_ifs(report, cost)
    if not remedies:
        return []
    change, saving = remedies[0]
    others = "; ".join(f"{c}: -{s * 1e3:.3g} ms" for c, s in remedies[1:4])
    return [Finding("comm-bound", (), "(step)",
                    f"{cost.spec.strategy} on {cost.spec.world_size} GPUs ({cost.cluster.name}): exposed communication "
                    f"{cost.exposed_comm_s * 1e3:.3g} ms = {cost.exposed_share * 100:.0f} % of the step. Cause: "
                    + ("; ".join(causes) or "the collectives end after the backward"),
                    change + (f" (also: {others})" if others else ""), saving,
                    {"exposed_comm_s": cost.exposed_comm_s, "remedies": remedies})]


# ---------------------------------------------------------------------------------------------
# Calibration on a multi-GPU machine
# ---------------------------------------------------------------------------------------------

def _measure_worker(rank: int, world: int, init: str, sizes: list[int], reps: int, out: str) -> None:
    import json
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world)
    ops = {"all_reduce": lambda t, o: dist.all_reduce(t),
           "all_gather": lambda t, o: dist.all_gather_into_tensor(o, t),
           "reduce_scatter": lambda t, o: dist.reduce_scatter_tensor(t, o)}
    rows = []
    for coll, op in ops.items():
        for n in sizes:
            numel = n // 4
            small, big = torch.ones(numel // world or 1, device="cuda"), torch.ones((numel // world or 1) * world, device="cuda")
            t, o = (big, None) if coll == "all_reduce" else ((small, big) if coll == "all_gather" else (small, big))
            for _ in range(3):
                op(t, o)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                op(t, o)
            end.record()
            torch.cuda.synchronize()
            rows.append((coll, world, big.numel() * 4, start.elapsed_time(end) / reps * 1e-3))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def calibrate_comm(out: str | None = None, cluster: str = "h100-ib", quick: bool = False) -> dict:
    """Measure all-reduce, all-gather and reduce-scatter with NCCL on this node's GPUs, fit
    (alpha, bandwidth) per collective and write them into a copy of the ``cluster`` preset (the
    intra-node link; ``fxopt report --cluster OUT``). Needs 2+ CUDA GPUs."""
    import json
    import tempfile
    from pathlib import Path

    import torch.multiprocessing as mp

    from ..cost_models.comm import CLUSTER_DIR, fit_alpha_beta
    world = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world < 2:
        raise HardwareError(f"calibrate --comm measures NCCL collectives between GPUs and needs 2+ CUDA GPUs; "
                            f"this machine has {world}. Use a cluster preset ({cluster_presets()}) instead")
    base = json.loads((CLUSTER_DIR / f"{cluster}.json").read_text()) if not str(cluster).endswith(".json") \
        else json.loads(Path(cluster).read_text())
    sizes = [2 ** k for k in range(20, 27 if quick else 31)]
    with tempfile.TemporaryDirectory() as d:
        res = f"{d}/rows.json"
        mp.spawn(_measure_worker, args=(world, f"file://{d}/store", sizes, 5 if quick else 20, res), nprocs=world)
        rows = [tuple(r) for r in json.loads(Path(res).read_text())]
    fits = {}
    for coll in ("all_reduce", "all_gather", "reduce_scatter"):
        alpha, bw = fit_alpha_beta([r for r in rows if r[0] == coll])
        fits[coll] = {str(world): {"latency_s": alpha, "bandwidth": bw}}
    base["intra"].setdefault("by_collective", {})
    for coll, by in fits.items():
        base["intra"]["by_collective"].setdefault(coll, {}).update(by)
    base["calibrated_from"] = (f"fxopt calibrate --comm on {world} x {torch.cuda.get_device_name()} (NCCL "
                               f"{'.'.join(map(str, torch.cuda.nccl.version()))}), sizes 1 MiB-{sizes[-1] // MIB} MiB")
    base["measurements"] = rows
    if out:
        Path(out).write_text(json.dumps(base, indent=1) + "\n")
    return base
