"""bench / calibrate / profile: mechanics on the CPU (no accuracy claims), real runs on a GPU."""
import json
import math

import pytest
import torch
from torch import nn

import importlib

bench_mod = importlib.import_module("fxopt.measure.bench")  # the package attribute is the bench() function
from fxopt import zoo
from fxopt.analyze import analyze
from fxopt.measure.bench import VARIANTS, Variant, bench
from fxopt.measure.calibrate import calibrate
from fxopt.cost_models import load_hardware
from fxopt.cost_models.hardware import Hardware
from fxopt.cost_models.roofline import call_time
from fxopt.errors import FxoptError, ModelSpecError
from fxopt.measure.profile import profile, spearman


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory):
    path = tmp_path_factory.mktemp("hw") / "cpu.json"
    prof = calibrate("cpu", quick=True, out=path)
    return path, prof


# ---- spearman ------------------------------------------------------------------------------
def test_spearman_by_hand():
    xs = [3.0, 1.0, 4.0, 1.5, 9.0]
    assert spearman(xs, xs) == pytest.approx(1.0)
    assert spearman(xs, [-x for x in xs]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a=(1,2,3), b=(1,3,2): d^2 = 0+1+1, rho = 1 - 6*2/(3*8) = 0.5
    assert spearman([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    # ties get their average rank: a ranks (1.5,1.5,3), b (1,2,3) -> Pearson of ranks = sqrt(3)/2
    assert spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    with pytest.raises(FxoptError):
        spearman([1, 2], [1])


# ---- bench ---------------------------------------------------------------------------------
def test_bench_cpu_variants_json_table_and_a_failing_variant(monkeypatch):
    def broken(model, variant, inputs):
        raise RuntimeError("this variant cannot be built")
    real_wrap = bench_mod._wrap
    monkeypatch.setitem(VARIANTS, "broken", Variant("always fails", wrap="broken"))
    monkeypatch.setattr(bench_mod, "_wrap", lambda m, v, i: broken(m, v, i) if v.wrap == "broken" else real_wrap(m, v, i))
    res = bench(MLP(), (torch.randn(4, 16),), variants=("eager-fp32", "broken", "fxopt"), steps=3, warmup=1,
                device="cpu")
    assert [r.name for r in res.results] == ["eager-fp32", "broken", "fxopt"]
    assert res["broken"].status == "failed" and "cannot be built" in res["broken"].reason
    for name in ("eager-fp32", "fxopt"):
        r = res[name]
        assert r.status == "ok", r.reason
        assert len(r.step_times_s) == 3 and r.p10_s <= r.median_s <= r.p90_s
        assert r.images_per_s == pytest.approx(4 / r.median_s)
        assert r.peak_memory_bytes is None and r.mfu is None  # CPU: no memory figure, no GPU peak
        assert r.first_step_s > 0
    # matrix FLOPs of the step (fwd 2*B*(16*32+32*10); bwd: grad input of fc2 + both weight grads)
    fwd = 2 * 4 * (16 * 32 + 32 * 10)
    assert res.matrix_flops == fwd + 2 * 4 * (32 * 10) + 2 * 4 * (16 * 32 + 32 * 10)
    assert res["fxopt"].tflops == pytest.approx(res.matrix_flops / res["fxopt"].median_s / 1e12)
    data = json.loads(res.to_json())
    assert data["schema"] == "fxopt.bench/1" and data["results"][1]["status"] == "failed"
    text = res.table()
    assert "FAILED" in text and "eager-fp32" in text and "—" in text


def test_bench_zoo_spec_same_weights_each_variant():
    seen = []
    real = bench_mod._run_variant

    def spy(name, variant, model, *a):
        seen.append(next(model.parameters()).detach().clone())
        return real(name, variant, model, *a)
    bench_mod._run_variant = spy
    try:
        res = bench("resnet50", variants=("eager-fp32", "autocast-cl"), steps=2, warmup=0, device="cpu",
                    batch=2, tiny=True)
    finally:
        bench_mod._run_variant = real
    assert res.model == "resnet50-tiny" and res.batch == 2
    assert all(r.status == "ok" for r in res.results), res.table()
    assert torch.equal(seen[0], seen[1])  # each variant starts from the same (untrained) weights


def test_bench_bad_specs():
    with pytest.raises(FxoptError, match="unknown bench variant"):
        bench(MLP(), (torch.randn(2, 16),), variants=("eager-fp32", "nope"))
    with pytest.raises(ModelSpecError, match="timm"):
        bench_mod.resolve_bench_model("timm:resnet50", 2)  # timm does not import with the CPU torch here


# ---- calibrate -----------------------------------------------------------------------------
def test_calibrate_quick_profile_loads_and_drives_the_cost_model(cpu_profile):
    path, prof = cpu_profile
    assert prof["name"] == "cpu-measured"
    ref = json.loads(open(load_hardware.__globals__["PRESET_DIR"] / "h100.json").read())
    for key in ("name", "memory_bandwidth", "tensor_flops", "vector_flops", "sm_count", "kernel_model"):
        assert key in prof and type(prof[key]) is type(ref[key])
    m = prof["measured"]
    assert {"torch", "date", "device", "raw", "nhwc_speedup", "fit_mape"} <= set(m)
    assert set(m["nhwc_speedup"]) == set(__import__("fxopt.cost_models.layout", fromlist=["x"]).NHWC_SPEEDUP)
    # the raw measurements are what the kernel model has parameters for: GEMMs (a misaligned one among
    # them), memory-bound kernels over sizes, every conv class, the host's dispatch time
    assert any(any(d % 8 for d in r["dims"][1:]) for r in m["raw"]["gemm"])
    assert len({tuple(r["dims"]) for r in m["raw"]["memory"]}) >= 3
    assert {r["class"] for r in m["raw"]["conv"]} == {"dense", "1x1", "depthwise", "grouped"}
    km = prof["kernel_model"]
    assert set(km["matrix"]["fp32"]) >= {"eff", "k_half", "reuse", "latency_s"}
    assert km["host"]["fwd"] == m["raw"]["host_dispatch_s"] > 0
    assert km["source"].startswith("fxopt calibrate --quick")
    hw = load_hardware(str(path))
    assert hw.name == "cpu-measured" and hw.kernel_param("host")["fwd"] == km["host"]["fwd"]
    assert hw.profile_kind().startswith("measured")
    report = analyze(MLP(), (torch.randn(4, 16),), hardware=str(path))
    assert report.hardware.name == "cpu-measured" and report.totals["step_time_s"] > 0


def test_profile_parameters_change_a_matmul_time():
    """A profile's kernel-model efficiency scales a GEMM's time; a memory-bound class's share scales
    its bandwidth; an unlisted class keeps the prior."""
    from fxopt.cost_models.fit import with_params
    base = load_hardware("h100")
    p = base.kernel_param("matrix")["bf16"]
    half = with_params(with_params(base, "matrix", {"eff": p["eff"] / 2}, "bf16"), "memory",
                       {"efficiency": {"pointwise": 0.25}})
    gemm = ((1, 4096, 4096, 4096),)
    flops = 2 * 4096 ** 3
    t0 = call_time("matmul", "bfloat16", flops, 0, 1, base, gemms=gemm)
    t1 = call_time("matmul", "bfloat16", flops, 0, 1, half, gemms=gemm)
    assert t1.compute_s == pytest.approx(2 * t0.compute_s)
    p0 = call_time("pointwise", "float32", 0, 1e9, 1, base)
    share = base.kernel_param("memory")["efficiency"]["pointwise"]
    assert call_time("pointwise", "float32", 0, 1e9, 1, half).memory_s == pytest.approx(p0.memory_s * share / 0.25)
    assert call_time("softmax", "float32", 0, 1e9, 1, half).memory_s == call_time("softmax", "float32", 0, 1e9, 1,
                                                                                   base).memory_s
    # and analyze of a model sees it: the linear layers' compute time doubles
    x = (torch.randn(64, 16),)
    lin = lambda r: sum(t.compute_s for c, t in zip(r.calls, r.call_times) if c.op_class == "matmul")
    slow = with_params(base, "matrix", {"eff": base.kernel_param("matrix")["fp32"]["eff"] / 2}, "fp32")
    assert lin(analyze(MLP(), x, hardware=slow)) == pytest.approx(2 * lin(analyze(MLP(), x, hardware=base)))


# ---- profile -------------------------------------------------------------------------------
def test_profile_mechanics_cpu(cpu_profile):
    path, _ = cpu_profile
    model, x = zoo.build("resnet50", tiny=True), zoo.example_inputs("resnet50", 2, tiny=True)
    res = profile(model, x, steps=1, hardware=str(path), device="cpu")
    by_node = {r["node"]: r for r in res.rows}
    report = analyze(zoo.build("resnet50", tiny=True), x, hardware=str(path))
    kernel_nodes = {r["node"] for r in report.rows("node") if r["kernels"] and r["node"] != "optimizer.step"}
    missing = [n for n in kernel_nodes if by_node.get(n, {}).get("measured_s", 0) <= 0]
    assert not missing, f"nodes with kernels but no measured time: {missing}"
    convs = [r for r in res.rows if r["op"] == "aten.conv2d.default"]
    assert convs and all(r["measured_bwd_s"] > 0 for r in convs)  # the backward is attributed too
    assert by_node["optimizer.step"]["measured_s"] > 0
    assert sum(r["measured_s"] for r in res.rows) + res.unattributed_s == pytest.approx(res.measured_step_s)
    assert res.predicted_step_s == pytest.approx(sum(r["predicted_s"] for r in res.rows))
    both = [r for r in res.rows if r["predicted_s"] > 0 and r["measured_s"] > 0]
    assert len(both) > 5 and res.spearman == pytest.approx(_rank_correlation(
        [r["predicted_s"] for r in both], [r["measured_s"] for r in both]), abs=1e-12)
    assert res.worst(3)[0]["abs_err_s"] == max(r["abs_err_s"] for r in res.rows)
    text = res.table(top=5)
    assert "Spearman" in text and "conv2d" in text
    json.dumps(res.to_dict())


def _rank_correlation(a, b) -> float:
    """Spearman's rho written independently of fxopt.profile: rank = #smaller + (#equal + 1) / 2
    (ties share their average rank), then Pearson's r of the ranks in float64."""
    def ranks(xs):
        return torch.tensor([sum(y < x for y in xs) + (sum(y == x for y in xs) + 1) / 2 for x in xs],
                            dtype=torch.float64)
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_rank_correlation_reference_agrees_with_hand_values():
    assert _rank_correlation([1, 2, 3], [10, 30, 20]) == pytest.approx(0.5)
    assert _rank_correlation([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)


# ---- GPU -----------------------------------------------------------------------------------
@pytest.mark.gpu
def test_bench_gpu_events_memory_and_mfu():
    """Step times from CUDA events; MFU and TFLOP/s recomputed from torch's FlopCounterMode count of
    the same training step (not the cost model's) and the median step time; memory at least the
    parameters, gradients and momentum-free SGD state need."""
    from torch.utils.flop_counter import FlopCounterMode

    res = bench("resnet50", variants=("eager-fp32", "autocast-cl", "fxopt"), steps=10, warmup=3,
                batch=8, tiny=True, device="cuda")
    assert all(r.status == "ok" for r in res.results), res.table()
    model, x = zoo.build("resnet50", tiny=True).cuda(), [t.cuda() for t in zoo.example_inputs("resnet50", 8, tiny=True)]
    with FlopCounterMode(display=False) as counter:
        model(*x).float().sum().backward()
    flops = counter.get_total_flops()   # resnet50 tiny: no grouped convs, so torch's count is exact
    assert res.matrix_flops == pytest.approx(flops, rel=1e-6)
    from fxopt.cost_models.hardware import preset_for_gpu
    hw = load_hardware(preset_for_gpu(torch.cuda.get_device_name()))
    peak = hw.tensor_flops["bf16"]   # dense bf16 datasheet peak of this GPU's preset
    assert res.hardware == hw.name
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for r in res.results:
        times = sorted(r.step_times_s)
        assert len(times) == 10 and r.median_s == pytest.approx((times[4] + times[5]) / 2, rel=1e-9)
        assert r.p10_s <= r.median_s <= r.p90_s
        assert r.tflops == pytest.approx(flops / r.median_s / 1e12, rel=1e-6)
        assert r.mfu == pytest.approx(flops / r.median_s / peak, rel=1e-6) and 0 < r.mfu < 1
        assert r.images_per_s == pytest.approx(8 / r.median_s, rel=1e-9)
        assert r.peak_memory_bytes >= 2 * param_bytes   # weights + their gradients


@pytest.mark.gpu
def test_calibrate_and_profile_gpu(tmp_path):
    prof = calibrate("cuda", quick=True, out=tmp_path / "gpu.json")
    hw = load_hardware(str(tmp_path / "gpu.json"))
    assert hw.kernel_model["matrix"]["bf16"]["eff"] > 0.3 and prof["measured"]["fit_mape"]["bf16 gemm"] < 0.3
    model, x = zoo.build("resnet50", tiny=True), zoo.example_inputs("resnet50", 4, tiny=True)
    res = profile(model, x, steps=2, hardware=str(tmp_path / "gpu.json"), device="cuda")
    convs = [r for r in res.rows if r["op"] == "aten.conv2d.default"]
    assert convs and all(r["measured_s"] > 0 and r["measured_bwd_s"] > 0 for r in convs)
    assert prof["sm_count"] == torch.cuda.get_device_properties(0).multi_processor_count
    # the per-node times add up to the measured step; the correlation is the rank formula's
    assert sum(r["measured_s"] for r in res.rows) + res.unattributed_s == pytest.approx(res.measured_step_s)
    both = [r for r in res.rows if r["predicted_s"] > 0 and r["measured_s"] > 0]
    assert res.spearman == pytest.approx(_rank_correlation([r["predicted_s"] for r in both],
                                                           [r["measured_s"] for r in both]), abs=1e-12)
