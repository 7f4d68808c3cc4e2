"""fxopt.profile_training / trace_training on real CPU training loops: a slow DataLoader is found
input-bound, a fast one is not, gloo all-reduces show up, and the phases add up to the step."""
import json
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fxopt
from fxopt.profile_training import (ProfileTrainingError, _intersect, _length, _minus, _union, analyze_trace,
                                    trace_training)


class SlowData(Dataset):
    """A map-style dataset whose __getitem__ sleeps ``delay`` seconds (a slow decode/augmentation)."""

    def __init__(self, n: int, delay: float):
        g = torch.Generator().manual_seed(0)
        self.x, self.y, self.delay = torch.randn(n, 32, generator=g), torch.randint(0, 4, (n,), generator=g), delay

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.delay:
            time.sleep(self.delay)
        return self.x[i], self.y[i]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))


def make_loop(delay: float, batch: int = 8):
    def loop():
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = DataLoader(SlowData(512, delay), batch_size=batch, num_workers=0)
        while True:
            for x, y in loader:
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                yield
    return loop


@pytest.fixture(scope="module")
def slow():
    return fxopt.profile_training(make_loop(0.004), steps=4, warmup=1)


@pytest.fixture(scope="module")
def fast():
    return fxopt.profile_training(make_loop(0.0), steps=6, warmup=2)


def test_slow_loader_is_input_bound(slow):
    assert slow.verdict.kind == "input-bound"
    assert "num_workers" in slow.verdict.change and "single-process loader" in slow.verdict.evidence
    # 8 items x 4 ms of sleep per batch: the wait is at least the sleep, and inside the step
    for s in slow.steps:
        assert 8 * 0.004 <= s["data_wait_s"] <= s["wall_s"]


def test_fast_loader_is_not_input_bound(fast):
    assert fast.verdict.kind != "input-bound"
    assert all(v.kind != "input-bound" for v in fast.also)
    assert fast.median("data_wait_s") < 0.2 * fast.median("wall_s")


def test_phases_partition_the_step(fast):
    """The data wait, device-busy time and host gaps tile the step (no collectives here)."""
    assert len(fast.steps) == 6 and fast.warmup == 2 and len(fast.unprofiled_step_s) == 2
    for s in fast.steps:
        assert s["comm_s"] == 0 and s["h2d_s"] == 0
        assert s["data_wait_s"] + s["device_busy_s"] + s["host_gap_s"] == pytest.approx(s["wall_s"], rel=1e-6)
        assert s["matrix_s"] > 0 and s["matrix_s"] + s["other_kernel_s"] == pytest.approx(s["device_busy_s"])
        assert s["forward_s"] > 0 and s["backward_s"] > 0 and s["optimizer_s"] > 0
        assert s["forward_s"] + s["backward_s"] + s["optimizer_s"] <= s["wall_s"] * (1 + 1e-9)


def test_summary_json_and_chrome_trace(slow, tmp_path):
    text = slow.summary()
    assert "verdict: input-bound" in text and "data wait" in text
    data = json.loads(slow.to_json())
    assert data["verdict"]["kind"] == "input-bound" and len(data["steps"]) == 4
    path = slow.export_chrome_trace(tmp_path / "step.json")
    trace = json.loads(path.read_text())
    names = {e.get("args", {}).get("name") for e in trace["traceEvents"] if e.get("ph") == "M"}
    assert "fxopt: step phases" in names and {"data wait", "forward", "backward", "optimizer"} <= names
    # torch's own events are still there: the DataLoader ranges and the ATen ops
    assert any(e["name"].startswith("enumerate(DataLoader)#") for e in trace["traceEvents"] if e.get("ph") == "X")
    ours = [e for e in trace["traceEvents"] if e.get("pid") == "fxopt" and e.get("ph") == "X" and e["name"] == "data wait"]
    assert sum(e["dur"] for e in ours) * 1e-6 == pytest.approx(sum(s["data_wait_s"] for s in slow.steps))


def test_context_manager_and_window():
    loop = make_loop(0.0)()
    with trace_training(steps=2, warmup=3) as t:
        for _ in range(8):  # steps after the window run unprofiled
            next(loop)
            t.step()
    # 3 warm-up steps before the window and 3 after it ran without the profiler
    assert len(t.result.steps) == 2 and len(t.result.unprofiled_step_s) == 6
    assert all(s > 0 for s in t.result.unprofiled_step_s)


def test_bad_loops_are_refused():
    with pytest.raises(ProfileTrainingError, match="generator"):
        fxopt.profile_training(lambda: None)
    with pytest.raises(ProfileTrainingError, match="warmup"):
        fxopt.profile_training(make_loop(0.0), steps=0)

    def short():
        yield
    with pytest.raises(ProfileTrainingError, match="ran 1 steps"):
        fxopt.profile_training(short, steps=3, warmup=2)
    with pytest.raises(ProfileTrainingError, match="fxopt.step"):
        analyze_trace({"traceEvents": []})


def test_interval_arithmetic():
    a = _union([(0, 2), (1, 3), (5, 6), (6, 7)])
    assert a == [(0, 3), (5, 7)] and _length(a) == 5
    assert _intersect(a, [(2, 6)]) == [(2, 3), (5, 6)]
    assert _minus(a, [(1, 2), (5, 6)]) == [(0, 1), (2, 3), (6, 7)]


def _gloo_worker(rank: int, world: int, init: str, out: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        def loop():
            model = nn.parallel.DistributedDataParallel(_model())
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            g = torch.Generator().manual_seed(rank)
            while True:
                x, y = torch.randn(8, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                yield
        res = fxopt.profile_training(loop, steps=3, warmup=1)
        with open(f"{out}/rank{rank}.json", "w") as f:
            f.write(res.to_json())
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_show_their_all_reduce(tmp_path):
    init = f"file://{tmp_path}/store"
    mp.spawn(_gloo_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        data = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert data["rank"] == rank
        names = " ".join(data["collectives"])
        assert "allreduce" in names.replace("_", "").lower(), data["collectives"]
        assert all(s["comm_s"] > 0 for s in data["steps"])
        assert all(0 <= s["comm_exposed_s"] <= s["comm_s"] + 1e-12 for s in data["steps"])


LOOP_FILE = '''
import torch
from torch import nn


def train():
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    while True:
        nn.functional.mse_loss(model(torch.randn(8, 16)), torch.zeros(8, 4)).backward()
        opt.step()
        opt.zero_grad()
        yield


def not_a_generator():
    return 1


def model():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), torch.randn(8, 16)
'''


def test_cli_profile_training_and_report_trace(tmp_path, capsys):
    from fxopt.cli import main
    path = tmp_path / "loop.py"
    path.write_text(LOOP_FILE)
    trace = tmp_path / "measured.json"
    assert main(["profile-training", f"{path}:train", "--steps", "3", "--warmup", "1", "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "verdict:" in out and "3 profiled steps after 1 warm-up" in out and "wrote" in out
    assert any(e.get("pid") == "fxopt" for e in json.loads(trace.read_text())["traceEvents"])
    assert main(["profile-training", f"{path}:not_a_generator"]) == 2
    assert "no generator function" in capsys.readouterr().err
    assert main(["profile-training", "nope.py:train"]) == 2
    # the predicted timeline of `fxopt report --trace` and the memory check of --memory
    pred = tmp_path / "predicted.json"
    assert main(["report", f"{path}:model", "--top", "3", "--trace", str(pred), "--memory"]) == 0
    out = capsys.readouterr().out
    assert "fits: predicted peak" in out
    threads = {e["args"]["name"] for e in json.loads(pred.read_text())["traceEvents"] if e["name"] == "thread_name"}
    assert {"forward", "backward", "optimizer"} <= threads
