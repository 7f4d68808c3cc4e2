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
