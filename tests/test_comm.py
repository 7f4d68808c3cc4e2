"""Collective costs (cost_models/comm.py) against hand-computed alpha-beta values and published
NCCL measurements; cluster presets load and say where their numbers come from."""
import csv
import json
from pathlib import Path

import pytest

from fxopt.cost_models.comm import (CLUSTER_DIR, Cluster, Link, cluster_presets, collective_time, fit_alpha_beta,
                                    flat_time, load_cluster)
from fxopt.errors import HardwareError

LINK = Link("test", latency_s=5e-6, bandwidth=100e9)
NET = Link("net", latency_s=10e-6, bandwidth=25e9)
CLUSTER = Cluster("test", "", "h100", 8, LINK, NET)
S = 8e6


def test_ring_all_reduce_is_2_p_minus_1_steps_and_2_p_minus_1_over_p_volume():
    assert flat_time("all_reduce", "ring", S, 4, LINK) == pytest.approx(6 * 5e-6 + 1.5 * S / 100e9)   # 150 us
    assert flat_time("all_reduce", "ring", S, 4, LINK) == pytest.approx(150e-6)


def test_tree_all_reduce_is_2_log2_p_steps_and_twice_the_bytes():
    assert flat_time("all_reduce", "tree", S, 8, LINK) == pytest.approx(6 * 5e-6 + 2 * S / 100e9)
    assert flat_time("all_reduce", "tree", S, 5, LINK) == pytest.approx(6 * 5e-6 + 2 * S / 100e9)  # ceil(log2 5)=3


@pytest.mark.parametrize("coll", ["all_gather", "reduce_scatter"])
def test_ring_all_gather_and_reduce_scatter(coll):
    assert flat_time(coll, "ring", S, 8, LINK) == pytest.approx(7 * 5e-6 + 7 / 8 * S / 100e9)


def test_one_rank_costs_nothing():
    assert flat_time("all_reduce", "ring", S, 1, LINK) == 0
    assert collective_time("all_reduce", S, 1, CLUSTER).time_s == 0


def test_auto_picks_tree_for_small_and_ring_for_large_messages():
    small, large = collective_time("all_reduce", 1e3, 8, CLUSTER), collective_time("all_reduce", 1e9, 8, CLUSTER)
    assert small.algorithm == "tree" and large.algorithm == "ring"
    assert small.time_s == pytest.approx(min(flat_time("all_reduce", a, 1e3, 8, LINK) for a in ("ring", "tree")))


def test_hierarchical_all_reduce_is_intra_reduce_scatter_inter_all_reduce_intra_all_gather():
    n, nodes = 32, 4
    t = collective_time("all_reduce", S, n, CLUSTER, algorithm="ring")
    rs = 7 * 5e-6 + 7 / 8 * S / 100e9
    inter = 2 * (nodes - 1) * 10e-6 + 2 * (nodes - 1) / nodes * (S / 8) / 25e9
    ag = 7 * 5e-6 + 7 / 8 * S / 100e9
    assert t.time_s == pytest.approx(rs + inter + ag)
    assert t.algorithm == "hier(ring)" and [p[0] for p in t.phases] == ["intra", "inter", "intra"]


def test_hierarchical_all_gather_and_reduce_scatter_are_halves():
    ag = collective_time("all_gather", S, 16, CLUSTER, algorithm="ring").time_s
    assert ag == pytest.approx((1 * 10e-6 + 0.5 * S / 8 / 25e9) + (7 * 5e-6 + 7 / 8 * S / 100e9))
    rs = collective_time("reduce_scatter", S, 16, CLUSTER, algorithm="ring").time_s
    assert rs == pytest.approx(ag)


def test_bad_inputs_raise_hardware_errors():
    with pytest.raises(HardwareError, match="multiple of 8"):
        collective_time("all_reduce", S, 12, CLUSTER)
    with pytest.raises(HardwareError, match="unknown collective"):
        collective_time("all_to_all", S, 8, CLUSTER)
    with pytest.raises(HardwareError, match="no cost rule"):
        flat_time("all_gather", "tree", S, 8, LINK)
    with pytest.raises(HardwareError, match="known"):
        load_cluster("h800-magic")


def test_fit_recovers_alpha_and_bandwidth_of_exact_samples():
    samples = [(c, p, n, flat_time(c, "ring", n, p, LINK)) for c in ("all_reduce",) for p in (2, 4, 8)
               for n in (1e5, 1e6, 1e7, 1e8)]
    alpha, bw = fit_alpha_beta(samples)
    assert alpha == pytest.approx(5e-6, rel=1e-6) and bw == pytest.approx(100e9, rel=1e-6)


@pytest.mark.parametrize("name", ["h100-ib", "h200-ib", "a100-ib", "h100-pcie"])
def test_presets_load_with_sources(name):
    c = load_cluster(name)
    raw = json.loads((CLUSTER_DIR / f"{name}.json").read_text())
    assert c.gpus_per_node == 8 and c.intra.source and c.inter.source
    nic = raw["inter"]
    assert c.inter.bandwidth == pytest.approx(nic["nics_per_node"] * nic["nic_bandwidth"] / 8 * nic["efficiency"])
    assert name in cluster_presets()


def test_h100_preset_uses_its_calibrated_line_at_8_gpus():
    c = load_cluster("h100-ib")
    raw = json.loads((CLUSTER_DIR / "h100-ib.json").read_text())["intra"]["by_collective"]["all_reduce"]["8"]
    t = collective_time("all_reduce", 25 * 2 ** 20, 8, c)
    assert t.time_s == pytest.approx(14 * raw["latency_s"] + 1.75 * 25 * 2 ** 20 / raw["bandwidth"])
    assert "h100_collectives.csv" in json.loads((CLUSTER_DIR / "h100-ib.json").read_text())["calibrated_from"]


CSV = Path("/work/shared/calibration/xla/h100_collectives.csv")


@pytest.mark.skipif(not CSV.exists(), reason="published NCCL measurements not on this machine")
def test_h100_preset_predicts_published_nccl_all_reduce_within_25_percent():
    """OpenXLA's published 8 x H100 NCCL times (an independent measurement), DDP-bucket sizes."""
    c = load_cluster("h100-ib")
    errs = []
    with open(CSV) as f:
        for r in csv.DictReader(f):
            n, p = int(r["tensor_size_bytes"]), int(r["devices_per_group"])
            if r["opcode"] == "all-reduce" and p in (4, 8) and 2 ** 20 <= n <= 2 ** 28:
                errs.append(abs(collective_time("all_reduce", n, p, c).time_s / (float(r["runtime_ns"]) * 1e-9) - 1))
    assert len(errs) > 20 and max(errs) < 0.25 and sorted(errs)[len(errs) // 2] < 0.10
