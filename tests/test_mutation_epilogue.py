"""Tests written to kill surviving mutants of ``passes/epilogue.py`` (``tools/mutation.py``).

Each module is captured with ``fxopt.capture`` and run through ``PassManager("epilogue")``; the
expected rewrite (or refusal) is stated by hand and the result is checked against a float64
reference computed from the module's own weights.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.passes import PassManager

aten = torch.ops.aten


def _epilogue(captured):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (r,) = PassManager("epilogue", cost=False).run(captured)
    return gm, r


def _calls(gm, target):
    return [n for n in gm.graph.nodes if n.target is target]


class TransposedWeight(nn.Module):
    def __init__(self, dims, k=8, n=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dims = dims
        self.w = nn.Parameter(torch.randn(n, k, generator=g))
        self.b = nn.Parameter(torch.randn(n if dims[0] % 2 != dims[1] % 2 else k, generator=g))

    def forward(self, x):
        return x @ self.w.transpose(*self.dims) + self.b


@pytest.mark.parametrize("dims", [(0, 1), (1, 0), (-1, -2), (0, -1)])
def test_epilogue_matmul_by_aten_transpose_of_the_weight_plus_bias_becomes_linear_on_the_weight(dims):
    """``x @ w.transpose(i, j) + b`` with ``{i, j}`` naming both axes of the 2-D weight (the capture
    keeps ``aten.transpose.int``) is ``linear(x, w, b)``: the weight is read as it is, no transpose."""
    model = TransposedWeight(dims).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    captured = fxopt.capture(model, (x,))
    assert [n.args[1:] for n in _calls(captured.graph_module, aten.transpose.int)] == [dims]
    gm, r = _epilogue(captured)
    assert r.modified and r.stats == {"matmul-bias": 1}, r.decisions
    (linear,) = _calls(gm, aten.linear.default)
    assert linear.args[1].op == "get_attr" and linear.args[1].target == "w"
    assert _calls(gm, aten.transpose.int) == [] and _calls(gm, aten.matmul.default) == []
    want = x.double() @ model.w.detach().double().T + model.b.detach().double()
    torch.testing.assert_close(gm(x).double(), want, rtol=1e-5, atol=1e-5)


def test_epilogue_a_same_axis_transpose_is_not_a_transposed_weight():
    """``w.transpose(0, -2)`` names axis 0 twice: it is ``w`` itself, not its transpose. The product
    ``x @ w`` (square ``w`` so both readings type-check) must still equal ``x @ w + b``."""
    model = TransposedWeight((0, -2), k=8, n=8).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    captured = fxopt.capture(model, (x,))
    assert [n.args[1:] for n in _calls(captured.graph_module, aten.transpose.int)] == [(0, -2)]
    gm, r = _epilogue(captured)
    for linear in _calls(gm, aten.linear.default):
        assert not (linear.args[1].op == "get_attr" and linear.args[1].target == "w"), r.decisions
    want = x.double() @ model.w.detach().double() + model.b.detach().double()
    torch.testing.assert_close(gm(x).double(), want, rtol=1e-5, atol=1e-5)


class SeqLinearRelu(nn.Module):
    """``relu(linear(x[None]))``: with a dynamic batch the symbol (x's dim 0) lands at dim 1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(8, 6)

    def forward(self, x):
        return torch.relu(self.l(x.unsqueeze(0)))


def test_epilogue_linear_activation_with_a_symbolic_non_batch_dim_is_kept():
    """Flattening an N-D linear input to 2-D and back needs every size after dim 0 static; here the
    output is ``[1, s, 6]`` with ``s`` symbolic at dim 1, so the relu epilogue is refused with that
    reason and the graph still runs at another length."""
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    model = SeqLinearRelu().eval()
    captured = fxopt.capture(model, (x,), dynamic_batch=True)
    (lin,) = _calls(captured.graph_module, aten.linear.default)
    s = lin.meta["val"].shape
    assert s[0] == 1 and not isinstance(s[1], int) and s[2] == 6
    gm, r = _epilogue(captured)
    assert r.modified is False and r.stats == {"kept_gemm-activation": 1}, r.decisions
    (keep,) = r.decisions
    assert keep.action == "keep" and "static inner sizes" in keep.reason, keep.reason
    assert _calls(gm, aten._addmm_activation.default) == []
    x7 = torch.randn(7, 8, generator=torch.Generator().manual_seed(2))
    w, b = model.l.weight.detach().double(), model.l.bias.detach().double()
    want = torch.relu(x7.double() @ w.T + b)[None]
    torch.testing.assert_close(gm(x7).double(), want, rtol=1e-5, atol=1e-5)


class PlusBatchSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return x @ self.w + x.shape[0]


def test_epilogue_matmul_plus_a_symbolic_size_is_not_a_bias():
    """With a dynamic batch, ``x @ w + x.shape[0]`` adds a SymInt node, not a tensor: no bias to
    fuse, the graph is kept and still adds the batch size it is run with."""
    model = PlusBatchSize().eval()
    captured = fxopt.capture(model, (torch.randn(4, 8),), dynamic_batch=True)
    (add,) = _calls(captured.graph_module, aten.add.Tensor)
    assert add.args[1].target is aten.sym_size.int
    gm, r = _epilogue(captured)
    assert r.modified is False and r.stats == {"kept_matmul-bias": 1}, r.decisions
    (keep,) = r.decisions
    assert keep.action == "keep" and keep.reason == "matmul-bias: the addend is not a tensor", keep.reason
    x6 = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(gm(x6).double(), x6.double() @ model.w.detach().double() + 6, rtol=1e-5, atol=1e-5)


class ConvLeakyRelu(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.nn.functional.leaky_relu(self.c(x), 0.2)


def test_epilogue_leaky_relu_with_a_positional_slope_after_a_conv_says_conv():
    """``leaky_relu(conv(x), 0.2)``: the activation's input is its first argument (the conv), not its
    last (the slope), so the decision names the conv rule."""
    captured = fxopt.capture(ConvLeakyRelu().eval(), (torch.randn(1, 3, 8, 8),))
    (act,) = _calls(captured.graph_module, aten.leaky_relu.default)
    assert act.args[1] == 0.2
    gm, r = _epilogue(captured)
    assert r.modified is False and r.stats == {"kept_gemm-activation": 1}, r.decisions
    (keep,) = r.decisions
    assert keep.node == "leaky_relu" and "leaky_relu after a conv stays" in keep.reason, keep.reason
