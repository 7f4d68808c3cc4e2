"""The shape-aware kernel-time model (cost_models/kernels.py), traffic rules and the fit, each
checked against a case worked out by hand."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest

import fxopt
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fxopt.cost_models import fit, kernels, load_hardware
from fxopt.cost_models.ops import cost_call
from fxopt.cost_models.roofline import Precision, call_time

H100 = load_hardware("h100")
ONE_TILE = {"eff": 0.8, "k_half": 0.0, "reuse": 0.0, "latency_s": 0.0, "reduce_bw": 5e12, "align": 8, "misaligned": 0.5,
            "tiles": [[128, 256]]}


def hand_gemm_time(b, m, n, k, peak, sms, eff=0.8, tm=128, tn=256):
    """Whole tiles, waves over the SMs, each tile's K loop at ``eff`` of one SM's peak."""
    tiles = b * math.ceil(m / tm) * math.ceil(n / tn)
    waves = math.ceil(tiles / sms)
    return waves * 2 * tm * tn * k / (peak / sms * eff)


def test_tile_and_wave_count_by_hand():
    peak = H100.tensor_flops["bf16"]
    c = kernels.gemm_choice(1, 4096, 4096, 4096, peak, 132, ONE_TILE)
    assert c.tiles == 32 * 16 and c.waves == 4 and c.split_k == 1     # 512 tiles over 132 SMs
    assert c.time_s == pytest.approx(hand_gemm_time(1, 4096, 4096, 4096, peak, 132))
    # efficiency = useful FLOPs / (time x peak): 512 tiles in 4 waves of 132 -> 512/528 of eff
    assert c.efficiency == pytest.approx(0.8 * 512 / 528)


def test_wave_quantization_doubles_time_for_one_extra_tile():
    peak = H100.tensor_flops["bf16"]
    full = kernels.gemm_choice(1, 128 * 132, 256, 1024, peak, 132, ONE_TILE)   # 132 tiles: one wave
    spill = kernels.gemm_choice(1, 128 * 133, 256, 1024, peak, 132, ONE_TILE)  # 133 tiles: two waves
    assert (full.waves, spill.waves) == (1, 2)
    assert spill.time_s == pytest.approx(2 * full.time_s)


def test_partial_tiles_cost_whole_tiles():
    peak = H100.tensor_flops["bf16"]
    exact = kernels.gemm_choice(1, 1280, 256, 128, peak, 132, ONE_TILE)   # K too short to split
    ragged = kernels.gemm_choice(1, 1281, 256, 128, peak, 132, ONE_TILE)  # one more row: 11 tiles, not 10
    assert ragged.tiles == exact.tiles + 1 and ragged.time_s == pytest.approx(exact.time_s)


def test_k_pipeline_efficiency_falls_for_small_k():
    p = {**ONE_TILE, "k_half": 64.0}
    peak = H100.tensor_flops["bf16"]
    long_k = kernels.gemm_choice(1, 4096, 4096, 4096, peak, 132, p)
    short_k = kernels.gemm_choice(1, 4096, 4096, 64, peak, 132, p)
    assert long_k.efficiency / short_k.efficiency == pytest.approx((4096 / 4160) / (64 / 128))


def test_split_k_for_long_k_small_output():
    """A weight-gradient GEMM (small output, huge K) fills the SMs only by splitting K."""
    p = {**ONE_TILE, "k_half": 64.0}
    c = kernels.gemm_choice(1, 256, 256, 1 << 20, H100.tensor_flops["bf16"], 132, p)
    assert c.split_k > 1 and c.tiles == 2
    k = 1 << 20   # unsplit: one wave of 2 tiles, each running the whole K loop on one SM
    unsplit = 2 * 128 * 256 * k / (H100.tensor_flops["bf16"] / 132 * 0.8 * k / (k + 64))
    assert c.time_s < unsplit / 4


def test_misaligned_tensor_core_gemm_is_slower():
    peak = H100.tensor_flops["bf16"]
    aligned = kernels.gemm_choice(1, 4096, 4096, 4096, peak, 132, ONE_TILE)
    odd = kernels.gemm_choice(1, 4096, 4096, 4093, peak, 132, ONE_TILE)
    assert odd.time_s == pytest.approx(aligned.time_s / 0.5 * 4093 / 4096)


def test_memory_ramp_and_latency_by_hand():
    mp = H100.kernel_param("memory")
    bw = H100.memory_bandwidth * mp["efficiency"]["pointwise"]
    r = mp["ramp_bytes"]
    assert kernels.memory_time("pointwise", r, H100) == pytest.approx(2 * r / bw)  # half the bandwidth
    big = 1 << 30
    assert kernels.memory_time("pointwise", big, H100) == pytest.approx((big + r) / bw)
    t = call_time("pointwise", "float32", 0, r, 1, H100)
    assert t.total_s == pytest.approx(2 * r / bw + mp["latency_s"])


def test_critical_path_host_bound_by_hand():
    step, idle, per = kernels.critical_path([1.0, 1.0, 1.0], [2.0, 0.1, 0.1])
    assert (step, idle, per) == (5.0, 2.0, [2.0, 0.0, 0.0])
    step, idle, per = kernels.critical_path([0.1, 0.1, 0.1], [0.5, 0.5, 0.5])   # host-bound throughout
    assert step == pytest.approx(1.6) and per == pytest.approx([0.5, 0.4, 0.4])


# ---- real traffic --------------------------------------------------------------------------

def _call(func, *args):
    with FakeTensorMode():
        args = tuple(torch.empty(*a) if isinstance(a, tuple) else a for a in args)
        out = func(*args)
        return cost_call(func, args, {}, out)


def test_batch_norm_training_reads_input_twice():
    n, c, h = 8, 16, 10
    x_bytes = n * c * h * h * 4
    train = _call(torch.ops.aten._native_batch_norm_legit_functional.default, (n, c, h, h), (c,), (c,), (c,), (c,),
                  True, 0.1, 1e-5)
    ev = _call(torch.ops.aten._native_batch_norm_legit_no_training.default, (n, c, h, h), (c,), (c,), (c,), (c,),
               0.1, 1e-5)
    assert train.extra_bytes == x_bytes and train.kernels == 2 and "twice" in train.traffic
    assert ev.extra_bytes == 0 and ev.kernels == 1
    # minimum traffic: x, weight, bias, running mean/var read once
    assert train.bytes_read == 2 * x_bytes + 4 * c * 4


def test_softmax_backward_long_rows_rereads():
    rows, cols = 4, 32768                      # 128 KB rows: beyond the shared-memory kernel
    c = _call(torch.ops.aten._softmax_backward_data.default, (rows, cols), (rows, cols), -1, torch.float32)
    assert c.extra_bytes == 2 * rows * cols * 4
    short = _call(torch.ops.aten._softmax_backward_data.default, (rows, 1024), (rows, 1024), -1, torch.float32)
    assert short.extra_bytes == 0 and short.bytes_read == 2 * rows * 1024 * 4


def test_layer_norm_long_rows_read_twice():
    c = _call(torch.ops.aten.native_layer_norm.default, (64, 8192), [8192], (8192,), (8192,), 1e-5)
    assert c.extra_bytes == 64 * 8192 * 4
    c = _call(torch.ops.aten.native_layer_norm.default, (64, 1024), [1024], (1024,), (1024,), 1e-5)
    assert c.extra_bytes == 0


def test_conv_gemm_dims_and_depthwise_kind():
    x, w = (2, 16, 8, 8), (32, 16, 3, 3)
    c = _call(torch.ops.aten.convolution.default, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    assert c.kind == "conv" and c.gemms == ((1, 2 * 8 * 8, 32, 16 * 9),)
    dw = _call(torch.ops.aten.convolution.default, x, (16, 1, 3, 3), None, [1, 1], [1, 1], [1, 1], False,
               [0, 0], 16)
    assert dw.kind == "depthwise"
    # the depthwise conv is priced as memory-bound at the depthwise efficiency
    t = call_time(dw.op_class, dw.dtype, dw.flops, dw.bytes_read + dw.bytes_written, 1, H100, kind=dw.kind)
    assert t.memory_s == pytest.approx(kernels.memory_time("depthwise", dw.bytes_read + dw.bytes_written, H100))


def test_conv_backward_gemms():
    go, x, w = (2, 32, 8, 8), (2, 16, 8, 8), (32, 16, 3, 3)
    c = _call(torch.ops.aten.convolution_backward.default, go, x, w, None, [1, 1], [1, 1], [1, 1], False,
              [0, 0], 1, [True, True, False])
    # grad input: rows = input pixels, K = C_out x 3x3; grad weight: rows = C_out, K = output pixels
    assert c.gemms == ((1, 128, 16, 32 * 9), (1, 32, 16 * 9, 128)) and c.kernels == 2


# ---- fitting -------------------------------------------------------------------------------

def _synthetic(hw, rows):
    return [fit.Measurement(op, dt, dims, fit.predict(fit.Measurement(op, dt, dims, 1.0), hw)) for op, dt, dims in rows]


def test_fit_recovers_known_matrix_parameters():
    truth = {"eff": 0.7, "k_half": 80.0, "reuse": 6.0, "latency_s": 5e-6}
    hw_true = fit.with_params(H100, "matrix", truth, "fp32")
    shapes = [(1, m, n, k) for m in (64, 512, 4096) for n in (128, 1024, 3000) for k in (32, 256, 2048)]
    rows = _synthetic(hw_true, [("mm", "float32", s) for s in shapes])
    got = fit.fit_matrix(rows, H100, "fp32", iters=300, names=list(truth))
    for name, value in truth.items():
        assert got[name] == pytest.approx(value, rel=0.1), name
    assert fit.mape(rows, fit.with_params(H100, "matrix", got, "fp32")) < 0.01


def test_fit_recovers_memory_efficiencies():
    truth = {"latency_s": 3e-6, "ramp_bytes": 2e6, "efficiency": {"pointwise": 0.6, "norm": 0.5, "softmax": 0.55}}
    hw_true = fit.with_params(H100, "memory", truth)
    sizes = [(r, c) for r in (1, 64, 4096, 65536) for c in (256, 1024)]
    rows = _synthetic(hw_true, [(op, "float32", s) for op in ("add", "relu", "layer_norm", "softmax") for s in sizes])
    got = fit.fit_memory(rows, H100, iters=200)
    for cls, v in truth["efficiency"].items():
        assert got["efficiency"][cls] == pytest.approx(v, rel=0.05), cls
    assert got["latency_s"] == pytest.approx(3e-6, rel=0.15)


def test_split_is_by_shape_and_stable():
    rows = [fit.Measurement("mm", "float32", (1, m, 64, 64), 1.0) for m in range(1, 200)]
    a, b = fit.split(rows)
    assert a and b and not {m.dims for m in a} & {m.dims for m in b}
    assert fit.split(rows) == (a, b)


def test_import_rejects_bad_columns(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("op,dtype,b,m,n,k,latency_ms\nmm,float32,1,64,abc,64,0.1\n")
    with pytest.raises(fit.ProfileImportError, match="'n'"):
        fit.read_table(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("op,b,m,n,k,seconds\nmm,1,2,3,4,0.1\n")
    with pytest.raises(fit.ProfileImportError, match="dtype"):
        fit.read_table(missing)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("op,dtype,rows,cols,seconds\nconv9,float32,2,3,0.1\n")
    with pytest.raises(fit.ProfileImportError, match="conv9"):
        fit.read_table(unknown)


def test_import_profile_round_trips(tmp_path):
    from fxopt.measure.calibrate import import_table
    table = tmp_path / "t.csv"
    truth = fit.with_params(H100, "matrix", {"eff": 0.6}, "bf16")
    lines = ["op,dtype,b,m,n,k,seconds,device"]
    for m in (256, 1024, 4096):
        for k in (64, 1024):
            meas = fit.Measurement("mm", "bfloat16", (1, m, m, k), 1.0)
            lines.append(f"mm,bfloat16,1,{m},{m},{k},{fit.predict(meas, truth)},gpu0")
    table.write_text("\n".join(lines) + "\n")
    out = tmp_path / "p.json"
    prof = import_table(table, device="gpu0", out=out)
    hw = load_hardware(out)
    assert hw.kernel_param("matrix")["bf16"] == {**H100.kernel_param("matrix")["bf16"],
                                                 **prof["kernel_model"]["matrix"]["bf16"]}
    assert "t.csv" in hw.kernel_model["source"]
    assert prof["measured"]["fit_mape"]["bf16 gemm"] < 0.1


# ---- one model everywhere ----------------------------------------------------------------

def test_report_times_are_the_kernel_model():
    import fxopt
    from fxopt.cost_models.roofline import regime
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    r = fxopt.analyze(model, torch.randn(32, 64), precision=Precision(False, False))
    mm = [(c, t) for c, t in zip(r.calls, r.call_times) if c.op == "addmm" and c.phase == "fwd"]
    c, t = mm[0]
    assert c.gemms == ((1, 32, 256, 64),)
    key, reg = regime(c.op_class, c.dtype, r.precision)
    choice = kernels.gemm_choice(1, 32, 256, 64, H100.matrix_peak(key), H100.sm_count,
                                 H100.kernel_param("matrix")[reg])
    assert t.compute_s == pytest.approx(choice.time_s)
    assert r.totals["step_time_s"] == pytest.approx(sum(float(x.total_s) for x in r.call_times)
                                                    + r.totals["host_bound_s"])
    assert r.totals["host_bound_s"] > 0     # a tiny model: the GPU waits on eager dispatch


def test_symbolic_report_stays_a_formula():
    import fxopt
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    sym = fxopt.analyze(model, torch.randn(4, 64), dynamic_batch=True)
    assert sym.is_symbolic and sym.totals["step_time_s"].free_symbols
    at = sym.at(batch=64)
    conc = fxopt.analyze(model, torch.randn(64, 64))
    # the concretized formula prices the same kernels (host path aside: a symbolic step is the GPU's sum)
    assert float(at.totals["gpu_time_s"]) == pytest.approx(conc.totals["gpu_time_s"], rel=1e-6)


def test_norm_of_a_permuted_view_pays_the_contiguous_copy():
    """ConvNeXt's layer norm over NCHW channels: ATen copies the permuted input first."""
    with FakeTensorMode():
        x = torch.empty(2, 16, 8, 8).permute(0, 2, 3, 1)
        args = (x, [16], torch.empty(16), torch.empty(16), 1e-6)
        c = cost_call(torch.ops.aten.native_layer_norm.default, args, {},
                      torch.ops.aten.native_layer_norm.default(*args))
    nbytes = 2 * 16 * 8 * 8 * 4
    assert c.extra_bytes == 2 * nbytes and c.kernels == 2 and "strided" in c.traffic


def test_layer_norm_backward_two_kernels_and_rereads():
    rows, cols = 64, 1024
    with FakeTensorMode():
        go, x = torch.empty(rows, cols), torch.empty(rows, cols)
        mean, rstd, w = torch.empty(rows, 1), torch.empty(rows, 1), torch.empty(cols)
        args = (go, x, [cols], mean, rstd, w, w, [True, True, True])
        out = torch.ops.aten.native_layer_norm_backward.default(*args)
        c = cost_call(torch.ops.aten.native_layer_norm_backward.default, args, {}, out)
    assert c.kernels == 2 and c.extra_bytes == 2 * rows * cols * 4   # dgamma/dbeta kernel re-reads dy and x


def test_transposed_conv_gemm_dims():
    """A transposed conv's weight is [C_in, C_out/g, k, k]: N = C_out, K = C_in x k x k."""
    x, w = (2, 16, 8, 8), (16, 8, 2, 2)
    c = _call(torch.ops.aten.convolution.default, x, w, None, [2, 2], [0, 0], [1, 1], True, [0, 0], 1)
    assert c.kind == "conv" and c.gemms == ((1, 2 * 16 * 16, 8, 16 * 4),)


def test_activation_checkpointing_is_recomputed_and_saves_less():
    """A checkpointed block: its forward kernels run again in the backward, its activations are
    not saved (torch.utils.checkpoint, non-reentrant)."""
    import torch.utils.checkpoint as ckpt

    class Net(torch.nn.Module):
        def __init__(self, checkpointed):
            super().__init__()
            self.block = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
            self.head, self.checkpointed = torch.nn.Linear(64, 8), checkpointed

        def forward(self, x):
            y = ckpt.checkpoint(self.block, x, use_reentrant=False) if self.checkpointed else self.block(x)
            return self.head(y)

    torch.manual_seed(0)
    x = torch.randn(32, 64)
    plain = fxopt.analyze(Net(False), x)
    cp = fxopt.analyze(Net(True), x)
    fwd = lambda r: [c for c in r.calls if c.phase == "fwd"]
    block_fwd = [c for c in fwd(cp) if c.kernels and c.node in {n for n, info in cp.nodes.items()
                                                               if info.module.startswith("block")}]
    assert block_fwd and len(fwd(cp)) == len(fwd(plain))
    # the block's forward kernels appear once more, in the backward
    assert len([c for c in cp.calls if c.phase == "bwd"]) == len([c for c in plain.calls if c.phase == "bwd"]) + \
        len([c for c in fwd(cp) if c.node in {b.node for b in block_fwd}])
    assert cp.totals["activation_bytes"] < plain.totals["activation_bytes"]
    assert cp.totals["bwd_time_s"] > plain.totals["bwd_time_s"]
