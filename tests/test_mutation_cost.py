"""Tests that kill mutants the cosmic-ray shards of cost_models/* left alive (issue 20).

Each test is named after the module it pins (``test_kernels_*``, ``test_ops_*``, ...): the
mutation shards select them with ``-k <module>``. Every expected value is worked out by hand
from the model's documented formula on round numbers (a 1.32 PFLOP/s device with 132 SMs is
10 TFLOP/s per SM), never by calling the code under test a second way.
"""
from __future__ import annotations

import math

import pytest
import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fxopt.cost_models import kernels
from fxopt.cost_models.hardware import Hardware
from fxopt.cost_models.ops import cost_call

P, SMS = 1.32e15, 132          # 1e13 FLOP/s per SM
TILE = 2 * 128 * 256           # FLOPs of one 128x256 tile per unit of K
PLAIN = {"eff": 1.0, "k_half": 0.0, "reuse": 0.0, "latency_s": 3e-6, "reduce_bw": 1e13, "align": 1,
         "misaligned": 1.0, "tiles": [[128, 256]]}


def _hw(**kernel_model) -> Hardware:
    """A round-number device: 1 TB/s, bf16 1.32 PFLOP/s on 132 SMs, fp32 vector 1e13."""
    return Hardware(name="t", description="", memory_bandwidth=1e12,
                    tensor_flops={"bf16": P, "tf32": P / 2, "fp16": P},
                    vector_flops={"fp32": 1e13, "bf16": 2e13}, sm_count=SMS, kernel_model=kernel_model)


# ---- kernels.py: the tile / wave / split-K model ---------------------------------------------

def test_kernels_split_k_up_to_a_128_deep_slice_and_partials_summed_through_memory():
    """K = 1024: splits 1..8 keep slices >= 128 deep (8 -> exactly 128), 12 would not. Time of
    split s: K/s x one tile's FLOPs at 1e13 + the fp32 partials (2 s m n 4 bytes) at 1e13 B/s;
    s = 8 is the fastest (1.049 us vs 1.282 us for s = 6)."""
    c = kernels.gemm_choice(1, 128, 256, 1024, P, SMS, PLAIN)
    assert c.split_k == 8 and c.tiles == 1 and c.waves == 1
    assert c.time_s == pytest.approx(TILE * 128 / 1e13 + 2 * 8 * 128 * 256 * 4 / 1e13)


@pytest.mark.parametrize("split", [2, 3, 4, 6, 8, 12, 16])
def test_kernels_every_split_of_the_list_is_tried(split):
    """K = 128 x s: the s-way split runs 128-deep slices, the next one would be shallower; the
    partials cost s x 2.6 ns, far less than the K loop saved, so s is the choice."""
    c = kernels.gemm_choice(1, 128, 256, 128 * split, P, SMS, PLAIN)
    assert c.split_k == split
    assert c.time_s == pytest.approx(TILE * 128 / 1e13 + 2 * split * 128 * 256 * 4 / 1e13)


def test_kernels_no_split_when_k_is_short_and_no_partials_then():
    c = kernels.gemm_choice(1, 128, 256, 128, P, SMS, PLAIN)     # a 2-way split would be 64 deep
    assert c.split_k == 1 and c.time_s == pytest.approx(TILE * 128 / 1e13)
    assert c.efficiency == pytest.approx(1 / SMS)                 # one tile busy on one SM of 132


def test_kernels_split_stops_when_the_splits_need_a_second_wave():
    """3 tiles on 4 SMs: a 2-way split needs 2 waves of K/2 (no faster than 1 wave of K, plus the
    partials), a 3-way split 3 waves of K/3; 4-way and up are not tried (3 x 2 >= 4 slots), so the
    GEMM runs unsplit: one wave of the whole K loop."""
    c = kernels.gemm_choice(3, 128, 256, 4096, 4e13, 4, PLAIN)
    assert (c.split_k, c.tiles, c.waves) == (1, 3, 1)
    assert c.time_s == pytest.approx(TILE * 4096 / 1e13)


def test_kernels_small_tiles_share_an_sm():
    """A 64x64 tile: 128*256 / (64*64) = 8 CTAs per SM, so one wave has 8 x 132 slots and a lone
    tile's wave lasts 8 tile-times (the SM's rate is shared by its 8 CTAs)."""
    p = {**PLAIN, "tiles": [[64, 64]]}
    c = kernels.gemm_choice(1, 64, 64, 64, P, SMS, p)
    assert (c.tile, c.slots, c.waves, c.split_k) == ((64, 64), 8 * SMS, 1, 1)
    assert c.time_s == pytest.approx(8 * 2 * 64 * 64 * 64 / 1e13)


def test_kernels_efficiency_terms_multiply():
    """eff 0.5 x tile reuse (1 - 8 (1/128 + 1/256)) = 0.90625 x K pipeline 128 / (128 + 32) = 0.8."""
    p = {**PLAIN, "eff": 0.5, "reuse": 8.0, "k_half": 32.0}
    c = kernels.gemm_choice(1, 128, 256, 128, P, SMS, p)
    assert c.time_s == pytest.approx(TILE * 128 / (1e13 * 0.5 * 0.90625 * 0.8))
    floor = kernels.gemm_choice(1, 128, 256, 128, P, SMS, {**PLAIN, "reuse": 100.0})   # 1 - 100 x 0.0117 < 0
    assert floor.time_s == pytest.approx(TILE * 128 / (1e13 * 0.05))


def test_kernels_misalignment_of_n_or_k_halves_tensor_core_rate_only_when_aligned_is_required():
    p = {**PLAIN, "align": 8, "misaligned": 0.5}
    odd_n = kernels.gemm_choice(1, 128, 250, 128, P, SMS, p)     # N % 8 != 0, K aligned
    assert odd_n.time_s == pytest.approx(TILE * 128 / (1e13 * 0.5))
    even = kernels.gemm_choice(1, 128, 256, 128, P, SMS, p)
    assert even.time_s == pytest.approx(TILE * 128 / 1e13)
    ffma = kernels.gemm_choice(1, 128, 256, 127, P, SMS, {**PLAIN, "align": 1, "misaligned": 0.5})
    assert ffma.time_s == pytest.approx(TILE * 127 / 1e13)      # align 1: no K/N is misaligned


def test_kernels_batch_multiplies_tiles_and_waves():
    """b = 3 tiles on 2 SMs: two waves."""
    c = kernels.gemm_choice(3, 128, 256, 128, 2e13, 2, PLAIN)
    assert (c.tiles, c.waves) == (3, 2) and c.time_s == pytest.approx(2 * TILE * 128 / 1e13)


def test_kernels_sustained_efficiency_takes_the_biggest_tile():
    p = {**PLAIN, "eff": 0.5, "reuse": 8.0, "k_half": 96.0, "tiles": [[64, 64], [128, 256], [128, 128]]}
    assert kernels.sustained_efficiency(p) == pytest.approx(0.5 * 0.90625 * 4096 / 4192)
    assert kernels.sustained_efficiency(p, k=96) == pytest.approx(0.5 * 0.90625 * 0.5)


MEM = {"latency_s": 2e-6, "ramp_bytes": 1e6, "l2_speedup": 2.0,
       "efficiency": {"pointwise": 0.5, "memory": 0.25}}


def test_kernels_memory_time_ramp_l2_and_class_fallback():
    hw = _hw(memory=MEM)
    assert kernels.memory_time("pointwise", 0, hw) == 0.0
    # 1 MB = the ramp: half of 0.5 x 1 TB/s
    assert kernels.memory_time("pointwise", 1e6, hw) == pytest.approx(4e-6)
    assert kernels.memory_time("pointwise", 1e6, hw, l2_resident=True) == pytest.approx(2e-6)
    # a class the table lacks streams at the "memory" class's efficiency
    assert kernels.memory_time("no-such-class", 1e6, hw) == pytest.approx(1e6 / (1e12 * 0.25 * 0.5))


def test_kernels_symbolic_bytes_ramp_at_the_symbol_hint():
    """Symbols take 64 for the ramp: s * 15625 bytes is 1 MB there, the ramp's midpoint."""
    s = sympy.Symbol("s", positive=True)
    t = kernels.memory_time("pointwise", s * 15625, _hw(memory=MEM))
    assert isinstance(t, sympy.Basic)
    assert float(t.subs(s, 64)) == pytest.approx(4e-6)
    assert float(t.subs(s, 128)) == pytest.approx(8e-6)   # same ramp (taken at the hint), twice the bytes


def test_kernels_matrix_time_with_and_without_shapes():
    hw = _hw(matrix={"bf16": PLAIN}, kind_eff={"conv": 0.5})
    assert kernels.matrix_time("conv", "bf16", P, 0, (), hw) == (0.0, "")
    t, why = kernels.matrix_time("conv", "bf16", P, 1e12, (), hw)   # sustained eff 1 x kind 0.5
    assert t == pytest.approx(1e12 / (P * 0.5)) and "no shape" in why
    # two GEMMs, one tile each (b = 2: two tiles in one wave): each takes one tile-time
    flops = 3 * TILE * 128
    t, why = kernels.matrix_time("conv", "bf16", P, flops, ((1, 128, 256, 128), (2, 128, 256, 128)), hw)
    assert t == pytest.approx(2 * TILE * 128 / 1e13 / 0.5)
    assert "128x256x128 (x2)" in why and "1 wave(s)" in why


def test_kernels_kernel_time_terms_by_hand():
    hw = _hw(matrix={"bf16": PLAIN}, memory=MEM)
    assert kernels.kernel_time("pointwise", None, None, 1e13, 0, 0, 0, (), hw) == \
        kernels.KernelTime(0.0, 0.0, 0.0, "no kernel")
    m = kernels.kernel_time("matmul", "gemm", "bf16", P, TILE * 128, 1e6, 2, ((1, 128, 256, 128),), hw, factor=1.5)
    assert m.compute_s == pytest.approx(1.5 * TILE * 128 / 1e13)
    assert m.memory_s == pytest.approx(1e6 / (1e12 * 0.25 * 0.5))      # operands at the "memory" class
    assert m.latency_s == pytest.approx(2 * 3e-6)
    v = kernels.kernel_time("pointwise", None, None, 1e13, 1e9, 1e6, 3, (), hw, l2_resident=True)
    assert (v.compute_s, v.memory_s, v.latency_s) == pytest.approx((1e-4, 2e-6, 3 * 2e-6))
    assert v.total_s == pytest.approx(1e-4 + 6e-6)


def test_kernels_host_time_per_phase_and_symbolic_total():
    hw = _hw()
    assert kernels.host_time("bwd", 3, hw) == pytest.approx(3 * 4e-6)
    assert kernels.host_time("opt", 3, hw) == pytest.approx(3 * 2e-6)
    assert kernels.host_time("other", 3, hw) == pytest.approx(3 * 6e-6)   # unknown phase: forward's cost
    a = sympy.Symbol("a", positive=True)
    total = kernels.KernelTime(a, 1.0, 0.5).total_s
    assert total.subs(a, 3) == 3.5 and total.subs(a, 0.25) == 1.5


# ---- ops.py ------------------------------------------------------------------------------------

def _call(func, *args):
    with FakeTensorMode():
        args = tuple(torch.empty(*a) if isinstance(a, tuple) else a for a in args)
        return cost_call(func, args, {}, func(*args))


def test_ops_1d_conv_forward_and_backward_gemms():
    """Conv1d 4 -> 6 channels, kernel 3, length 10 -> 8: forward rows = 2 x 8 output positions,
    N = 6, K = 4 x 3; backward grad-input rows = 2 x 10 input positions, N = 4, K = 6 x 3;
    grad-weight rows 6, N = 4 x 3, K = 16 output positions."""
    f = _call(torch.ops.aten.convolution.default, (2, 4, 10), (6, 4, 3), None, [1], [0], [1], False, [0], 1)
    assert f.gemms == ((1, 16, 6, 12),)
    b = _call(torch.ops.aten.convolution_backward.default, (2, 6, 8), (2, 4, 10), (6, 4, 3), None, [1], [0], [1],
              False, [0], 1, [True, True, False])
    assert b.gemms == ((1, 20, 4, 18), (1, 6, 12, 16)) and b.kernels == 2


# ---- layout.py ---------------------------------------------------------------------------------

BF, F4 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("x,w,groups,dtype,cls", [
    ((1, 16, 4, 4), (16, 1, 3, 3), 16, F4, "depthwise"),      # groups = C_in
    ((1, 16, 4, 4), (32, 4, 3, 3), 4, F4, "grouped"),
    ((1, 4, 4, 4), (16, 4, 3, 3), 1, F4, "tiny"),             # C_in 4 < 8
    ((1, 1, 4, 4), (8, 1, 3, 3), 1, F4, "tiny"),              # one channel, one group: not depthwise
    ((1, 16, 4, 4), (4, 16, 3, 3), 1, F4, "tiny"),            # C_out 4 < 8
    ((1, 8, 4, 4), (8, 8, 3, 3), 1, F4, "dense"),             # 8 is not tiny
    ((1, 12, 4, 4), (16, 12, 3, 3), 1, BF, "unaligned"),      # 16-bit, C_in 12
    ((1, 16, 4, 4), (12, 16, 3, 3), 1, BF, "unaligned"),      # 16-bit, C_out 12
    ((1, 12, 4, 4), (16, 12, 3, 3), 1, F4, "dense"),          # fp32 does not care
    ((1, 16, 4, 4), (32, 16, 1, 1), 1, BF, "1x1"),
    ((1, 16, 4, 4), (32, 16, 1, 3), 1, BF, "dense"),          # 1x3 is not 1x1
    ((1, 2, 4, 4), (2, 1, 3, 3), 2, F4, "depthwise"),         # the smallest depthwise: 2 groups = C_in
])
def test_layout_conv_class_by_hand(x, w, groups, dtype, cls):
    from fxopt.cost_models.layout import conv_class_of
    got, why = conv_class_of(torch.empty(x, dtype=dtype), torch.empty(w, dtype=dtype), groups)
    assert got == cls and why


def test_layout_nhwc_priors_point_the_documented_way():
    """Dense and 1x1 convs are at least as fast in NHWC (cuDNN's tensor-core implicit GEMM wants it);
    tiny (padded channels), grouped and depthwise ones are slower there; every entry is a ratio > 0."""
    from fxopt.cost_models.layout import NHWC_SPEEDUP
    assert all(0 < v for row in NHWC_SPEEDUP.values() for v in row.values())
    assert all(v >= 1 for cls in ("dense", "1x1") for v in NHWC_SPEEDUP[cls].values())
    assert all(v < 1 for cls in ("tiny", "grouped", "depthwise") for v in NHWC_SPEEDUP[cls].values())
    assert all(set(row) == {"16bit", "tf32", "fp32"} for row in NHWC_SPEEDUP.values())
    # a 1x1 conv is a plain GEMM in either layout: it gains less from NHWC than a dense conv, and
    # without tensor cores (fp32 FFMA) neither gains at all
    assert all(1 <= NHWC_SPEEDUP["1x1"][p] <= NHWC_SPEEDUP["dense"][p] for p in ("16bit", "tf32", "fp32"))
    assert NHWC_SPEEDUP["dense"]["fp32"] == NHWC_SPEEDUP["1x1"]["fp32"] == 1.0


def test_layout_conv_class_reason_names_the_kernel_size():
    from fxopt.cost_models.layout import conv_class_of
    assert conv_class_of(torch.empty(1, 16, 8, 8), torch.empty(32, 16, 3, 5), 1) == ("dense", "dense 3x5 conv")


def test_layout_precision_columns_follow_cudnn_tf32():
    from fxopt.cost_models.layout import precision_key
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert [precision_key(d) for d in (BF, torch.float16, F4, torch.float64)] == ["16bit", "16bit", "tf32", "fp32"]
        torch.backends.cudnn.allow_tf32 = False
        assert precision_key(F4) == "fp32"
    finally:
        torch.backends.cudnn.allow_tf32 = before


def test_layout_factor_is_the_slower_layouts_ratio():
    from fxopt.cost_models.layout import conv_factor, layout_factor, nhwc_speedup
    assert (layout_factor(1.8, False), layout_factor(1.8, True)) == (1.8, 1.0)
    assert (layout_factor(0.8, False), layout_factor(0.8, True)) == (1.0, 1.25)
    table = {"dense": {"16bit": 2.0}}
    assert conv_factor(("dense", "16bit", False), table) == 2.0
    assert conv_factor(("dense", "16bit", True), table) == 1.0
    assert conv_factor(None, table) == 1.0
    # the priors: a dense bf16 conv is 1.8x faster in NHWC, a depthwise one 0.8x
    x = torch.empty(1, 16, 4, 4, dtype=BF)
    assert nhwc_speedup(x, torch.empty(32, 16, 3, 3, dtype=BF)) == 1.8
    assert nhwc_speedup(x, torch.empty(16, 1, 3, 3, dtype=BF), 16) == 0.8


def test_layout_is_nhwc_and_conv_layout():
    from fxopt.cost_models.layout import conv_layout, is_nhwc
    cl = torch.empty(2, 16, 4, 4).to(memory_format=torch.channels_last)
    assert is_nhwc(cl) and not is_nhwc(torch.empty(2, 16, 4, 4))
    assert not is_nhwc(torch.empty(2, 16, 1, 1).to(memory_format=torch.channels_last))   # also contiguous
    assert not is_nhwc(torch.empty(2, 16, 4))
    w = torch.empty(32, 16, 3, 3)
    assert conv_layout(torch.empty(2, 16, 4), torch.empty(32, 16, 3), 1) is None        # 1-D conv
    assert conv_layout(torch.empty(2, 16, 4, 4, dtype=torch.int32), w, 1) is None        # not floating
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert conv_layout(cl, w, 1) == ("dense", "tf32", True)
    finally:
        torch.backends.cudnn.allow_tf32 = before


# ---- roofline.py -------------------------------------------------------------------------------

@pytest.mark.parametrize("op_class,dtype,prec,expected", [
    ("matmul", "float32", (False, True), ("fp32", "fp32")),   # torch's default: FFMA matmuls
    ("conv", "float32", (False, True), ("tf32", "tf32")),     # ... and TF32 convs
    ("conv", "float32", (True, False), ("fp32", "fp32")),
    ("matmul", "float32", (True, False), ("tf32", "tf32")),
    ("matmul", None, (False, True), ("fp32", "fp32")),
    ("matmul", "bfloat16", (True, True), ("bf16", "bf16")),
    ("attention", "float16", (False, False), ("fp16", "bf16")),
    ("matmul", "float64", (True, True), ("fp64", "fp32")),     # no TF32 for doubles
    ("matmul", "float8_e4m3fn", (False, False), ("fp8", "bf16")),
    ("matmul", "int8", (False, False), ("fp32", "fp32")),
])
def test_roofline_regime_table(op_class, dtype, prec, expected):
    from fxopt.cost_models.roofline import Precision, regime
    assert regime(op_class, dtype, Precision(*prec)) == expected


def test_roofline_precision_from_torch():
    from fxopt.cost_models.roofline import Precision
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = False
        assert Precision.from_torch() == Precision(True, False)
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True
        assert Precision.from_torch() == Precision(False, True)
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def test_roofline_peak_for_is_the_regime_peak_times_a_large_gemms_efficiency():
    from fxopt.cost_models.roofline import Precision, peak_for
    hw = _hw(matrix={"bf16": {**PLAIN, "k_half": 4096.0}}, kind_eff={"conv": 0.5})   # K 4096: half the rate
    assert peak_for("matmul", "bfloat16", hw, Precision()) == pytest.approx(P * 0.5)
    assert peak_for("conv", "bfloat16", hw, Precision()) == pytest.approx(P * 0.25)
    assert peak_for("pointwise", "bfloat16", hw, Precision()) == 2e13            # the vector peak
    assert peak_for("pointwise", None, hw, Precision()) == 1e13
    assert peak_for("pointwise", "float8_e5m2", hw, Precision()) == 1e13         # no fp8 vector peak: fp32's


def test_roofline_call_time_routes_by_class_kind_and_precision():
    from fxopt.cost_models.roofline import Precision, call_time
    hw = _hw(matrix={"tf32": PLAIN, "fp32": PLAIN, "bf16": PLAIN}, kind_eff={"conv": 0.5}, memory=MEM)
    g = ((1, 128, 256, 128),)
    tile_s = TILE * 128 / 1e13     # one tile at the bf16 peak's share of one SM
    conv = call_time("conv", "float32", TILE * 128, 0, 1, hw, gemms=g)          # TF32 (P/2), conv kind 0.5
    assert conv.compute_s == pytest.approx(tile_s * 2 / 0.5) and conv.latency_s == pytest.approx(3e-6)
    ffma = call_time("conv", "float32", TILE * 128, 0, 1, hw, Precision(tf32_conv=False), gemms=g)
    assert ffma.compute_s == pytest.approx(TILE * 128 / (1e13 / SMS) / 0.5)    # the fp32 vector peak
    gemm = call_time("conv", "bfloat16", TILE * 128, 0, 1, hw, gemms=g, kind="gemm", factor=2.0)
    assert gemm.compute_s == pytest.approx(2 * tile_s)
    dw = call_time("conv", "bfloat16", 1e9, 1e6, 1, hw, kind="depthwise")       # memory-bound
    assert dw.memory_s == pytest.approx(1e6 / (1e12 * 0.45 * 0.5)) and dw.latency_s == pytest.approx(2e-6)
    assert dw.compute_s == pytest.approx(1e9 / 2e13)                             # at the bf16 vector peak
    pw = call_time("pointwise", "float32", 0, 1e6, 1, hw, l2_resident=True)
    assert pw.memory_s == pytest.approx(2e-6)


def test_roofline_bound_names_the_largest_term():
    from fxopt.cost_models.roofline import bound
    assert bound(3.0, 2.0, 1.0) == "compute"
    assert bound(1.0, 2.0, 0.0) == "memory"
    assert bound(0.0, 1.0, 2.0) == "launch"
    assert bound(0.0, 0.0, 0.0) == "none"


# ---- hardware.py -------------------------------------------------------------------------------

@pytest.mark.parametrize("source,kind", [
    ("fxopt calibrate on gpu0", "measured (fxopt calibrate on gpu0)"),
    ("fitted to t.csv", "imported (fitted to t.csv)"),
    ("datasheet", "preset t, fitted to published measurements (see cost_models/hardware/t.json)"),
    ("", "preset t, priors only (cost_models/kernels.py)"),
])
def test_hardware_profile_kind(source, kind):
    assert _hw(source=source).profile_kind() == kind


def test_hardware_kernel_params_are_the_profiles_over_the_priors():
    hw = _hw(matrix={"bf16": {"eff": 0.5}}, memory={"latency_s": 1e-6, "efficiency": {"norm": 0.3}},
             kind_eff={"conv": 0.7}, host={"bwd": 1e-6})
    assert hw.kernel_param("matrix")["bf16"]["eff"] == 0.5 and hw.kernel_param("matrix")["bf16"]["k_half"] == 128.0
    assert hw.kernel_param("matrix")["fp32"]["eff"] == 0.80
    mem = hw.kernel_param("memory")
    assert (mem["latency_s"], mem["ramp_bytes"]) == (1e-6, 1e6)
    assert (mem["efficiency"]["norm"], mem["efficiency"]["pointwise"]) == (0.3, 0.88)
    assert hw.kernel_param("kind_eff")["conv"] == 0.7 and hw.kernel_param("kind_eff")["conv_1x1"] == 0.95
    assert hw.kernel_param("host") == {"fwd": 6e-6, "bwd": 1e-6, "opt": 2e-6}


def test_hardware_peaks_and_layout_table():
    from fxopt.errors import HardwareError
    hw = Hardware(name="t", description="", memory_bandwidth=1e12, tensor_flops={"bf16": P}, vector_flops={"fp32": 1e13},
                  nhwc_speedup={"dense": {"16bit": 1.0}})
    assert hw.matrix_peak("fp32") == 1e13 and hw.matrix_peak("bf16") == P and hw.bf16_peak == P
    with pytest.raises(HardwareError, match="no tensor-core peak for fp8"):
        hw.matrix_peak("fp8")
    assert hw.vector_peak("fp8") == 1e13
    table = hw.layout_table()
    assert table["dense"] == {"16bit": 1.0, "tf32": 1.2, "fp32": 1.0} and table["1x1"]["16bit"] == 1.5
    assert hw.to_dict()["nhwc_speedup"] == {"dense": {"16bit": 1.0}} and hw.to_dict()["name"] == "t"


def test_hardware_load_paths_names_and_cache(tmp_path):
    import json

    from fxopt.cost_models.hardware import load_hardware, preset_path
    from fxopt.errors import HardwareError
    assert load_hardware(None).name == load_hardware("H100").name == "h100"
    hw = _hw()
    assert load_hardware(hw) is hw
    assert preset_path(tmp_path / "x.json", tmp_path, "w", "k") == tmp_path / "x.json"   # a path: as given
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"name": "mine", "memory_bandwidth": 1e12, "tensor_flops": {"bf16": 1e15},
                             "vector_flops": {"fp32": 1e13}, "not_a_field": 1}))
    a = load_hardware(f)
    assert a is load_hardware(str(f)) and a.description == "" and a.sm_count == 0
    f.write_text(json.dumps({"name": "mine2", "memory_bandwidth": 2e12, "tensor_flops": {}, "vector_flops": {}}))
    assert load_hardware(f).memory_bandwidth == 2e12                               # a new version is re-read
    f.write_text("{not json")
    with pytest.raises(HardwareError, match="cannot read"):
        load_hardware(f)
    with pytest.raises(HardwareError, match="cannot read"):
        load_hardware(tmp_path / "absent.json")


# ---- comm.py -----------------------------------------------------------------------------------

def _cluster_json(tmp_path, **over):
    import json
    d = {"name": "c", "hardware": "h100", "gpus_per_node": 8,
         "intra": {"name": "nvl", "latency_s": 2e-6, "nominal_bandwidth": 400e9, "efficiency": 0.5},
         "inter": {"name": "ib", "latency_s": 8e-6, "nic_bandwidth": 50e9, "nics_per_node": 4, "efficiency": 0.5}}
    d.update(over)
    f = tmp_path / "c.json"
    f.write_text(json.dumps(d))
    return f


def test_comm_cluster_json_derives_per_gpu_bandwidths(tmp_path):
    """4 NICs of 50 GB/s shared by 8 GPUs: 25 GB/s nominal per GPU, 12.5 GB/s at efficiency 0.5;
    NVLink 400 GB/s nominal at 0.5: 200 GB/s."""
    from fxopt.cost_models.comm import load_cluster
    c = load_cluster(_cluster_json(tmp_path))
    assert (c.inter.nominal_bandwidth, c.inter.bandwidth) == (25e9, 12.5e9)
    assert c.intra.bandwidth == 200e9 and c.gpus_per_node == 8 and c.description == ""
    assert load_cluster(c) is c
    one_nic_per_gpu = load_cluster(_cluster_json(tmp_path, inter={"name": "ib", "latency_s": 8e-6,
                                                                  "nic_bandwidth": 50e9}))
    assert (one_nic_per_gpu.inter.nominal_bandwidth, one_nic_per_gpu.inter.bandwidth) == (50e9, 50e9)
    given = load_cluster(_cluster_json(tmp_path, intra={"name": "nvl", "latency_s": 2e-6, "bandwidth": 300e9,
                                                        "nominal_bandwidth": 400e9, "efficiency": 0.5}))
    assert given.intra.bandwidth == 300e9                     # an achieved bandwidth given is kept


def test_comm_cluster_json_errors(tmp_path):
    from fxopt.cost_models.comm import load_cluster
    from fxopt.errors import HardwareError
    f = _cluster_json(tmp_path)
    f.write_text("{")
    with pytest.raises(HardwareError, match="cannot read"):
        load_cluster(f)
    import json
    f.write_text(json.dumps({"name": "c", "hardware": "h100", "gpus_per_node": 8, "intra": {}}))
    with pytest.raises(HardwareError, match=r"lacks \['inter'\]"):
        load_cluster(f)
    with pytest.raises(HardwareError, match="intra lacks"):
        load_cluster(_cluster_json(tmp_path, intra={"name": "nvl", "bandwidth": 1e9}))


def test_comm_calibrated_line_is_used_as_fitted_for_its_group_size_only():
    from fxopt.cost_models.comm import Cluster, Link, collective_time
    link = Link("l", 5e-6, 100e9, by_collective={"all_reduce": {"4": {"latency_s": 1e-6, "bandwidth": 50e9}}})
    c = Cluster("c", "", "h100", 8, link, Link("n", 1e-5, 25e9))
    assert link.params("all_reduce", 4) == (1e-6, 50e9) and link.params("all_reduce", 8) == (5e-6, 100e9)
    assert link.params("all_gather", 4) == (5e-6, 100e9)
    assert link.calibrated("all_reduce", 4) and not link.calibrated("all_reduce", 8)
    # 1 kB over 4 GPUs: tree would win (4 steps vs 6), but the calibrated line is a ring fit
    t = collective_time("all_reduce", 1e3, 4, c)
    assert t.algorithm == "ring" and t.time_s == pytest.approx(6 * 1e-6 + 1.5 * 1e3 / 50e9)
    t8 = collective_time("all_reduce", 1e3, 8, c)              # not calibrated at 8: the faster, tree
    assert t8.algorithm == "tree" and t8.time_s == pytest.approx(6 * 5e-6 + 2 * 1e3 / 100e9)


def test_comm_one_node_is_flat_and_phases_of_hierarchical_collectives():
    from fxopt.cost_models.comm import Cluster, Link, collective_time
    c = Cluster("c", "", "h100", 8, Link("l", 5e-6, 100e9), Link("n", 1e-5, 25e9))
    flat = collective_time("all_gather", 8e6, 8, c)           # exactly one node
    assert flat.algorithm == "ring" and flat.phases == (("intra", "all_gather", "ring", 8, 8e6, flat.time_s),)
    assert flat.time_s == pytest.approx(7 * 5e-6 + 7 / 8 * 8e6 / 100e9)
    ag = collective_time("all_gather", 8e6, 16, c)
    assert [(p[0], p[1], p[3], p[4]) for p in ag.phases] == [("inter", "all_gather", 2, 1e6),
                                                             ("intra", "all_gather", 8, 8e6)]
    rs = collective_time("reduce_scatter", 8e6, 16, c)
    assert [(p[0], p[1], p[3], p[4]) for p in rs.phases] == [("intra", "reduce_scatter", 8, 8e6),
                                                             ("inter", "reduce_scatter", 2, 1e6)]
    # a small all-reduce across 4 nodes: the inter-node step picks tree (4 steps vs 6), intra stays ring
    ar = collective_time("all_reduce", 8e3, 32, c)
    assert ar.algorithm == "hier(tree)" and [p[2] for p in ar.phases] == ["ring", "tree", "ring"]
    assert ar.phases[1][5] == pytest.approx(4 * 1e-5 + 2 * 1e3 / 25e9)
    assert ar.time_s == pytest.approx(sum(p[5] for p in ar.phases))
    assert collective_time("all_reduce", 8e3, 0, c).time_s == 0.0
    one = collective_time("all_reduce", 8e3, 1, c)   # one GPU: nothing is communicated, no phase
    assert (one.time_s, one.algorithm, one.phases) == (0.0, "none", ())


def test_comm_inter_node_time_one_gpu_per_node():
    from fxopt.cost_models.comm import Cluster, Link, inter_node_time
    c = Cluster("c", "", "h100", 8, Link("l", 5e-6, 100e9), Link("n", 1e-5, 25e9))
    assert inter_node_time("all_reduce", 1e9, 1, c).time_s == 0.0
    t = inter_node_time("all_reduce", 1e9, 4, c, algorithm="ring")
    assert t.time_s == pytest.approx(6 * 1e-5 + 1.5 * 1e9 / 25e9) and t.phases[0][0] == "inter"
    assert inter_node_time("all_reduce", 1e3, 2, c).time_s == pytest.approx(2 * 1e-5 + 1e3 / 25e9)  # ring = tree at 2


def test_comm_fit_alpha_beta_clamps_alpha_and_rejects_a_negative_bandwidth():
    from fxopt.cost_models.comm import fit_alpha_beta
    from fxopt.errors import HardwareError
    # time = volume x n / 1e11 - 2e-6 per step: a negative alpha fits; it is reported as 0
    s = [("all_gather", p, n, (p - 1) / p * n / 1e11 - (p - 1) * 2e-6) for p in (2, 8) for n in (1e6, 1e8)]
    alpha, bw = fit_alpha_beta(s)
    assert alpha == 0.0 and bw == pytest.approx(1e11, rel=1e-6)
    shrinking = [("all_reduce", 8, 1e6, 1e-3), ("all_reduce", 8, 1e8, 1e-4)]   # more bytes, less time
    with pytest.raises(HardwareError, match="not positive"):
        fit_alpha_beta(shrinking)
    latency_only = [("all_reduce", 8, 0.0, 1e-4), ("all_reduce", 4, 0.0, 5e-5)]   # no bytes: no bandwidth to fit
    with pytest.raises(HardwareError, match="not positive"):
        fit_alpha_beta(latency_only)


# ---- fit.py ------------------------------------------------------------------------------------

def test_fit_reads_neusight_tables_in_milliseconds_by_device(tmp_path):
    from fxopt.cost_models import fit
    f = tmp_path / "ns.csv"
    f.write_text("OPName,Latency,Device,B,M,N,K,H\n"
                 "bmm,0.5,A,2,64,32,16,\n"
                 "ln,0.25,A,8,,,,1024\n"
                 "add,1.0,B,4,,,,256\n")
    rows = fit.read_table(f, device="A")
    assert rows == [fit.Measurement("bmm", "float32", (2, 64, 32, 16), 5e-4, "A", "ns.csv"),
                    fit.Measurement("layer_norm", "float32", (8, 1024), 2.5e-4, "A", "ns.csv")]
    assert len(fit.read_table(f)) == 3
    with pytest.raises(fit.ProfileImportError, match=r"no rows for device 'C'; it has \['A', 'B'\]"):
        fit.read_table(f, device="C")


def test_fit_reads_the_import_format_seconds_or_milliseconds(tmp_path):
    from fxopt.cost_models import fit
    f = tmp_path / "t.csv"
    f.write_text("op,dtype,b,m,n,k,rows,cols,seconds,latency_ms,device\n"
                 "mm,tf32,1,8,16,32,,,0.002,,g\n"
                 "relu,bfloat16,,,,,4,64,,0.5,g\n")
    a, b = fit.read_table(f)
    assert a == fit.Measurement("mm", "tf32", (1, 8, 16, 32), 0.002, "g", "t.csv")
    assert b == fit.Measurement("relu", "bfloat16", (4, 64), 5e-4, "g", "t.csv")


@pytest.mark.parametrize("text,match", [
    ("", "has no rows"),
    ("op,dtype,rows,cols\nadd,float32,1,2\n", "seconds"),
    ("op,dtype,rows,cols,seconds\nadd,float64,1,2,0.1\n", "'dtype' has 'float64'"),
    ("op,dtype,rows,cols,seconds\nadd,float32,0,2,0.1\n", "positive"),
    ("op,dtype,rows,cols,seconds\nadd,float32,1,2,0\n", "positive"),
    ("OPName,Device,B,H\nadd,A,1,2\n", "Latency"),
])
def test_fit_table_errors(tmp_path, text, match):
    from fxopt.cost_models import fit
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(fit.ProfileImportError, match=match):
        fit.read_table(f)
    with pytest.raises(fit.ProfileImportError, match="cannot read"):
        fit.read_table(tmp_path / "absent.csv")


def test_fit_measurement_class_and_regime():
    from fxopt.cost_models.fit import Measurement
    m = lambda op, dt="float32": Measurement(op, dt, (1, 1, 1, 1), 1.0)
    assert [m(o).op_class for o in ("linear", "mm", "bmm", "layer_norm", "softmax", "add", "relu")] == \
        ["linear", "bmm", "bmm", "layer_norm", "softmax", "elementwise", "elementwise"]
    assert [m("mm", d).regime for d in ("float32", "tf32", "bfloat16", "float16")] == ["fp32", "tf32", "bf16", "bf16"]
    assert m("add").regime is None and m("linear", "tf32").regime == "tf32"


def test_fit_reads_xla_gemm_tables(tmp_path):
    from fxopt.cost_models import fit
    f = tmp_path / "x.csv"
    f.write_text("b,m,n,k,dtype,flops_per_s,source\n1,64,32,16,f32,1e12,s1\n3,8,8,8,bf16,2e12,s2\n")
    a, b = fit.read_xla_matmul(f)
    assert (a.op, a.dtype, a.dims, a.source) == ("mm", "tf32", (1, 64, 32, 16), "s1")
    assert a.seconds == pytest.approx(2 * 64 * 32 * 16 / 1e12)
    assert (b.op, b.dtype) == ("bmm", "bfloat16") and b.seconds == pytest.approx(2 * 3 * 8 * 8 * 8 / 2e12)


@pytest.mark.parametrize("op,dims,flops,read,written", [
    ("linear", (2, 8, 16, 32), 2 * 16 * 16 * 32, (16 + 16 * 32 + 32 * 16) * 4, 16 * 16 * 4),   # bias, x, w
    ("bmm", (3, 8, 16, 32), 2 * 3 * 8 * 16 * 32, (3 * 8 * 32 + 3 * 32 * 16) * 4, 3 * 8 * 16 * 4),
    ("add", (4, 64), 256, 2 * 256 * 4, 256 * 4),
    ("mulu", (4, 64), 256, 256 * 4, 256 * 4),                  # tensor x scalar: one operand read
    ("powu", (4, 64), 256, 256 * 4, 256 * 4),
    ("pow", (4, 64), 256, 2 * 256 * 4, 256 * 4),
    ("gelu", (4, 64), 256, 256 * 4, 256 * 4),
    ("softmax", (4, 64), 5 * 256, 256 * 4, 256 * 4),
])
def test_fit_measured_rows_become_the_aten_call_they_ran(op, dims, flops, read, written):
    from fxopt.cost_models import fit
    c = fit.call_cost(op, "float32", dims)
    assert (c.flops, c.bytes_read, c.bytes_written, c.kernels) == (flops, read, written, 1)


def test_fit_layer_norm_row_and_linear_gemm():
    from fxopt.cost_models import fit
    ln = fit.call_cost("layer_norm", "bfloat16", (4, 64))
    # reads x (bf16) + weight and bias; writes y and a mean and rstd per row (bf16 on the CPU fake kernel)
    assert (ln.op, ln.flops, ln.bytes_read) == ("native_layer_norm", 8 * 256, 256 * 2 + 2 * 64 * 2)
    assert ln.bytes_written == 256 * 2 + 2 * 4 * 2
    assert fit.call_cost("linear", "float32", (2, 8, 16, 32)).gemms == ((1, 16, 16, 32),)


def test_fit_predict_uses_tf32_only_for_tf32_rows():
    """mm 128x128 @ 128x256: FFMA at 1e13/132 per SM takes TILE*128*132/1e13; TF32 (P/2) would be
    memory-bound: 327,680 bytes at 0.25 x 1 TB/s, ramp 327680 / 1327680."""
    from fxopt.cost_models import fit
    hw = _hw(matrix={"fp32": PLAIN, "tf32": PLAIN}, memory=MEM)
    fp32 = fit.predict(fit.Measurement("mm", "float32", (1, 128, 256, 128), 1.0), hw)
    assert fp32 == pytest.approx(TILE * 128 * SMS / 1e13 + 3e-6)
    tf32 = fit.predict(fit.Measurement("mm", "tf32", (1, 128, 256, 128), 1.0), hw)
    assert tf32 == pytest.approx(1327680 / 2.5e11 + 3e-6)
    rows = [fit.Measurement("mm", "float32", (1, 128, 256, 128), fp32 * 2),
            fit.Measurement("mm", "float32", (1, 128, 256, 128), fp32 / 2)]
    assert fit.mape(rows, hw) == pytest.approx((0.5 + 1.0) / 2)
    assert fit._loss(rows, hw) == pytest.approx(math.log(2))
    assert fit.mape([], hw) == 0.0


def test_fit_split_shares():
    from fxopt.cost_models import fit
    rows = [fit.Measurement("add", "float32", (r, 8), 1.0) for r in range(1, 60)]
    assert fit.split(rows, test_share=0.0) == (rows, [])
    assert fit.split(rows, test_share=1.0) == ([], rows)
    a, b = fit.split(rows)
    assert 0.1 < len(b) / len(rows) < 0.5 and len(a) + len(b) == len(rows)


def test_fit_with_params_merges_sections():
    from fxopt.cost_models import fit
    hw = _hw(matrix={"fp32": {"eff": 0.5}}, memory={"latency_s": 1e-6, "efficiency": {"norm": 0.3}}, host={"fwd": 1e-6})
    m = fit.with_params(hw, "matrix", {"k_half": 7.0}, "bf16")
    assert m.kernel_model["matrix"] == {"fp32": {"eff": 0.5}, "bf16": {"k_half": 7.0}}
    m2 = fit.with_params(m, "matrix", {"eff": 0.9}, "bf16")
    assert m2.kernel_model["matrix"]["bf16"] == {"k_half": 7.0, "eff": 0.9} and m.kernel_model["matrix"]["bf16"] == {"k_half": 7.0}
    mem = fit.with_params(hw, "memory", {"ramp_bytes": 5.0, "efficiency": {"softmax": 0.4}})
    assert mem.kernel_model["memory"] == {"latency_s": 1e-6, "ramp_bytes": 5.0,
                                          "efficiency": {"norm": 0.3, "softmax": 0.4}}
    assert mem.kernel_model["host"] == {"fwd": 1e-6} and hw.kernel_model["memory"]["efficiency"] == {"norm": 0.3}


def test_fit_nelder_mead_finds_a_quadratics_minimum_and_values_round_to_4_digits():
    from fxopt.cost_models import fit
    x = fit._nelder_mead(lambda p: (p[0] - 3) ** 2 + 2 * (p[1] + 1) ** 2 + 5, [0.0, 0.0], [1.0, 1.0], 200)
    assert x == pytest.approx([3.0, -1.0], abs=1e-4)
    assert fit._round(0.123456) == 0.1235 and fit._round(123456.0) == 123500.0


def test_fit_sections_without_rows_and_bounds():
    from fxopt.cost_models import fit
    hw = _hw(matrix={"fp32": PLAIN}, memory=MEM)
    mm = [fit.Measurement("mm", "float32", (1, 128, 256, 128), 1.0)]
    assert fit.fit_matrix(mm, hw, "bf16") == {} and fit.fit_memory(mm, hw) == {}
    # one row 10x slower than any eff in bounds explains: eff is clamped to its lower bound 0.05
    slow = [fit.Measurement("mm", "float32", (1, 128, 256, 128), 10 * TILE * 128 * SMS / 1e13 / 0.05)]
    assert fit.fit_matrix(slow, hw, "fp32", iters=40, names=["eff"]) == {"eff": 0.05}
    # a K loop 20000 deep to fill: k_half stops at its upper bound, 2048
    deep = fit.with_params(hw, "matrix", {"k_half": 20000.0}, "fp32")
    rows = [fit.Measurement("mm", "float32", (1, 128, 256, 128), fit.predict(mm[0], deep))]
    assert fit.fit_matrix(rows, hw, "fp32", iters=40, names=["k_half"]) == {"k_half": 2048.0}


def test_fit_memory_skips_latency_and_ramp_without_small_kernels():
    """Only 8 MB kernels (>= 4 MiB): the efficiency of their class is fitted, latency and ramp kept."""
    from fxopt.cost_models import fit
    hw = _hw(memory=MEM)
    big = fit.Measurement("relu", "float32", (1024, 1024), 1.0)   # 4 MiB in + 4 MiB out
    truth = fit.with_params(hw, "memory", {"efficiency": {"pointwise": 0.4}})
    rows = [fit.Measurement("relu", "float32", (1024, 1024), fit.predict(big, truth))]
    got = fit.fit_memory(rows, hw, iters=60)
    assert set(got) == {"efficiency"} and got["efficiency"]["pointwise"] == pytest.approx(0.4, rel=1e-3)


def test_fit_profile_sets_the_source_and_device_files(tmp_path):
    import json

    from fxopt.cost_models import fit
    hw = _hw(memory=MEM)
    out = fit.fit_profile([], hw, "fitted to nothing")
    assert out.kernel_model == {"memory": MEM, "source": "fitted to nothing"}
    f = tmp_path / "dev.json"
    f.write_text(json.dumps({"Device": "X", "SingleFLOPs": 1000, "Mem_Bw": 2000, "Num_Sm": 10, "L2Cache": 40,
                             "Dev_Mem": 80}))
    d = fit.device_hardware(f)
    assert (d.name, d.memory_bandwidth, d.vector_flops, d.sm_count) == ("X", 2e12, {"fp32": 1e12}, 10)
    assert d.tensor_flops == {"tf32": 1e12, "bf16": 1e12, "fp16": 1e12}
    assert (d.l2_bytes, d.memory_bytes) == (40 * 2 ** 20, 80 * 2 ** 30) and "dev.json" in d.source


def test_kernels_priors_are_physically_plausible():
    """What a profile lacks falls back to these: efficiencies are shares of a peak (0, 1], latencies
    a few microseconds, tiles multiples of 64 that fit the 128x256 CTA budget, alignment a power of 2."""
    for p in kernels.DEFAULT_MATRIX.values():
        assert 0 < p["eff"] <= 1 and 0 < p["misaligned"] <= 1 and 0 < p["k_half"] <= 512 and 0 <= p["reuse"] <= 16
        assert 1e-6 <= p["latency_s"] <= 1e-5 and 1e12 <= p["reduce_bw"] <= 1e14
        assert p["align"] in (1, 2, 4, 8, 16)
        assert all(tm % 64 == 0 and tn % 64 == 0 and tm * tn <= 128 * 256 for tm, tn in p["tiles"])
    assert all(0 < e <= 1 for e in kernels.DEFAULT_KIND_EFF.values()) and kernels.DEFAULT_KIND_EFF["gemm"] == 1.0
    mem = kernels.DEFAULT_MEMORY
    assert 1e-6 <= mem["latency_s"] <= 1e-5 and 1e4 <= mem["ramp_bytes"] <= 1e8 and 1 < mem["l2_speedup"] <= 3
    assert set(mem["efficiency"]) == set(kernels.MEMORY_CLASSES)
    assert all(0 < e <= 1 for e in mem["efficiency"].values())
    assert all(1e-7 <= s <= 1e-4 for s in kernels.DEFAULT_HOST.values())
    assert kernels.SYMBOL_HINT >= 1


# ---- trace.py ----------------------------------------------------------------------------------

def _captured(model, *inputs):
    from fxopt.capture import capture
    return capture(model, inputs).graph_module


def test_trace_errors_name_what_to_do():
    from fxopt.cost_models.trace import trace_step
    from fxopt.errors import AnalysisError
    gm = _captured(torch.nn.Linear(4, 3), torch.randn(2, 4))
    with pytest.raises(AnalysisError, match=r"unknown optimizer 'lion'; known: \['adamw', 'sgd'\]"):
        trace_step(gm, optimizer="lion")
    with pytest.raises(AnalysisError, match="training=False"):   # no parameters: nothing needs a gradient
        trace_step(_captured(torch.nn.ReLU(), torch.randn(2, 4)))


def test_trace_phases_params_and_saved_activations():
    """Linear(4, 3) then ReLU on a [2, 4] input: 15 parameters; the backward saves the input x
    (addmm's mat1, 2 x 4 fp32 = 32 bytes) and ReLU's output (2 x 3 = 24 bytes); weights are not
    activations."""
    from fxopt.cost_models.trace import OPTIMIZER_NODE, trace_step
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    gm = _captured(model, torch.randn(2, 4))
    t = trace_step(gm)
    assert t.params == 15
    assert sorted(t.saved_bytes.values()) == [24, 32] and sum(t.saved_bytes.values()) == 56
    phases = {r.phase for r in t.records}
    assert phases == {"fwd", "bwd", "opt"}
    assert {r.node for r in t.records if r.phase == "opt"} == {OPTIMIZER_NODE}
    assert all(r.node != OPTIMIZER_NODE for r in t.records if r.phase != "opt")
    assert any(r.cost.op == "addmm" for r in t.records if r.phase == "fwd")
    assert any(r.cost.op == "mm" for r in t.records if r.phase == "bwd")
    no_opt = trace_step(gm, optimizer=None)
    assert {r.phase for r in no_opt.records} == {"fwd", "bwd"}
    ev = trace_step(gm, training=False)
    assert {r.phase for r in ev.records} == {"fwd"} and ev.params == 0 and ev.saved_bytes == {}


def test_trace_dtype_casts_parameters_and_inputs_but_not_buffers():
    """bf16 costing: the conv's input and weight are bf16; batch norm's running stats stay fp32."""
    from fxopt.cost_models.trace import trace_step
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    t = trace_step(_captured(model, torch.randn(2, 3, 6, 6)), dtype=torch.bfloat16, optimizer=None)
    conv = next(r.cost for r in t.records if r.cost.op == "convolution")
    assert conv.dtype == "bfloat16"
    assert conv.bytes_read == (2 * 3 * 6 * 6 + 8 * 3 * 3 * 3 + 8) * 2
    bn = next(r.cost for r in t.records if r.cost.op_class == "norm" and r.phase == "fwd")
    # x (bf16, 2x8x4x4) read twice (training statistics pass), weight/bias bf16, running mean/var fp32
    assert bn.bytes_read == 2 * (2 * 8 * 4 * 4 * 2) + 2 * 8 * 2 + 2 * 8 * 4


def test_trace_tied_weights_are_one_parameter():
    from fxopt.cost_models.trace import trace_step

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    t = trace_step(_captured(Tied(), torch.randn(2, 4)))
    assert t.params == 16


A = torch.ops.aten


def _fake_call(func, *shapes_or_args):
    with FakeTensorMode():
        args = tuple(torch.empty(a) if isinstance(a, tuple) and a and all(isinstance(i, int) for i in a) else a
                     for a in shapes_or_args)
        return cost_call(func, args, {}, func(*args))


def test_ops_one_pass_row_limits_are_inclusive():
    """Layer norm keeps a 16 KB row on chip (4096 fp32: one pass; 4097: x read twice); softmax a
    48 KB row (12288 fp32: one pass; 12289: x read 3x), only along the last dim."""
    ln = lambda cols: _fake_call(A.native_layer_norm.default, (8, cols), [cols], (cols,), (cols,), 1e-5)
    assert ln(4096).extra_bytes == 0 and ln(4097).extra_bytes == 8 * 4097 * 4
    sm = lambda cols, dim=-1: _fake_call(A._softmax.default, (6, cols), dim, False)
    assert sm(12288).extra_bytes == 0
    assert sm(12289).extra_bytes == sm(12289, 1).extra_bytes == 2 * 6 * 12289 * 4
    assert sm(12289, 0).extra_bytes == 0                          # not along the row: one pass
    smb = lambda cols: _fake_call(A._softmax_backward_data.default, (6, cols), (6, cols), -1, torch.float32)
    assert smb(12288).extra_bytes == 0 and smb(12289).extra_bytes == 2 * 6 * 12289 * 4
    # multi-pass rows re-read x inside one kernel: the launch count stays one either way
    assert [f(c).kernels for f in (ln, sm, smb) for c in (4096, 12289)] == [1] * 6


def test_ops_eval_batch_norm_is_one_pass_and_backward_rereads():
    ev = _fake_call(A.native_batch_norm.default, (2, 4, 3, 3), (4,), (4,), (4,), (4,), False, 0.1, 1e-5)
    assert (ev.extra_bytes, ev.kernels, ev.traffic) == (0, 1, "")
    bw = _fake_call(A.native_batch_norm_backward.default, (2, 4, 3, 3), (2, 4, 3, 3), (4,), (4,), (4,), (4,), (4,),
                    True, 1e-5, [True, True, True])
    assert bw.extra_bytes == 2 * 72 * 4 and bw.kernels == 2 and "backward" in bw.traffic


def test_ops_strided_softmax_input_is_copied_first():
    with FakeTensorMode():
        x = torch.empty(8, 6).t()                                 # [6, 8], not contiguous
        c = cost_call(A._softmax.default, (x, -1, False), {}, A._softmax.default(x, -1, False))
    assert (c.extra_bytes, c.kernels) == (2 * 48 * 4, 2) and c.traffic == "1 strided input(s) copied to contiguous first"


@pytest.mark.parametrize("x,w,groups,kind", [
    ((2, 1, 8, 8), (8, 1, 3, 3), 1, "conv"),          # one input channel, one group: not depthwise
    ((2, 16, 8, 8), (32, 16, 1, 1), 1, "conv_1x1"),
    ((2, 16, 8, 8), (32, 16, 1, 3), 1, "conv"),
    ((2, 16, 8, 8), (16, 1, 3, 3), 16, "depthwise"),
    ((2, 16, 8, 8), (32, 8, 3, 3), 2, "conv"),        # grouped, not depthwise
])
def test_ops_conv_kinds(x, w, groups, kind):
    pad = [w[2] // 2, w[3] // 2]
    c = _fake_call(A.convolution.default, x, w, None, [1, 1], pad, [1, 1], False, [0, 0], groups)
    assert c.kind == kind
    # its backward is the same kind of conv (output keeps the 8x8 pixels: "same" padding)
    b = _fake_call(A.convolution_backward.default, (x[0], w[0], 8, 8), x, w, None, [1, 1], pad, [1, 1], False,
                   [0, 0], groups, [True, True, False])
    assert b.kind == kind


def test_ops_grouped_conv_gemms_forward_and_backward():
    """2 groups, 4 -> 8 channels, 3x3, 4x4 pixels (padded): per group rows 2 x 16 pixels, N = 4,
    K = 2 x 9; grad-input N = 2, K = 4 x 9; grad-weight rows 4, N = 2 x 9, K = 32 pixels."""
    f = _fake_call(A.convolution.default, (2, 4, 4, 4), (8, 2, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 2)
    assert f.gemms == ((2, 32, 4, 18),)
    b = _fake_call(A.convolution_backward.default, (2, 8, 4, 4), (2, 4, 4, 4), (8, 2, 3, 3), None, [1, 1], [1, 1],
                   [1, 1], False, [0, 0], 2, [True, True, False])
    assert b.gemms == ((2, 32, 2, 36), (2, 4, 18, 32))
    wg = _fake_call(A.convolution_backward.default, (2, 8, 4, 4), (2, 4, 4, 4), (8, 2, 3, 3), None, [1, 1], [1, 1],
                    [1, 1], False, [0, 0], 2, [False, True, False])
    assert wg.gemms == ((2, 4, 18, 32),) and wg.kernels == 1
    bias = _fake_call(A.convolution_backward.default, (2, 8, 4, 4), (2, 4, 4, 4), (8, 2, 3, 3), [8], [1, 1], [1, 1],
                      [1, 1], False, [0, 0], 2, [False, False, True])
    assert bias.gemms == () and bias.kernels == 1
    tr = _fake_call(A.convolution.default, (2, 8, 4, 4), (8, 2, 2, 2), None, [2, 2], [0, 0], [1, 1], True, [0, 0], 2)
    assert tr.gemms == ((2, 2 * 8 * 8, 2, 4 * 4),)                # transposed: N = C_out/g 2, K = C_in/g 4 x 2x2


def test_ops_fused_attention_gemms_forward_and_backward():
    """Per (batch, head) = 6: L_q 16 rows, head dim 8, K = 2 x L_k 32 forward, 5 x 32 backward."""
    with FakeTensorMode():
        q, k, v = torch.empty(2, 3, 16, 8), torch.empty(2, 3, 32, 8), torch.empty(2, 3, 32, 8)
        f = A._scaled_dot_product_flash_attention_for_cpu.default
        out = f(q, k, v)
        fwd = cost_call(f, (q, k, v), {}, out)
        b = A._scaled_dot_product_flash_attention_for_cpu_backward.default
        args = (torch.empty(2, 3, 16, 8), q, k, v, out[0], out[1], 0.0, False)
        bwd = cost_call(b, args, {}, b(*args))
    assert (fwd.kind, fwd.gemms, fwd.flops) == ("attention_fwd", ((6, 16, 8, 64),), 4 * 6 * 16 * 32 * 8)
    assert (bwd.kind, bwd.gemms) == ("attention_bwd", ((6, 16, 8, 160),))


def test_ops_gemm_dims_of_mm_addmm_bmm_baddbmm():
    assert _fake_call(A.mm.default, (4, 6), (6, 8)).gemms == ((1, 4, 8, 6),)
    assert _fake_call(A.addmm.default, (8,), (4, 6), (6, 8)).gemms == ((1, 4, 8, 6),)
    assert _fake_call(A.bmm.default, (3, 4, 6), (3, 6, 8)).gemms == ((3, 4, 8, 6),)
    bb = _fake_call(A.baddbmm.default, (3, 4, 8), (3, 4, 6), (3, 6, 8))
    assert bb.gemms == ((3, 4, 8, 6),) and bb.flops == 2 * 3 * 4 * 8 * 6 and bb.kind == "gemm"


def test_ops_matrix_kind_of_a_call_known_only_by_class():
    from fxopt.cost_models.ops import matrix_kind
    assert [matrix_kind(c, n) for c, n in (("attention", "x_backward"), ("attention", "x"), ("conv", "c"),
                                          ("matmul", "mm"))] == ["attention_bwd", "attention_fwd", "conv", "gemm"]


def test_roofline_precision_is_an_immutable_value():
    """Precision() is the shared default argument of call_time and peak_for: one caller changing
    it would change every later default call, so it must be frozen (and, frozen, it hashes as a value)."""
    import dataclasses

    from fxopt.cost_models.roofline import Precision
    p = Precision()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.tf32_matmul = True
    assert hash(Precision(True, False)) == hash(Precision(True, False)) and p == Precision(False, True)


def test_trace_sdpa_is_the_fused_kernel_even_on_meta_fakes():
    """A meta-device graph that pins the meta device runs on meta fakes, where eager SDPA would take
    the unfused math path (bmm, softmax, bmm); the step trace still costs the fused kernel a GPU runs:
    one attention call of 4 B H L S D = 4 x 2 x 1 x 5 x 5 x 8 FLOPs, no bmm, no softmax."""
    import torch.nn.functional as F

    from fxopt.cost_models.trace import trace_step

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            x = x + torch.arange(8, device="meta", dtype=x.dtype)
            q, k, v = self.qkv(x).reshape(2, 5, 3, 8).permute(2, 0, 1, 3).unsqueeze(2)
            return F.scaled_dot_product_attention(q, k, v)

    with torch.device("meta"):
        model, x = Attn(), torch.empty(2, 5, 8)
    fwd = [r.cost for r in trace_step(_captured(model, x), optimizer=None).records if r.phase == "fwd"]
    attn = [c for c in fwd if c.op_class == "attention"]
    assert [(c.op, c.flops) for c in attn] == [("_scaled_dot_product_flash_attention_for_cpu", 1600)]
    assert not [c for c in fwd if c.op in ("bmm", "_softmax", "_safe_softmax")]


def test_ops_conv_layout_needs_the_groups_argument():
    """A convolution call without its ``groups`` argument (a hand-built graph) has no known layout
    (None, priced as a plain conv) instead of an IndexError deep in the cost model."""
    from fxopt.cost_models.ops import _conv_layout

    x, w = torch.empty(2, 8, 16, 16, device="meta"), torch.empty(8, 1, 3, 3, device="meta")
    full = (x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 8)
    assert _conv_layout("convolution", full) is not None
    assert _conv_layout("convolution", full[:8]) is None and _conv_layout("convolution", full[:2]) is None


def test_trace_sdpa_with_a_learnable_mask_is_the_memory_efficient_kernel():
    """A learnable mask (relative position bias) needs its gradient: the trace costs the GPU's
    memory-efficient kernel, whose forward saves the log-sum-exp for the backward and whose
    backward returns the mask's gradient. By hand, B=2, H=1, L=S=5, D=8, fp32: forward reads
    q, k, v (3 x 320 B) and the [5, 5] mask (100 B); writes out (320 B), the log-sum-exp
    [2, 1, 32] (rows padded to 32: 256 B) and the philox seed and offset (2 x 8 B). Backward
    writes dq, dk, dv (3 x 320 B) and the mask's gradient as the kernel sees it, [2, 1, 5, 5] (200 B)."""
    import torch.nn.functional as F

    from fxopt.cost_models.trace import trace_step

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)
            self.bias = torch.nn.Parameter(torch.zeros(1, 1, 5, 5))

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(2, 5, 3, 8).permute(2, 0, 1, 3).unsqueeze(2)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)

    recs = [(r.phase, r.cost) for r in trace_step(_captured(Attn(), torch.randn(2, 5, 8)), optimizer=None).records
            if r.cost.op_class == "attention"]
    (fp, fwd), (bp, bwd) = recs
    assert (fp, fwd.op, fwd.flops, fwd.bytes_read, fwd.bytes_written) == \
        ("fwd", "_scaled_dot_product_efficient_attention", 4 * 2 * 5 * 5 * 8, 960 + 100, 320 + 256 + 16)
    assert (bp, bwd.op, bwd.bytes_written) == ("bwd", "_scaled_dot_product_efficient_attention_backward", 960 + 200)

    class Attn3d(Attn):   # [B, L, E] inputs (no head dim): the mask is expanded to [B, L, S], S = k.shape[-2]
        def forward(self, x):
            q, k, v = self.qkv(x).reshape(2, 5, 3, 8).permute(2, 0, 1, 3)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias[0, 0])

    recs = [r.cost for r in trace_step(_captured(Attn3d(), torch.randn(2, 5, 8)), optimizer=None).records
            if r.cost.op_class == "attention"]
    assert [(c.op, c.flops) for c in recs][:1] == [("_scaled_dot_product_efficient_attention", 4 * 2 * 5 * 5 * 8)]
    assert [c.op for c in recs][1:] == ["_scaled_dot_product_efficient_attention_backward"]


def test_trace_sdpa_without_a_head_dim_is_costed_as_one_head():
    """SDPA takes [..., L, E] inputs with any batch dims; the fused kernels take [B, H, L, E]: a 3-D
    call is costed as B x 1 head, 4 B L S E = 4 x 2 x 5 x 5 x 8 FLOPs forward, output [2, 5, 8]."""
    import torch.nn.functional as F

    from fxopt.cost_models.trace import trace_step

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(2, 5, 3, 8).permute(2, 0, 1, 3)
            return F.scaled_dot_product_attention(q, k, v)

    recs = [r.cost for r in trace_step(_captured(Attn(), torch.randn(2, 5, 8)), optimizer=None).records
            if r.cost.op_class == "attention"]
    assert [(c.op, c.flops) for c in recs][:1] == [("_scaled_dot_product_flash_attention_for_cpu", 1600)]
    assert len(recs) == 2 and "backward" in recs[1].op


def test_trace_meta_built_channels_last_net_keeps_its_layout():
    """Meta kernels return contiguous conv outputs whatever the input's memory format; the trace runs
    meta-built graphs on CPU fakes, which follow it as cuDNN does, so every conv of a channels-last
    net (forward and both backward calls) is costed as NHWC, not only the first."""
    from fxopt.cost_models.trace import trace_step

    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 16, 3, padding=1)).to(memory_format=torch.channels_last)
        x = torch.empty(2, 8, 16, 16).to(memory_format=torch.channels_last)
    convs = [r.cost for r in trace_step(_captured(net, x), optimizer=None).records if r.cost.op.startswith("conv")]
    assert [c.op for c in convs] == ["convolution"] * 2 + ["convolution_backward"] * 2
    assert all(c.conv_layout[2] is True for c in convs)


def test_hardware_without_a_memory_size_gives_no_fit_verdict():
    """A hand-built profile that does not say how much memory the device has: the memory study
    cannot say whether a step fits (None, nothing short), rather than judging against 0 or 1 byte."""
    import fxopt
    from fxopt.cost_models.hardware import Hardware
    from fxopt.study.memory import memory_curve

    hw = Hardware("bare", "no memory size given", 1e12, {"bf16": 1e14, "fp32": 1e13}, {"fp32": 1e13, "bf16": 1e13})
    curve = memory_curve(fxopt.analyze(torch.nn.Linear(8, 8), (torch.randn(4, 8),), hardware=hw))
    assert curve.fits is None and curve.shortfall_bytes == 0.0 and curve.peak_bytes > 0


def test_hardware_profile_is_immutable():
    """Kernel parameters are cached per profile object: a profile edited in place would keep
    serving its old parameters, so editing is refused (build a new profile instead)."""
    import dataclasses

    from fxopt.cost_models.hardware import load_hardware

    hw = load_hardware("h100")
    with pytest.raises(dataclasses.FrozenInstanceError):
        hw.memory_bandwidth = 1.0


def test_fit_nelder_mead_shrinks_towards_the_best_vertex():
    """One failed reflection and contraction, by hand: simplex A=(1,1) (f=0), B=(2,1) (1), C=(1,2) (2).
    The reflection of C through the centroid (1.5, 1) is (2, 0), the inside contraction (1.25, 1.5);
    both are worse (5), so every vertex moves halfway to A: B'=(1.5, 1), C'=(1, 1.5). With f(B')=0.5,
    f(C')=0.7 the next worst is C', reflected through (A + B')/2 = (1.25, 1) to (1.5, 0.5)."""
    from fxopt.cost_models.fit import _nelder_mead

    known = {(1.0, 1.0): 0.0, (2.0, 1.0): 1.0, (1.0, 2.0): 2.0, (1.5, 1.0): 0.5, (1.0, 1.5): 0.7}
    seen = []

    def f(p):
        seen.append(tuple(p))
        return known.get(tuple(p), 5.0)

    _nelder_mead(f, [1.0, 1.0], [1.0, 1.0], 2)
    assert seen[:8] == [(1.0, 1.0), (2.0, 1.0), (1.0, 2.0), (2.0, 0.0), (1.25, 1.5), (1.5, 1.0), (1.0, 1.5), (1.5, 0.5)]


def test_ops_strided_softmax_backward_input_is_one_copy_kernel_more():
    """A short-row softmax backward is one pass; a strided output gradient is first copied to
    contiguous: one extra kernel (2 in all) reading and writing its 48 fp32 (2 x 192 B)."""
    with FakeTensorMode():
        g, y = torch.empty(8, 6).t(), torch.empty(6, 8)
        out = A._softmax_backward_data.default(g, y, -1, torch.float32)
        c = cost_call(A._softmax_backward_data.default, (g, y, -1, torch.float32), {}, out)
    assert (c.kernels, c.extra_bytes) == (2, 2 * 48 * 4)


def test_trace_reads_attributes_a_pass_added_later_in_the_graph():
    """export puts every parameter's get_attr first, but a rewrite may read attributes further down:
    a second name of an existing parameter (one shared fake) and a new buffer after it. The trace
    costs the graph with both (the final add reads the [3] buffer: 2 x 3 fp32 + 3 fp32 in, 24 B out)."""
    import copy

    from fxopt.cost_models.trace import trace_step

    gm = copy.deepcopy(_captured(torch.nn.Linear(4, 3), torch.randn(2, 4)))
    gm.w_alias = gm.weight                      # the same Parameter under a second name
    gm.register_buffer("shift", torch.ones(3))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    with gm.graph.inserting_before(out):
        alias = gm.graph.get_attr("w_alias")
        s = gm.graph.call_function(torch.ops.aten.sum.default, (alias,))
        y = gm.graph.call_function(torch.ops.aten.add.Tensor, (last, s))
        z = gm.graph.call_function(torch.ops.aten.add.Tensor, (y, gm.graph.get_attr("shift")))
    out.args = ((z,),) if isinstance(out.args[0], (tuple, list)) else (z,)
    gm.recompile()
    fwd = [r.cost for r in trace_step(gm, training=False, optimizer=None).records if r.phase == "fwd"]
    adds = [c for c in fwd if c.op == "add"]
    assert len(adds) == 2 and (adds[1].bytes_read, adds[1].bytes_written) == (2 * 3 * 4 + 3 * 4, 2 * 3 * 4)
