"""Collectives on a GPU cluster: alpha-beta time per algorithm, fabric by fabric.

A cluster preset (``clusters/*.json``, data like the hardware presets) gives GPUs per node, the
intra-node link (NVLink through NVSwitch, or PCIe) and the inter-node network (NICs per node x
NIC bandwidth), each with a latency per algorithm step (alpha) and an achieved bandwidth per GPU
(1 / beta). A collective of ``nbytes`` (in the dtype actually communicated) over ``p`` ranks of
one link costs ``steps(p) * alpha + volume(p) * nbytes / bandwidth`` (rule table :data:`RULES`,
the standard ring/tree analysis: Thakur et al., "Optimization of Collective Communication
Operations in MPICH", 2005; NCCL's double binary tree). Across nodes a collective is
hierarchical: reduce-scatter inside the node, the inter-node collective on each GPU's 1/g shard
over its own NIC (ring or tree, whichever is faster), all-gather inside the node.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from fxopt.errors import HardwareError

from .hardware import preset_path

CLUSTER_DIR = Path(__file__).parent / "clusters"
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter")

# (collective, algorithm) -> (steps(p), volume(p)): alpha count and the multiple of nbytes each
# GPU sends. nbytes is the full tensor (all-reduce), the gathered output (all-gather) or the
# input before scattering (reduce-scatter), as nccl-tests and torch.distributed size them.
RULES = {
    ("all_reduce", "ring"): (lambda p: 2 * (p - 1), lambda p: 2 * (p - 1) / p),
    ("all_reduce", "tree"): (lambda p: 2 * math.ceil(math.log2(p)), lambda p: 2.0),
    ("all_gather", "ring"): (lambda p: p - 1, lambda p: (p - 1) / p),
    ("reduce_scatter", "ring"): (lambda p: p - 1, lambda p: (p - 1) / p),
}


@dataclass(frozen=True)
class Link:
    """One fabric as a GPU sees it: alpha per algorithm step, achieved bandwidth per direction."""

    name: str
    latency_s: float
    bandwidth: float                 # bytes/s per GPU per direction, achieved (bus bandwidth)
    nominal_bandwidth: float = 0.0   # datasheet, per GPU per direction
    source: str = ""
    # calibrated per collective and group size (NCCL picks other protocols and algorithms for 2, 4
    # and 8 GPUs): {"all_reduce": {"8": {"latency_s": .., "bandwidth": ..}}, ...}
    by_collective: dict = field(default_factory=dict)

    def params(self, collective: str, ranks: int) -> tuple[float, float]:
        """(alpha, bandwidth) for ``collective`` over ``ranks`` GPUs: calibrated values, else the link's."""
        c = self.by_collective.get(collective, {}).get(str(ranks), {})
        return float(c.get("latency_s", self.latency_s)), float(c.get("bandwidth", self.bandwidth))

    def calibrated(self, collective: str, ranks: int) -> bool:
        """Whether measurements fixed this collective's line (then it is used as fitted: ring rule)."""
        return str(ranks) in self.by_collective.get(collective, {})


@dataclass(frozen=True)
class Cluster:
    name: str
    description: str
    hardware: str          # the hardware preset of its GPUs
    gpus_per_node: int
    intra: Link
    inter: Link            # per GPU: NICs per node x NIC bandwidth / GPUs per node
    calibrated_from: str = ""


@dataclass(frozen=True)
class CommTime:
    """Time of one collective and how it was costed."""

    collective: str
    nbytes: float
    ranks: int
    time_s: float
    algorithm: str          # "ring", "tree", "hier(ring)", "hier(tree)", "none"
    phases: tuple = ()      # ((link, collective, algorithm, ranks, nbytes, time_s), ...)


def cluster_presets() -> list[str]:
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.json"))


def _link(d: dict, where: str) -> Link:
    known = {f.name for f in fields(Link)}
    missing = {"name", "latency_s", "bandwidth"} - set(d)
    if missing:
        raise HardwareError(f"cluster {where} lacks {sorted(missing)}; see {CLUSTER_DIR / 'h100-ib.json'}")
    return Link(**{k: v for k, v in d.items() if k in known})


def load_cluster(spec: "str | Path | Cluster" = "h100-ib") -> Cluster:
    """A preset name (``h100-ib``, ``h200-ib``, ``a100-ib``, ``h100-pcie``), a JSON path, or a Cluster."""
    if isinstance(spec, Cluster):
        return spec
    path = preset_path(spec, CLUSTER_DIR, "cluster preset", "cluster")
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HardwareError(f"cannot read cluster {path}: {exc}") from exc
    missing = {"name", "hardware", "gpus_per_node", "intra", "inter"} - set(d)
    if missing:
        raise HardwareError(f"cluster {path} lacks {sorted(missing)}; see {CLUSTER_DIR / 'h100-ib.json'}")
    inter = dict(d["inter"])
    if "nic_bandwidth" in inter:  # the network per GPU: the node's NICs shared by its GPUs
        share = inter.get("nics_per_node", d["gpus_per_node"]) / d["gpus_per_node"]
        inter.setdefault("nominal_bandwidth", inter["nic_bandwidth"] * share)
        inter.setdefault("bandwidth", inter["nic_bandwidth"] * share * inter.get("efficiency", 1.0))
    intra = dict(d["intra"])
    intra.setdefault("bandwidth", intra.get("nominal_bandwidth", 0) * intra.get("efficiency", 1.0))
    return Cluster(d["name"], d.get("description", ""), d["hardware"], int(d["gpus_per_node"]),
                   _link(intra, f"{path} intra"), _link(inter, f"{path} inter"), d.get("calibrated_from", ""))


def flat_time(collective: str, algorithm: str, nbytes: float, ranks: int, link: Link) -> float:
    """Alpha-beta time of one collective over ``ranks`` GPUs of one link (0 for one rank)."""
    if (collective, algorithm) not in RULES:
        raise HardwareError(f"no cost rule for {collective} with {algorithm}; known: {sorted(RULES)}")
    if ranks <= 1:
        return 0.0
    steps, volume = RULES[collective, algorithm]
    alpha, bw = link.params(collective, ranks)
    return steps(ranks) * alpha + volume(ranks) * nbytes / bw


def _algorithms(collective: str) -> list[str]:
    return [a for c, a in RULES if c == collective]


def _best(collective: str, nbytes: float, ranks: int, link: Link, algorithm: str) -> tuple[str, float]:
    if link.calibrated(collective, ranks):  # fitted under the ring rule to what NCCL chose: use as fitted
        algorithm = "ring"
    algos = _algorithms(collective) if algorithm == "auto" else [algorithm]
    return min(((a, flat_time(collective, a, nbytes, ranks, link)) for a in algos), key=lambda x: x[1])


def collective_time(collective: str, nbytes: float, world_size: int, cluster: Cluster,
                    algorithm: str = "auto") -> CommTime:
    """Time of ``collective`` on ``nbytes`` over ``world_size`` GPUs of ``cluster``.

    Within a node: the flat algorithm (``auto``: the fastest of ring and tree, as NCCL's tuner
    picks). Across nodes: hierarchical (intra reduce-scatter, inter collective on the 1/g shard,
    intra all-gather; all-gather and reduce-scatter use the matching half of that).
    """
    if collective not in COLLECTIVES:
        raise HardwareError(f"unknown collective {collective!r}; known: {COLLECTIVES}")
    g = cluster.gpus_per_node
    if world_size <= 1:
        return CommTime(collective, nbytes, world_size, 0.0, "none")
    if world_size <= g:
        algo, t = _best(collective, nbytes, world_size, cluster.intra, algorithm)
        return CommTime(collective, nbytes, world_size, t, algo, (("intra", collective, algo, world_size, nbytes, t),))
    if world_size % g:
        raise HardwareError(f"world size {world_size} is not a multiple of {g} GPUs per node on {cluster.name}")
    nodes = world_size // g
    if collective == "all_reduce":
        plan = [("intra", "reduce_scatter", g, nbytes), ("inter", "all_reduce", nodes, nbytes / g),
                ("intra", "all_gather", g, nbytes)]
    elif collective == "all_gather":   # nbytes: the gathered output
        plan = [("inter", "all_gather", nodes, nbytes / g), ("intra", "all_gather", g, nbytes)]
    else:                              # reduce-scatter, nbytes: the input
        plan = [("intra", "reduce_scatter", g, nbytes), ("inter", "reduce_scatter", nodes, nbytes / g)]
    phases, inter_algo = [], "ring"
    for where, coll, ranks, size in plan:
        link = cluster.intra if where == "intra" else cluster.inter
        algo, t = _best(coll, size, ranks, link, "ring" if where == "intra" else algorithm)
        inter_algo = algo if where == "inter" else inter_algo
        phases.append((where, coll, algo, ranks, size, t))
    return CommTime(collective, nbytes, world_size, sum(p[-1] for p in phases), f"hier({inter_algo})", tuple(phases))


def inter_node_time(collective: str, nbytes: float, nodes: int, cluster: Cluster, algorithm: str = "auto") -> CommTime:
    """``collective`` among one GPU per node over each GPU's own NIC (HSDP's replica all-reduce of
    a shard: every GPU of a node does its own at once, on its own NIC)."""
    if nodes <= 1:
        return CommTime(collective, nbytes, nodes, 0.0, "none")
    algo, t = _best(collective, nbytes, nodes, cluster.inter, algorithm)
    return CommTime(collective, nbytes, nodes, t, algo, (("inter", collective, algo, nodes, nbytes, t),))


def fit_alpha_beta(samples: list[tuple[str, int, float, float]]) -> tuple[float, float]:
    """Least-squares (alpha, bandwidth) of one collective from ``(collective, ranks, nbytes,
    seconds)`` samples under the ring rule, weighted by 1/seconds so every size counts alike
    (relative error), not only the largest."""
    import numpy as np
    rows, rhs = [], []
    for coll, ranks, nbytes, secs in samples:
        steps, volume = RULES[coll, "ring"]
        rows.append([steps(ranks) / secs, volume(ranks) * nbytes / secs])
        rhs.append(1.0)
    (alpha, inv_bw), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    if inv_bw <= 0:
        raise HardwareError("the fitted bandwidth is not positive: the samples need larger sizes")
    return max(float(alpha), 0.0), float(1.0 / inv_bw)
