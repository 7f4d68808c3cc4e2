"""Overhead of ``fxopt.trace_training`` on a training loop outside its profiled window, and the
wall time of a 20-step profile (targets: < 5 % and < 30 s on CI's CPU).

A tiny MLP trains on a DataLoader; each round runs the same loop twice, once plain and once under
``trace_training(steps=20, warmup=W)``. Every step is timed twice: wall clock, and the CPU time of
the loop's thread (``time.thread_time``; torch runs one intra-op thread here), which other
processes on a shared machine do not inflate. The steps before and after the profiled window are
compared with the plain loop's (median over rounds of the per-round medians; rounds alternate
which loop goes first). Last, the CPU cost of one tiny ATen call before any profiling and after
all the profiled windows: hooks left behind by the profiler would show there first. Runs on a CPU
or a GPU.

    python benchmarks/profile_training_overhead.py [--steps 200] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxopt.measure.profile_training import trace_training


def loop(device):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = TensorDataset(torch.randn(4096, 64), torch.randint(0, 10, (4096,)))
    while True:
        for x, y in DataLoader(data, batch_size=32):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            yield


def _timed(gen, step=lambda: None):
    w, c = time.perf_counter(), time.thread_time()
    next(gen)
    step()
    return time.perf_counter() - w, time.thread_time() - c


def plain(n, device) -> list[tuple]:
    gen = loop(device)
    return [_timed(gen) for _ in range(n)][5:]  # the first steps build the optimizer state


def traced(n, warmup, device) -> tuple[list[tuple], float]:
    gen, times = loop(device), []
    with trace_training(steps=20, warmup=warmup) as t:
        for i in range(n):
            if i == warmup:
                start = time.perf_counter()
            wc = _timed(gen, t.step)
            if not warmup <= i < warmup + 20:
                times.append(wc)
            if i == warmup + 19:
                window = time.perf_counter() - start  # the 20 profiled steps plus the trace analysis
    return times[5:], window


def dispatch_us(n: int = 20000) -> float:
    """Thread CPU time of one tiny ATen call (us): what lingering profiler hooks would inflate."""
    a = torch.randn(16)
    t = time.thread_time()
    for _ in range(n):
        torch.add(a, a)
    return (time.thread_time() - t) / n * 1e6


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    before = [dispatch_us() for _ in range(7)]
    ratios, cpu_ratios, windows, base, cpu_base = [], [], [], [], []
    for r in range(args.rounds):
        if r % 2:
            tr, window = traced(args.steps, args.warmup, device)
            pl = plain(args.steps, device)
        else:
            pl = plain(args.steps, device)
            tr, window = traced(args.steps, args.warmup, device)
        med = lambda xs, k: statistics.median(x[k] for x in xs)
        ratios.append(med(tr, 0) / med(pl, 0))
        cpu_ratios.append(med(tr, 1) / med(pl, 1))
        windows.append(window)
        base.append(med(pl, 0))
        cpu_base.append(med(pl, 1))
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (1 torch thread)"
    print(f"device {dev}, torch {torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}")
    pct = lambda xs: f"{(statistics.median(xs) - 1) * 100:+.1f} % (per round: " + \
        ", ".join(f"{(x - 1) * 100:+.1f}" for x in xs) + ")"
    print(f"plain step (median): wall {statistics.median(base) * 1e3:.3f} ms, thread CPU "
          f"{statistics.median(cpu_base) * 1e3:.3f} ms")
    print(f"outside the window under trace_training: thread CPU {pct(cpu_ratios)}; wall {pct(ratios)}")
    print(f"20 profiled steps + analysis: median {statistics.median(windows):.2f} s, max {max(windows):.2f} s")
    after = [dispatch_us() for _ in range(7)]
    print(f"one tiny ATen call (thread CPU, median of 7x20000): {statistics.median(before):.3f} us before any "
          f"profiling, {statistics.median(after):.3f} us after {args.rounds} profiled windows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
