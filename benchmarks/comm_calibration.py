"""Fit the intra-node alpha-beta parameters of the H100 cluster preset to published NCCL
measurements and report the error on sizes held out of the fit.

Data: /work/shared/calibration/xla/h100_collectives.csv (OpenXLA's collective tables, 8 x H100 on
one host; see that folder's README). One (alpha, bandwidth) per collective and group size (2, 4,
8 GPUs: NCCL picks other protocols per size, one line through all three fits poorly) under the
ring rule of ``fxopt.cost_models.comm.RULES``. Sizes from --min-bytes up are sorted; every other
size is fitted, the others are held out and judged.

    python benchmarks/comm_calibration.py [--csv PATH] [--min-bytes 1048576] [--write] [--json OUT]
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from fxopt.cost_models.comm import CLUSTER_DIR, Link, fit_alpha_beta, flat_time

CSV = Path("/work/shared/calibration/xla/h100_collectives.csv")
OPCODES = {"all-reduce": "all_reduce", "all-gather": "all_gather", "reduce-scatter": "reduce_scatter"}
PRESETS = ("h100-ib", "h200-ib")   # same NVLink 4 / NVSwitch fabric


def load(path: Path) -> list[tuple[str, int, float, float]]:
    """(collective, ranks, nbytes, seconds) of every row with communication (groups of 2+ GPUs)."""
    out = []
    with open(path) as f:
        for r in csv.DictReader(f):
            if r["opcode"] in OPCODES and int(r["devices_per_group"]) > 1:
                out.append((OPCODES[r["opcode"]], int(r["devices_per_group"]), float(r["tensor_size_bytes"]),
                            float(r["runtime_ns"]) * 1e-9))
    return out


def split(rows, min_bytes: float):
    """(fitted rows, held-out rows): alternate sizes from ``min_bytes`` up."""
    sizes = sorted({n for _, _, n, _ in rows if n >= min_bytes})
    fit_sizes = set(sizes[0::2])
    return ([r for r in rows if r[2] in fit_sizes], [r for r in rows if r[2] >= min_bytes and r[2] not in fit_sizes])


def calibrate(rows, min_bytes: float) -> dict:
    """{collective: {ranks: fitted alpha/bandwidth and the held-out relative errors}}."""
    result: dict = {}
    for coll, ranks in sorted({(r[0], r[1]) for r in rows}):
        train, test = split([r for r in rows if r[0] == coll and r[1] == ranks], min_bytes)
        alpha, bw = fit_alpha_beta(train)
        link = Link("fit", alpha, bw)
        err = [abs(flat_time(coll, "ring", n, ranks, link) / s - 1) for _, _, n, s in test]
        result.setdefault(coll, {})[str(ranks)] = {
            "latency_s": alpha, "bandwidth": bw, "fit_rows": len(train), "heldout_rows": len(test),
            "heldout_median_err": statistics.median(err), "heldout_max_err": max(err)}
    return result


def write_presets(res: dict, csv_path: str, min_bytes: float) -> None:
    for name in PRESETS:
        path = CLUSTER_DIR / f"{name}.json"
        d = json.loads(path.read_text())
        d["intra"]["by_collective"] = {c: {k: {"latency_s": round(v["latency_s"], 9),
                                               "bandwidth": round(v["bandwidth"], -6)} for k, v in by.items()}
                                       for c, by in res.items()}
        d["calibrated_from"] = (f"intra-node by_collective: fitted by benchmarks/comm_calibration.py to every other "
                                f"size >= {min_bytes / 2**20:g} MiB of {Path(csv_path).name} (OpenXLA's published "
                                f"NCCL measurements, 8 x H100 SXM on one host, fp32); held-out error in "
                                f"docs/BENCHMARKS.md. Inter-node: datasheet x assumed efficiency, not calibrated.")
        path.write_text(json.dumps(d, indent=1) + "\n")
        print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--csv", default=str(CSV))
    p.add_argument("--min-bytes", type=float, default=2 ** 20,
                   help="fit and judge sizes from here up (DDP buckets are 1-25 MiB, FSDP units larger)")
    p.add_argument("--write", action="store_true", help=f"store the fit in the presets {PRESETS}")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    res = calibrate(load(Path(args.csv)), args.min_bytes)
    print(f"fitted on every other size >= {args.min_bytes / 2**20:g} MiB of {args.csv}; error on the other "
          f"(held-out) sizes\n")
    print("| collective | GPUs | alpha (us/step) | bandwidth (GB/s per GPU) | held-out sizes | median error | "
          "max error |")
    print("|---|---|---|---|---|---|---|")
    for coll, by in res.items():
        for ranks, r in by.items():
            print(f"| {coll} | {ranks} | {r['latency_s'] * 1e6:.2f} | {r['bandwidth'] / 1e9:.0f} | "
                  f"{r['heldout_rows']} | {r['heldout_median_err'] * 100:.1f} % | {r['heldout_max_err'] * 100:.0f} % |")
    if args.write:
        write_presets(res, args.csv, args.min_bytes)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
