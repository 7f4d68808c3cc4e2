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
from fxopt.measure.profile_training import (ProfileTrainingError, _intersect, _length, _minus, _union, analyze_trace,
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


def _model(width: int = 64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))


def make_loop(delay: float, batch: int = 8, width: int = 64):
    def loop():
        model = _model(width)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = DataLoader(SlowData(512, delay), batch_size=batch, num_workers=0)
        while True:
            for x, y in loader:
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                yield
    return loop


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core CI machine, OpenMP barriers between two threads make a
    tiny model's ops take 100x longer whenever the other core is busy, which would swamp the loader."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def slow():
    return fxopt.profile_training(make_loop(0.004), steps=4, warmup=1)


@pytest.fixture(scope="module")
def fast():
    # a fetch of 64 in-memory rows (~1 ms in Python) beside ~0.4 GFLOP of matmuls per step
    return fxopt.profile_training(make_loop(0.0, batch=64, width=1024), steps=6, warmup=2)


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
    ours = [e for e in trace["traceEvents"]
            if e.get("pid") == "fxopt" and e.get("ph") == "X" and e["name"] == "data wait"]
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
    torch.set_num_threads(1)  # two ranks on a 2-core machine
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
    # fork: the children inherit the imported torch and fxopt (spawn re-imports them, ~10x slower)
    mp.start_processes(_gloo_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True, start_method="fork")
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


def _gpu_trace(data_end: float, nccl_end: float) -> dict:
    """A hand-made torch.profiler trace of one GPU step (us): a batch fetch, an H2D copy, forward
    and backward kernels, an NCCL all-reduce on its own stream overlapping one GEMM, the optimizer."""
    X = lambda name, cat, ts, end, tid=1, pid=1: {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": end - ts,
                                                 "pid": pid, "tid": tid, "args": {}}
    return {"traceEvents": [
        X("fxopt.step#0", "user_annotation", 0, 1000),
        X("enumerate(DataLoader)#_MultiProcessingDataLoaderIter.__next__", "user_annotation", 0, data_end),
        X("aten::linear", "cpu_op", 250, 300),
        X("autograd::engine::evaluate_function: AddmmBackward0", "cpu_op", 400, 500, tid=2),
        X("c10d::allreduce_", "cpu_op", 470, 480),
        X("Optimizer.step#SGD.step", "user_annotation", 600, 650),
        X("Memcpy HtoD (Pageable -> Device)", "gpu_memcpy", 210, 240, tid=7, pid=0),
        X("sm90_xmma_gemm_f32f32_tn", "kernel", 300, 400, tid=7, pid=0),
        X("vectorized_elementwise_kernel", "kernel", 400, 450, tid=7, pid=0),
        X("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "kernel", 480, nccl_end, tid=20, pid=0),
        X("sm90_xmma_gemm_f32f32_nn", "kernel", 500, 550, tid=7, pid=0),
        X("multi_tensor_apply_kernel", "kernel", 700, 720, tid=7, pid=0),
    ]}


def test_gpu_trace_arithmetic_by_hand():
    res = analyze_trace(_gpu_trace(data_end=205, nccl_end=700))
    s = {k: v * 1e6 for k, v in res.steps[0].items() if k != "step"}
    # device busy: [210,240] + [300,450] + [480,720]; compute (non-NCCL) adds [500,550] under the NCCL kernel
    assert s["device_busy_s"] == pytest.approx(420) and s["device_idle_s"] == pytest.approx(580)
    assert s["h2d_s"] == pytest.approx(30) and s["matrix_s"] == pytest.approx(150)
    assert s["other_kernel_s"] == pytest.approx(30 + 50 + 20)  # copy, elementwise, optimizer
    assert s["comm_s"] == pytest.approx(220) and s["comm_exposed_s"] == pytest.approx(20 + 150)
    # host gaps: neither device work, data wait nor a collective: [205,210] [240,300] [450,480] [720,1000]
    assert s["host_gap_s"] == pytest.approx(5 + 60 + 30 + 280)
    assert s["forward_s"] == pytest.approx(400 - 205) and s["backward_s"] == pytest.approx(100)
    assert s["optimizer_s"] == pytest.approx(50) and s["data_wait_s"] == pytest.approx(205)
    assert res.verdict.kind == "input-bound" and "_MultiProcessingDataLoaderIter" in res.verdict.evidence
    assert [v.kind for v in res.also] == ["host-bound"]
    assert set(res.collectives) == {"c10d::allreduce_", "ncclDevKernel_AllReduce_Sum_f32_RING_LL"}
    # a short batch fetch and a long all-reduce the backward cannot hide: communication-bound
    res = analyze_trace(_gpu_trace(data_end=50, nccl_end=900))
    assert res.steps[0]["comm_exposed_s"] * 1e6 == pytest.approx(20 + 150 + 180)
    assert res.verdict.kind == "communication-bound" and "bucket_cap_mb" in res.verdict.change


@pytest.mark.gpu
def test_profile_training_on_a_gpu_sees_copies_kernels_and_the_loader():
    def loop():
        model = _model(256).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loader = DataLoader(SlowData(512, 0.004), batch_size=8, pin_memory=True)
        while True:
            for x, y in loader:
                x, y = x.cuda(non_blocking=True), y.cuda(non_blocking=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                yield
    res = fxopt.profile_training(loop, steps=4, warmup=2)
    assert res.device != "cpu" and res.verdict.kind == "input-bound", res.summary()
    for s in res.steps:
        assert s["h2d_s"] > 0 and s["matrix_s"] > 0 and s["device_busy_s"] > 0
        assert s["device_idle_s"] >= 0.5 * s["data_wait_s"]  # the GPU idles while the batch is fetched
