"""How fast is ``fxopt.explore``, and what does it propose? Full-size zoo models (driving, ViT-B/16,
ConvNeXt-T) built on the meta device, every rule, predicted on an H100 preset; CPU only (no GPU
needed). Targets: under 60 s per model, at least five applicable candidates each. With
``--ablate-steps N`` it also trains the top candidates of the tiny variants on the CPU (target:
verdicts and predicted time to target in under 3 minutes).

    python benchmarks/explore_zoo.py                       # ranked tables (Markdown) + timings
    python benchmarks/explore_zoo.py --ablate-steps 30     # ... and tiny-variant ablations
"""
from __future__ import annotations

import argparse
import datetime
import os
import resource
import sys
import time
import warnings

import torch

from fxopt import zoo
from fxopt.study.explore import explore, propose

MODELS = ("driving", "vit_b16", "convnext_t")
# The full-size models' predicted-faster non-exact rules (H100, bf16, batch 32; docs/BENCHMARKS.md, 2026-12-03):
# what --skip-full ablates on the tiny variants without re-exploring the full-size models.
RECORDED_TOP = {"driving": ["stem-patchify", "heads-hd64", "mqa", "gqa"], "vit_b16": ["mqa", "gqa", "depth-width"],
                "convnext_t": ["resolution", "depth-width", "dw-smaller-k"]}


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def full_size(name: str, batch: int, hw: str, dtype):
    with torch.device("meta"):
        model = zoo.build(name)
        inputs = zoo.example_inputs(name, batch=batch)
    t0, c0 = time.perf_counter(), _cpu_s()
    res = explore(model, inputs, hardware=hw, dtype=dtype, name=f"{name} (batch {batch}, {dtype or 'fp32'})")
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    n_ok = sum(c.status == "ok" for c in res.candidates)
    return res, wall, cpu, n_ok


def tiny_ablation(name: str, rules: list[str], steps: int, seeds: int) -> tuple[str, float]:
    """Train, on the tiny variant, the rules the full-size model ranks fastest (tiny models are launch-bound:
    their own ranking says little)."""
    torch.manual_seed(0)
    model = zoo.build(name, tiny=True)
    inputs = zoo.example_inputs(name, batch=8, tiny=True)
    present = {c.rule for c in propose(model, inputs, rules=rules)}
    wanted = [r for r in rules if r in present][:2]
    if not wanted:
        return f"(none of the full-size model's faster rules {rules} applies to the tiny variant)", 0.0
    t0 = time.perf_counter()
    res = explore(model, inputs, rules=wanted, name=f"{name} tiny",
                  ablate={"steps": steps, "seeds": seeds, "batch": 8, "candidates": wanted,
                          "model_fn": lambda: zoo.build(name, tiny=True)})
    return res.table(tablefmt="github"), time.perf_counter() - t0


def _md(table: str) -> str:
    """The result's table, its notes fenced (they are plain text)."""
    head, _, notes = table.partition("\n\n")
    return f"{head}\n\n```\n{notes}\n```" if notes else head


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--hw", default="h100")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--ablate-steps", type=int, default=0)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--skip-full", action="store_true", help="only the tiny ablations, of the recorded top rules")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the tiny models gain "
                   "nothing from more, and on a shared CPU OpenMP's spin-waits inflate CPU time: a tiny driving "
                   "training step took 0.04 s CPU with 1 thread, 0.65 s with 2, at load average 8 on 2 cores)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    load = os.getloadavg()[0]
    print(f"`python benchmarks/explore_zoo.py {' '.join(argv or sys.argv[1:])}`, {date}, torch {torch.__version__}, "
          f"CPU ({os.cpu_count()} cores, {args.threads} torch thread(s), load average {load:.1f} at start). Step times are PREDICTIONS of "
          f"fxopt's cost model on {args.hw}, not measurements.\n")
    failed, fastest = False, dict(RECORDED_TOP)
    for name in [] if args.skip_full else args.models.split(","):
        res, wall, cpu, n_ok = full_size(name, args.batch, args.hw, args.dtype)
        table = res.table(tablefmt="github")
        fastest[name] = [c.rule for c in res.candidates if c.status == "ok" and not c.exact and (c.saving_s or 0) > 0]
        # the target is for an otherwise idle CI CPU: judged on this process's CPU time, wall time shown beside
        ok = cpu < 60 and n_ok >= 5
        failed |= not ok
        print(f"### {name}: {n_ok} candidates built and costed in {cpu:.1f} s CPU ({wall:.1f} s wall at load "
              f"{os.getloadavg()[0]:.1f}); {'meets' if ok else 'MISSES'} the < 60 s, >= 5 candidates target\n")
        print(_md(table) + "\n")
    if args.ablate_steps:
        total = total_cpu = 0.0
        for name in args.models.split(","):
            c0 = _cpu_s()
            table, wall = tiny_ablation(name, fastest[name], args.ablate_steps, args.seeds)
            total, total_cpu = total + wall, total_cpu + _cpu_s() - c0
            print(f"### {name} (tiny, CPU ablation, {args.ablate_steps} steps x {args.seeds} seeds): "
                  f"{_cpu_s() - c0:.1f} s CPU ({wall:.1f} s wall at load {os.getloadavg()[0]:.1f})\n")
            print(_md(table) + "\n")
        print(f"tiny ablations: {total_cpu:.1f} s CPU, {total:.1f} s wall in all (target < 180 s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
