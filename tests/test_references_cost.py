"""Non-matrix FLOPs, bytes and kernel counts of each op class against hand-derived numbers.

tests/test_cost_model.py pins the matrix FLOPs against torch's FlopCounterMode; torch has no
reference for the rest (norms, softmax, pointwise, reductions, pooling, data movement, random),
so these tests state the count a reader can check on paper, one op class at a time, on tiny
graphs (forward only where the backward would add noise; phase "bwd" where it is the subject).

The per-element FLOP conventions (one FLOP per arithmetic step of the textbook formula):
  layer/batch norm forward 8 (mean: 1 add, x - mean: 1, square: 1, variance: 1 add, times rstd: 1,
  times gamma: 1, plus beta: 1, the amortized rsqrt/division: 1), backward 10; softmax forward 5
  (max: 1 compare, x - max: 1, exp: 1, sum: 1 add, divide: 1), backward 4 (dy*y: 1, row sum: 1,
  subtract: 1, times y: 1); reductions 1 per input element; pointwise 1 per output element.
Bytes are asserted for pointwise, matrix, conv, data movement and views only: the kernels that
read their inputs more than once (batch norm in training, softmax/layer-norm with long rows,
their backward) are costed by their real traffic, which is the cost model's to decide.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from nets import Fn  # noqa: E402  (tests/nets.py)

F32, BF16, I64 = 4, 2, 8


def kernel_calls(report, phase="fwd", op_class=None, op=None):
    return [c for c in report.calls if c.kernels and c.phase == phase
            and (op_class is None or c.op_class == op_class) and (op is None or c.op == op)]


def fwd(fn, *inputs, mods=()):
    return fxopt.analyze(Fn(fn, *mods), inputs, training=False)


def train(fn, *inputs, mods=()):
    return fxopt.analyze(Fn(fn, *mods), inputs, optimizer=None)


def _x(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


# ---- pointwise -------------------------------------------------------------------------------

def test_unary_pointwise_by_hand():
    n = 6 * 10
    (c,) = kernel_calls(fwd(lambda s, x: torch.relu(x), _x(6, 10)))
    assert (c.op_class, c.flops, c.kernels) == ("pointwise", n, 1)
    assert (c.bytes_read, c.bytes_written) == (n * F32, n * F32)


def test_repeated_operand_is_read_once():
    """x * x: the kernel reads each element of x once and uses it twice."""
    n = 7 * 9
    (c,) = kernel_calls(fwd(lambda s, x: x * x, _x(7, 9)))
    assert (c.op, c.flops, c.kernels) == ("mul", n, 1)
    assert (c.bytes_read, c.bytes_written) == (n * F32, n * F32)
    # two distinct operands of the same shape are both read
    (c2,) = kernel_calls(fwd(lambda s, x, y: x * y, _x(7, 9), _x(7, 9)))
    assert c2.bytes_read == 2 * n * F32


def test_scalar_operand_moves_no_bytes():
    (c,) = kernel_calls(fwd(lambda s, x: x * 3.0 + 0, _x(5, 4)))[:1]
    assert (c.flops, c.bytes_read, c.bytes_written) == (20, 20 * F32, 20 * F32)


def test_dtype_cast_reads_one_width_and_writes_the_other():
    n = 8 * 16
    (c,) = kernel_calls(fwd(lambda s, x: x.to(torch.bfloat16), _x(8, 16)))
    assert (c.op_class, c.flops, c.kernels) == ("memory", 0, 1)
    assert (c.bytes_read, c.bytes_written) == (n * F32, n * BF16)


# ---- reductions ----------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["sum", "mean", "amax"])
def test_reductions_count_one_flop_per_input_element(op):
    x = _x(4, 6, 5)
    (c,) = kernel_calls(fwd(lambda s, x: getattr(x, op)(dim=(0, 2)), x))
    assert (c.op_class, c.flops, c.kernels) == ("reduction", 4 * 6 * 5, 1)
    assert (c.bytes_read, c.bytes_written) == (4 * 6 * 5 * F32, 6 * F32)


# ---- norms and softmax: FLOPs per element nonzero, forward and backward ------------------------

def test_layer_norm_flops_forward_and_backward():
    b, t, d = 3, 5, 16
    r = train(lambda s, x: s.mods[0](x), _x(b, t, d, grad=True), mods=(nn.LayerNorm(d),))
    (f,) = kernel_calls(r, "fwd", "norm")
    assert f.flops == 8 * b * t * d
    (bw,) = kernel_calls(r, "bwd", "norm")
    assert bw.flops == 10 * b * t * d


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_flops(training):
    n, c, h = 2, 4, 6
    bn = nn.BatchNorm2d(c).train(training)
    model = Fn(lambda s, x: s.mods[0](x), bn).train(training)
    x = _x(n, c, h, h, grad=True)
    r = fxopt.analyze(model, x, optimizer=None) if training else fxopt.analyze(model, x, training=False)
    (f,) = kernel_calls(r, "fwd", "norm")
    assert f.flops == 8 * n * c * h * h
    if training:
        (bw,) = kernel_calls(r, "bwd", "norm")
        assert bw.flops == 10 * n * c * h * h


def test_group_norm_flops():
    n, c, h = 2, 6, 5
    r = fwd(lambda s, x: s.mods[0](x), _x(n, c, h, h), mods=(nn.GroupNorm(3, c),))
    (f,) = kernel_calls(r, "fwd", "norm")
    assert f.flops == 8 * n * c * h * h


def test_softmax_flops_and_kernels_forward_and_backward():
    b, t = 6, 20
    r = train(lambda s, x: torch.softmax(x, dim=-1), _x(b, t, grad=True))
    (f,) = kernel_calls(r, "fwd", "softmax")
    assert (f.flops, f.kernels) == (5 * b * t, 1)
    (bw,) = kernel_calls(r, "bwd", "softmax")
    assert (bw.flops, bw.kernels) == (4 * b * t, 1)


# ---- convolution backward: one kernel per gradient it computes ----------------------------------

@pytest.mark.parametrize("input_grad,bias", [(True, False), (False, False), (True, True), (False, True)])
def test_conv_backward_kernels_per_output_mask(input_grad, bias):
    """convolution_backward's output_mask says which of (grad_input, grad_weight, grad_bias) it
    computes; each is its own kernel. grad_input and grad_weight each cost one forward conv."""
    n, c, o, h, k = 2, 3, 5, 6, 3
    conv = nn.Conv2d(c, o, k, padding=1, bias=bias)
    r = train(lambda s, x: s.mods[0](x), _x(n, c, h, h, grad=input_grad), mods=(conv,))
    (f,) = kernel_calls(r, "fwd", "conv")
    fwd_flops = 2 * n * o * h * h * c * k * k
    assert (f.flops, f.kernels) == (fwd_flops, 1)
    (bw,) = kernel_calls(r, "bwd", "conv")
    assert bw.kernels == int(input_grad) + 1 + int(bias)
    assert bw.flops == fwd_flops * (int(input_grad) + 1)


# ---- pooling, data movement, random, views ------------------------------------------------------

def test_max_pool_by_hand():
    n, c, h = 2, 3, 8
    (p,) = kernel_calls(fwd(lambda s, x: F.max_pool2d(x, 2), _x(n, c, h, h)), "fwd", "pooling")
    out = n * c * (h // 2) ** 2
    assert (p.flops, p.kernels) == (n * c * h * h, 1)
    assert (p.bytes_read, p.bytes_written) == (n * c * h * h * F32, out * F32 + out * I64)  # values + indices


def test_cat_and_clone_move_bytes_without_flops():
    (cat,) = kernel_calls(fwd(lambda s, x, y: torch.cat([x, y], 1), _x(2, 3), _x(2, 5)))
    assert (cat.op_class, cat.flops, cat.kernels) == ("memory", 0, 1)
    assert (cat.bytes_read, cat.bytes_written) == ((6 + 10) * F32, 16 * F32)


def test_dropout_flops_and_kernels():
    """Training dropout as ATen runs it: draw a Bernoulli mask (bernoulli_, 1 FLOP per element),
    scale it by 1/(1-p) (div_, 1), multiply (mul, 1); its backward multiplies by the mask (1)."""
    n = 4 * 32
    r = train(lambda s, x: F.dropout(x, 0.5, True), _x(4, 32, grad=True))
    f = kernel_calls(r, "fwd")
    assert [(c.op_class, c.flops, c.kernels) for c in f] == [("random", n, 1), ("pointwise", n, 1),
                                                            ("pointwise", n, 1)]
    (bw,) = kernel_calls(r, "bwd")
    assert (bw.op, bw.flops, bw.kernels) == ("mul", n, 1)


def test_views_and_allocations_launch_nothing():
    r = fwd(lambda s, x: x.view(4, 8).t().unsqueeze(0).expand(3, 8, 4) + torch.empty(3, 8, 4), _x(32))
    ks = kernel_calls(r)
    assert [c.op for c in ks] == ["add"]  # the view chain and empty() cost nothing
    assert ks[0].bytes_read == (32 + 3 * 8 * 4) * F32  # the expanded operand is read once (stride 0)


def test_linear_bias_is_read_once_per_element():
    b, i, o = 4, 8, 16
    (mm,) = kernel_calls(fwd(lambda s, x: s.mods[0](x), _x(b, i), mods=(nn.Linear(i, o),)))
    assert (mm.op, mm.flops, mm.kernels) == ("addmm", 2 * b * i * o, 1)
    assert (mm.bytes_read, mm.bytes_written) == ((o + b * i + i * o) * F32, b * o * F32)


# ---- backward of pointwise: the chain rule by hand ------------------------------------------------

def test_pointwise_backward_by_hand():
    """d/dx of sum(x * x) = 2 * x * dy: autograd runs grad * x twice (one per operand use) and adds
    them: three kernels of n FLOPs, each reading two n-element tensors and writing one."""
    n = 5 * 6
    r = train(lambda s, x: x * x, _x(5, 6, grad=True))
    bw = kernel_calls(r, "bwd")
    assert sorted(c.op for c in bw) == ["add", "mul", "mul"]
    assert all((c.flops, c.bytes_read, c.bytes_written, c.kernels) == (n, 2 * n * F32, n * F32, 1) for c in bw)


def test_totals_split_matrix_and_other_flops():
    """A linear + relu step: matrix FLOPs are the GEMMs only; relu fwd/bwd and the bias-gradient
    reduction are 'other' FLOPs, counted by hand."""
    b, i, o = 4, 8, 16
    r = train(lambda s, x: torch.relu(s.mods[0](x)), _x(b, i), mods=(nn.Linear(i, o),))
    t = r.totals
    assert t["matrix_flops_fwd"] == 2 * b * i * o
    assert t["matrix_flops_bwd"] == 2 * b * i * o          # x needs no grad: wgrad only
    assert t["other_flops_fwd"] == b * o                   # relu
    assert t["other_flops_bwd"] == b * o + b * o           # threshold_backward + bias-grad sum
    assert t["kernels"] == sum(c.kernels for c in r.calls)


# ---- single ATen calls costed directly (no capture): the rule table's classes by hand ----------------

aten = torch.ops.aten
N, C, H = 2, 3, 4
NUM = N * C * H * H


def _direct(func, *args, **kwargs):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxopt.cost_models import cost_call
    with FakeTensorMode() as mode:
        args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                     [mode.from_tensor(t) for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                     else a for a in args)
        out = func(*args, **kwargs)
        return cost_call(func, args, kwargs, out)


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


# (op, args, op class, FLOPs, kernels, bytes read, bytes written); bytes None where the real traffic
# is the cost model's choice (multi-pass kernels)
DIRECT = {
    "native_dropout": (aten.native_dropout.default, (_t(N, C, H, H), 0.5, True), "random", 2 * NUM, 1, None, None),
    "native_dropout_backward": (aten.native_dropout_backward.default,
                                (_t(N, C, H, H), _t(N, C, H, H, dtype=torch.bool), 2.0), "pointwise", 2 * NUM, 1,
                                NUM * F32 + NUM * 1, NUM * F32),
    "log_softmax": (aten._log_softmax.default, (_t(6, 10), -1, False), "softmax", 5 * 60, 1, None, None),
    "log_softmax_backward": (aten._log_softmax_backward_data.default,
                             (_t(6, 10), _t(6, 10), -1, torch.float32), "softmax", 4 * 60, 1, None, None),
    "nll_loss": (aten.nll_loss_forward.default, (_t(6, 10), torch.zeros(6, dtype=torch.long), None, 1, -100),
                 "reduction", 60, 1, 60 * F32 + 6 * I64, 2 * F32),
    "avg_pool": (aten.avg_pool2d.default, (_t(N, C, H, H), [2, 2]), "pooling", NUM, 1, NUM * F32, NUM // 4 * F32),
    "avg_pool_backward": (aten.avg_pool2d_backward.default,
                          (_t(N, C, H // 2, H // 2), _t(N, C, H, H), [2, 2], [2, 2], [0, 0], False, True, None),
                          "pooling", NUM, 1, (NUM // 4 + NUM) * F32, NUM * F32),
    "upsample": (aten.upsample_nearest2d.default, (_t(N, C, H, H), [2 * H, 2 * H]), "pooling", 4 * NUM, 1,
                 NUM * F32, 4 * NUM * F32),
    "upsample_backward": (aten.upsample_nearest2d_backward.default,
                          (_t(N, C, 2 * H, 2 * H), [2 * H, 2 * H], [N, C, H, H]), "pooling", 4 * NUM, 1,
                          4 * NUM * F32, NUM * F32),
    "foreach_add": (aten._foreach_add.List, ([_t(3), _t(5)], [_t(3), _t(5)]), "optimizer", 8, 1,
                    16 * F32, 8 * F32),
    "fill_": (aten.fill_.Scalar, (_t(5, 6), 1.0), "memory", 0, 1, 0, 30 * F32),
    "copy_": (aten.copy_.default, (_t(5, 6), _t(5, 6, dtype=torch.bfloat16)), "memory", 0, 1, 30 * BF16, 30 * F32),
    "add_": (aten.add_.Tensor, (_t(5, 6), _t(5, 6)), "pointwise", 30, 1, 2 * 30 * F32, 30 * F32),
    "empty": (aten.empty.memory_format, ([5, 6],), "alloc", 0, 0, 0, 0),
    "view": (aten.view.default, (_t(5, 6), [30]), "view", 0, 0, 0, 0),
    "sym_size": (aten.sym_size.int, (_t(5, 6), 0), "meta", 0, 0, 0, 0),
}


@pytest.mark.parametrize("name", sorted(DIRECT))
def test_single_call_by_hand(name):
    func, args, op_class, flops, kernels, read, written = DIRECT[name]
    c = _direct(func, *args)
    assert (c.op_class, c.flops, c.kernels) == (op_class, flops, kernels)
    assert c.dtype == (None if name == "empty" else "float32") and c.known  # the first floating input's
    if read is not None:
        assert (c.bytes_read, c.bytes_written) == (read, written)


def test_in_place_ops_are_pointwise_only_when_their_base_is():
    from fxopt.cost_models import classify
    assert classify(aten.sigmoid_.default).op_class == "pointwise"
    assert classify(aten.scatter_reduce_.two).op_class == "unknown"   # scatter_reduce is not pointwise
    assert classify(aten.sort.default).op_class == "unknown"


def test_totals_are_sums_of_the_calls_and_mfu_is_matrix_flops_per_second_over_the_bf16_peak():
    from fxopt.cost_models import load_hardware
    model = Fn(lambda s, x: s.mods[1](torch.relu(s.mods[0](x)).flatten(1)), nn.Conv2d(3, 4, 3, padding=1),
               nn.Linear(4 * 6 * 6, 5))
    r = fxopt.analyze(model, _x(2, 3, 6, 6), hardware="h100")
    t = r.totals
    matrix = sum(c.flops for c in r.calls if c.op_class in ("matmul", "conv", "attention") and c.phase != "opt")
    assert t["matrix_flops_fwd"] + t["matrix_flops_bwd"] == matrix
    assert t["bytes"] == sum(c.bytes_read + c.bytes_written for c in r.calls)
    assert t["kernels"] == sum(c.kernels for c in r.calls)
    assert t["mfu"] == pytest.approx(matrix / t["step_time_s"] / load_hardware("h100").tensor_flops["bf16"], rel=1e-9)


def test_fused_attention_and_gemm_epilogue_by_hand():
    """SDPA's forward is two batched GEMMs (Q K^T and P V): 4 B H L S D FLOPs; _addmm_activation is
    addmm with an epilogue: 2 M K N."""
    b, h, l, s_, d = 2, 3, 5, 7, 4
    q, k, v = _t(b, h, l, d), _t(b, h, s_, d), _t(b, h, s_, d)
    c = _direct(aten._scaled_dot_product_flash_attention_for_cpu.default, q, k, v)
    assert (c.op_class, c.flops, c.kernels) == ("attention", 4 * b * h * l * s_ * d, 1)
    c = _direct(aten._addmm_activation.default, _t(8), _t(4, 6), _t(6, 8))
    assert (c.op_class, c.flops, c.kernels) == ("matmul", 2 * 4 * 6 * 8, 1)
    assert (c.bytes_read, c.bytes_written) == ((8 + 24 + 48) * F32, 32 * F32)


@pytest.mark.parametrize("memory_format, nhwc", [(torch.contiguous_format, False), (torch.channels_last, True)])
def test_conv_call_records_its_layout(memory_format, nhwc):
    x = _t(2, 8, 6, 6).to(memory_format=memory_format)
    w = _t(8, 8, 3, 3).to(memory_format=memory_format)
    c = _direct(aten.convolution.default, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    assert c.conv_layout is not None and c.conv_layout[2] is nhwc
    assert c.flops == 2 * 2 * 8 * 6 * 6 * 8 * 9
    dw = _direct(aten.convolution.default, x, _t(8, 1, 3, 3), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 8)
    assert dw.conv_layout[0] != c.conv_layout[0]   # depthwise is its own class
    assert dw.flops == 2 * 2 * 8 * 6 * 6 * 9


def test_frozen_parameters_get_no_gradient_or_optimizer_work():
    """A frozen layer (requires_grad=False, as in fine-tuning) computes no weight gradient and is not
    stepped: matrix FLOPs fwd+bwd equal FlopCounterMode's on the eager step, params count only the
    trainable ones, and the optimizer reads only those."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    for p in model[0].parameters():
        p.requires_grad_(False)
    x = torch.randn(16, 64)
    report = fxopt.analyze(model, (x,))
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    t = report.totals
    assert t["matrix_flops_fwd"] + t["matrix_flops_bwd"] == counter.get_total_flops()
    # by hand: fwd 2*16*64*128 + 2*16*128*32; bwd: layer 2's dW only (nothing below it needs a gradient:
    # layer 1 is frozen and x is data), layer 1 nothing
    assert counter.get_total_flops() == 2 * 16 * 64 * 128 + 2 * (2 * 16 * 128 * 32)
    assert t["params"] == 128 * 32 + 32
