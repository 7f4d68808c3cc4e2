"""The analytical cost model against independent references: torch's FlopCounterMode,
hand-derived FLOP and byte counts, and concrete analyses for the symbolic formulas."""
import json
import math
import warnings

import pytest
import sympy
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import flop_counter
from torch.utils._pytree import tree_flatten

import fxopt
from fxopt import zoo
from fxopt.cost_models import Precision, load_hardware
from fxopt.errors import HardwareError
from nets import Fn  # noqa: E402  (tests/nets.py)

F32 = 4


def groups_aware_conv_backward(grad_out, x, w, *args, out_shape=None, **kwargs):
    """torch's registry counts a grouped conv's weight gradient ``groups`` times (see
    test_grouped_conv_backward_by_hand); this reference counts dgrad + wgrad as one forward each."""
    transposed, output_mask = args[4], args[-1]
    fwd = flop_counter.conv_flop_count(x, w, grad_out, transposed=transposed)
    return fwd * (int(output_mask[0]) + int(output_mask[1]))


def reference_flops(name: str, batch: int, tiny: bool) -> int:
    """FlopCounterMode over the eager model's forward + backward, on fake tensors.

    On CPU, SDPA runs a CPU flash kernel torch's registry does not list; it is mapped to
    torch's own SDPA formulas (the ones the CUDA flash kernels use).
    """
    mapping = {
        torch.ops.aten.convolution_backward: groups_aware_conv_backward,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda go, q, k, v, *a, out_shape=None, **kw: flop_counter.sdpa_backward_flop_count(go, q, k, v),
    }
    with FakeTensorMode():
        model = zoo.build(name, tiny=tiny)
        inputs = zoo.example_inputs(name, batch, tiny=tiny)
        counter = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            outs = [o for o in tree_flatten(model(*inputs))[0] if o.requires_grad]
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return counter.get_total_flops()


def meta_model(name: str, batch: int, tiny: bool = False):
    with torch.device("meta"):
        return zoo.build(name, tiny=tiny), zoo.example_inputs(name, batch, tiny=tiny)


@pytest.mark.parametrize("name", zoo.names())
def test_matrix_flops_equal_flop_counter_full_size(name):
    model, inputs = meta_model(name, batch=2)
    t = fxopt.analyze(model, inputs).totals
    ours = t["matrix_flops_fwd"] + t["matrix_flops_bwd"]
    ref = reference_flops(name, 2, tiny=False)
    assert ours == pytest.approx(ref, rel=0.01)
    assert t["matrix_flops_bwd"] == pytest.approx(2 * t["matrix_flops_fwd"], rel=0.1)  # dgrad + wgrad


@pytest.mark.parametrize("name", zoo.names())
def test_tiny_zoo_analyzes_exactly_with_no_unknown_ops(name):
    model, inputs = zoo.build(name, tiny=True), zoo.example_inputs(name, 2, tiny=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxopt.UnknownOpWarning)
        report = fxopt.analyze(model, inputs)
    t = report.totals
    assert t["matrix_flops_fwd"] + t["matrix_flops_bwd"] == reference_flops(name, 2, tiny=True)
    assert report.unknown_ops == {}
    assert t["other_flops_fwd"] > 0 and t["other_flops_bwd"] > 0  # reported beside, not mixed in
    assert t["params"] == sum(p.numel() for p in model.parameters())
    assert t["step_time_s"] > 0 and 0 < t["mfu"] < 1


# ---- hand-derived counts on single ops (forward only unless stated) --------------------------


def calls_of(report, op_class=None):
    return [c for c in report.calls if c.kernels and (op_class is None or c.op_class == op_class)]


def test_conv_flops_and_bytes_by_hand():
    n, cin, cout, h, w, k = 2, 3, 8, 16, 16, 3
    model = Fn(lambda s, x: s.mods[0](x), nn.Conv2d(cin, cout, k, padding=1, bias=False))
    r = fxopt.analyze(model, torch.randn(n, cin, h, w), training=False)
    (conv,) = calls_of(r)
    assert conv.op_class == "conv"
    assert conv.flops == 2 * n * cout * h * w * cin * k * k
    assert conv.bytes_read == (n * cin * h * w + cout * cin * k * k) * F32
    assert conv.bytes_written == n * cout * h * w * F32


@pytest.mark.parametrize("groups", [1, 4, 32])
def test_grouped_conv_backward_by_hand(groups):
    """dgrad and wgrad of a (grouped/depthwise) conv each cost exactly its forward."""
    n, c, h, k = 2, 32, 14, 3
    model = Fn(lambda s, x: s.mods[0](x), nn.Conv2d(c, c, k, padding=1, groups=groups, bias=False))
    x = torch.randn(n, c, h, h, requires_grad=True)
    r = fxopt.analyze(model, x, optimizer=None)
    fwd = 2 * n * c * h * h * (c // groups) * k * k
    assert r.totals["matrix_flops_fwd"] == fwd
    assert r.totals["matrix_flops_bwd"] == 2 * fwd


def test_matmul_flops_and_bytes_by_hand():
    m, k, n = 4, 8, 16
    model = Fn(lambda s, a, b: a @ b)
    r = fxopt.analyze(model, (torch.randn(m, k), torch.randn(k, n)), training=False)
    (mm,) = calls_of(r)
    assert (mm.op, mm.op_class, mm.flops) == ("mm", "matmul", 2 * m * k * n)
    assert (mm.bytes_read, mm.bytes_written) == ((m * k + k * n) * F32, m * n * F32)


def test_broadcast_pointwise_reads_each_distinct_element_once():
    n, c = 32, 16
    model = Fn(lambda s, x, b: x + b)
    r = fxopt.analyze(model, (torch.randn(n, c), torch.randn(c)), training=False)
    (add,) = calls_of(r)
    assert (add.op_class, add.flops) == ("pointwise", n * c)
    assert add.bytes_read == (n * c + c) * F32
    assert add.bytes_written == n * c * F32


def test_reduction_by_hand():
    n, c = 32, 16
    model = Fn(lambda s, x: x.sum(dim=1))
    r = fxopt.analyze(model, torch.randn(n, c), training=False)
    (red,) = calls_of(r)
    assert (red.op_class, red.flops) == ("reduction", n * c)
    assert (red.bytes_read, red.bytes_written) == (n * c * F32, n * F32)


def test_views_move_nothing_and_launch_nothing():
    model = Fn(lambda s, x: x.view(4, 8).transpose(0, 1).unsqueeze(0)[..., :2])
    r = fxopt.analyze(model, torch.randn(32), training=False)
    assert r.calls and calls_of(r) == []
    t = r.totals
    assert (t["bytes"], t["kernels"]) == (0, 0)


def test_linear_backward_by_hand():
    """x does not require grad: backward is the weight gradient (same FLOPs as forward) and the
    bias gradient (a reduction over the batch)."""
    b, i, o = 4, 8, 16
    model = Fn(lambda s, x: s.mods[0](x), nn.Linear(i, o))
    r = fxopt.analyze(model, torch.randn(b, i), optimizer=None)
    t = r.totals
    assert t["matrix_flops_fwd"] == 2 * b * i * o
    assert t["matrix_flops_bwd"] == 2 * b * i * o
    assert t["other_flops_bwd"] == b * o   # sum of grad_out over the batch for the bias
    assert t["params"] == i * o + o
    assert t["activation_bytes"] == b * i * F32  # addmm saves its input; the weight is not an activation


def test_sgd_momentum_step_traffic_by_hand():
    """Steady-state SGD with momentum: buf = m*buf + g; p -= lr*buf -> 32 bytes per fp32 param."""
    model = Fn(lambda s, x: s.mods[0](x), nn.Linear(64, 32, bias=False))
    r = fxopt.analyze(model, torch.randn(8, 64))
    opt = [c for c in r.calls if c.phase == "opt" and c.kernels]
    assert opt and all(c.op_class == "optimizer" for c in opt)
    assert sum(c.bytes_read + c.bytes_written for c in opt) == 64 * 32 * 8 * F32
    assert r.totals["optimizer_flops"] == 3 * 64 * 32


def test_eval_forward_has_no_backward():
    model = zoo.build("resnet50", tiny=True).eval()
    x = zoo.example_inputs("resnet50", 2, tiny=True)
    r = fxopt.analyze(model, x, training=False)
    assert {c.phase for c in r.calls} == {"fwd"}
    assert r.totals["matrix_flops_bwd"] == 0


def test_unknown_ops_are_counted_listed_and_warned():
    model = Fn(lambda s, x: torch.sort(x, dim=-1).values * 2)
    with pytest.warns(fxopt.UnknownOpWarning, match="sort"):
        r = fxopt.analyze(model, torch.randn(4, 8), training=False)
    assert r.unknown_ops == {"sort": 1}
    assert r.totals["unknown_ops"] == 1
    assert "UNKNOWN" in r.summary() and "sort" in r.summary()
    (srt,) = [c for c in r.calls if c.op == "sort"]
    assert srt.bytes_read == 4 * 8 * F32 and srt.kernels == 1  # never silently zero


# ---- symbolic batch ------------------------------------------------------------------------

def test_resnet50_symbolic_formula_matches_concrete_analyses():
    model, inputs = meta_model("resnet50", batch=4)
    sym = fxopt.analyze(model, inputs, dynamic_batch=True)
    assert sym.is_symbolic
    batch = sym.symbols["batch"]
    t = sym.totals
    assert isinstance(t["matrix_flops_fwd"], sympy.Expr) and t["matrix_flops_fwd"].free_symbols == {batch}
    for b in (1, 8, 64):
        _, xb = meta_model("resnet50", batch=b)
        concrete = fxopt.analyze(model, xb).totals
        assert sym.at(batch=b).totals == pytest.approx(concrete, rel=1e-9)


def test_at_rejects_unknown_symbols():
    model = Fn(lambda s, x: x * 2)
    r = fxopt.analyze(model, torch.randn(4, 8), training=False, dynamic_batch=True)
    with pytest.raises(fxopt.AnalysisError, match="batch"):
        r.at(height=3)


# ---- roll-ups, time, hardware, rendering ------------------------------------------------------

@pytest.fixture(scope="module")
def driving_report():
    return fxopt.analyze(zoo.build("driving", tiny=True), zoo.example_inputs("driving", 2, tiny=True))


@pytest.mark.parametrize("by,depth", [("node", 1), ("op", 1), ("block", 1), ("block", 3)])
def test_rollups_add_up_to_totals(driving_report, by, depth):
    rows = driving_report.rows(by, depth)
    t = driving_report.totals
    assert sum(r["time_s"] for r in rows) == pytest.approx(t["step_time_s"])
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["kernels"] for r in rows) == t["kernels"]
    assert sum(r["bytes"] for r in rows) == t["bytes"]
    times = [r["time_s"] for r in rows]
    assert times == sorted(times, reverse=True)


def test_blocks_come_from_module_paths(driving_report):
    blocks = {r["block"] for r in driving_report.rows("block", 1)}
    assert {"backbone", "fpn", "bev_layers", "det_head", "(optimizer)"} <= blocks
    deep = {r["block"] for r in driving_report.rows("block", 2)}
    assert any(b.startswith("bev_layers.0") for b in deep)


def test_node_rows_name_the_users_source_line(driving_report):
    rows = driving_report.rows("node")
    matmuls = [r for r in rows if r["op"] == "matmul"]
    assert matmuls and all("zoo.py" in r["source"] for r in matmuls)
    assert all(r["bound"] in ("compute", "memory", "launch") for r in rows if r["kernels"])


def _tile_time(m, n, k, peak, sms, p):
    """The tile/wave formula worked by hand for a GEMM too big to split K: each tile shape's whole
    tiles in waves over the SMs, each wave one tile's K loop at the tile's share of one SM's peak."""
    best = None
    for tm, tn in p["tiles"]:
        ctas = max(1, 128 * 256 // (tm * tn))
        waves = math.ceil(math.ceil(m / tm) * math.ceil(n / tn) / (sms * ctas))
        rate = peak / sms * p["eff"] * (1 - p["reuse"] * (1 / tm + 1 / tn)) * k / (k + p["k_half"])
        t = waves * ctas * 2 * tm * tn * k / rate
        best = t if best is None else min(best, t)
    return best


def test_big_gemm_time_by_hand():
    hw = load_hardware("h100")
    model = Fn(lambda s, a, b: a @ b)
    n = 4096
    a = torch.empty(n, n, device="meta", dtype=torch.bfloat16)
    r = fxopt.analyze(model, (a, a), training=False, hardware=hw)
    (mm,) = calls_of(r)
    p = hw.kernel_param("matrix")["bf16"]
    gpu = _tile_time(n, n, n, hw.tensor_flops["bf16"], hw.sm_count, p) + p["latency_s"]
    assert r.totals["gpu_time_s"] == pytest.approx(gpu)
    # one kernel: the GPU first waits for the host to dispatch it
    assert r.totals["step_time_s"] == pytest.approx(gpu + hw.kernel_param("host")["fwd"])
    assert 700e12 < 2 * n**3 / (gpu - p["latency_s"]) < 850e12   # H100 bf16 at 8192^3: 798 TFLOP/s measured
    assert r.rows("node")[0]["bound"] == "compute"


def test_fp32_gemm_uses_tf32_only_when_allowed():
    model = Fn(lambda s, a, b: a @ b)
    a = torch.empty(2048, 2048, device="meta")
    slow = fxopt.analyze(model, (a, a), training=False, precision=Precision(tf32_matmul=False))
    fast = fxopt.analyze(model, (a, a), training=False, precision=Precision(tf32_matmul=True))
    hw = load_hardware("h100")
    flops = 2 * 2048**3
    # FFMA: at most the 67 TFLOP/s vector peak and at least half of it; TF32: well above FFMA's peak
    assert flops / hw.vector_flops["fp32"] < slow.totals["gpu_time_s"] < 2 * flops / hw.vector_flops["fp32"]
    assert flops / hw.tensor_flops["tf32"] < fast.totals["gpu_time_s"] < flops / hw.vector_flops["fp32"]


def test_dtype_option_halves_bytes_of_a_memory_bound_op():
    model = Fn(lambda s, x: torch.relu(x))
    x = torch.randn(64, 1024)
    f32 = fxopt.analyze(model, x, training=False).totals["bytes"]
    bf16 = fxopt.analyze(model, x, training=False, dtype="bf16").totals["bytes"]
    assert bf16 * 2 == f32


def test_hardware_presets_and_profiles(tmp_path):
    assert {"h100", "h200", "a100"} <= set(fxopt.cost_models.presets())
    h200 = load_hardware("h200")
    assert h200.memory_bandwidth > load_hardware("h100").memory_bandwidth
    with pytest.raises(HardwareError, match="known presets"):
        load_hardware("tpu9")
    profile = tmp_path / "mine.json"
    profile.write_text(json.dumps({"name": "mine", "memory_bandwidth": 1e12, "tensor_flops": {"bf16": 1e15},
                                   "vector_flops": {"fp32": 1e13}}))
    assert load_hardware(str(profile)).memory_bandwidth == 1e12
    profile.write_text(json.dumps({"name": "broken"}))
    with pytest.raises(HardwareError, match="lacks"):
        load_hardware(str(profile))


def test_json_schema_is_stable(driving_report):
    data = json.loads(driving_report.to_json())
    assert data["schema"] == "fxopt.graph_report/1"
    assert set(data["totals"]) == {"matrix_flops_fwd", "matrix_flops_bwd", "other_flops_fwd", "other_flops_bwd",
                                   "optimizer_flops", "bytes", "min_bytes", "kernels", "step_time_s", "gpu_time_s",
                                   "compute_bound_s", "memory_bound_s", "latency_s", "host_bound_s", "fwd_time_s",
                                   "bwd_time_s", "optimizer_time_s", "mfu", "params", "activation_bytes",
                                   "unknown_ops"}
    node_keys = {"node", "op", "op_class", "module", "source", "fwd_flops", "bwd_flops", "matrix_flops",
                 "bytes_read", "bytes_written", "extra_bytes", "bytes", "ai", "kernels", "time_s", "fwd_time_s",
                 "bwd_time_s", "opt_time_s", "compute_s", "memory_s", "latency_s", "host_bound_s", "bound", "share",
                 "saved_bytes"}
    assert data["optimizer"] == "sgd" and data["profile"].startswith("preset h100")
    # the time split adds up to the step
    t = data["totals"]
    assert t["compute_bound_s"] + t["memory_bound_s"] + t["latency_s"] + t["host_bound_s"] == \
        pytest.approx(t["step_time_s"])
    assert set(data["nodes"][0]) == node_keys
    assert {"op", "time_s", "share"} <= set(data["op_classes"][0])


def test_tables_and_markdown_render(driving_report):
    assert "share %" in driving_report.table(top=5)
    md = driving_report.to_markdown(by="block")
    assert "| block" in md and "predicted step" in md


def test_analyze_never_changes_the_model():
    model = zoo.build("resnet50", tiny=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fxopt.analyze(model, zoo.example_inputs("resnet50", 2, tiny=True))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_conv_time_depends_on_its_memory_layout():
    """Dense bf16 convs reach the roofline in NHWC and are NHWC_SPEEDUP times slower in NCHW;
    depthwise convs are the other way round (cost_models.layout)."""
    from dataclasses import replace

    from fxopt.cost_models.layout import NHWC_SPEEDUP
    from fxopt.report import time_factor

    def conv_time(groups, channels_last):
        model = Fn(lambda s, x: s.mods[0](x), nn.Conv2d(256, 256, 3, padding=1, groups=groups, bias=False))
        with torch.device("meta"):
            model = model.to(torch.bfloat16)
        x = torch.empty(64, 256, 56, 56, device="meta", dtype=torch.bfloat16)
        if channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        r = fxopt.analyze(model, x, training=False)
        (conv,) = calls_of(r)
        return r.totals["step_time_s"], conv

    hw = load_hardware("h100")
    factor = lambda c: time_factor(c, hw)
    nchw, conv = conv_time(1, False)
    nhwc, conv_cl = conv_time(1, True)
    assert (factor(conv), factor(conv_cl)) == (NHWC_SPEEDUP["dense"]["16bit"], 1.0)
    # compute-bound in both layouts: the NCHW conv's kernel time is its NHWC time x the speedup
    fixed = hw.kernel_param("matrix")["bf16"]["latency_s"] + hw.kernel_param("host")["fwd"]
    assert nchw - fixed == pytest.approx((nhwc - fixed) * NHWC_SPEEDUP["dense"]["16bit"])
    _, dw = conv_time(256, False)
    _, dw_cl = conv_time(256, True)
    assert factor(dw) == 1.0 and factor(dw_cl) == pytest.approx(1 / NHWC_SPEEDUP["depthwise"]["16bit"])
    # a measured profile's NHWC table replaces the priors: here NCHW dense convs are as fast as NHWC
    measured = replace(hw, nhwc_speedup={"dense": {"16bit": 1.0}})
    assert time_factor(conv, measured) == 1.0 and time_factor(dw, measured) == 1.0
