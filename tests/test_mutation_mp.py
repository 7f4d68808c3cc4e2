"""Hand-checked behaviour of ``mixed-precision`` that its mutants changed (``tools/mutation.py
passes/mixed_precision.py``): the message of an op that rejects 16-bit inputs, where an
activation's view is cast, the kernel counts past a view, functional batch norm's fp32
arguments, export's dtype check with a positional size, and the cost estimate of a graph with a
data-dependent size. Each expectation is read off the small model by hand.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.passes import PassManager
from nets import add_dtype_check, Fn  # noqa: E402  (tests/nets.py)

aten = torch.ops.aten
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run(captured, pipeline="mixed-precision{estimate=false}"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (record,) = PassManager(pipeline, cost=False).run(captured)
    assert not record.rolled_back, record.note   # a pass that raised is rolled back
    return gm, record


def _calls(gm, name: str) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(getattr(n.target, "overloadpacket", None), "__name__", None) == name]


def test_mixed_precision_an_op_rejecting_mixed_dtypes_runs_as_captured_and_says_why():
    """``scatter(exp(x)[..], 1, idx, conv(x)[..])``: exp stays fp32 and the conv's slice is bf16, so
    scatter would get an fp32 self and a bf16 src, which it rejects. It then runs as captured (the src
    cast back to fp32), and the log quotes the first (only) line of scatter's error."""
    def f(m, x, idx):
        y = m.mods[0](x).flatten(1)[:, :4]
        z = torch.exp(x).flatten(1)[:, :4]
        return torch.scatter(z, 1, idx, y[:, :2])

    x, idx = _x(2, 4, 2, 2), torch.tensor([[0, 1], [2, 3]])
    gm, r = _run(fxopt.capture(Fn(f, nn.Conv2d(4, 4, 1)), (x, idx)))
    assert r.stats["kept_fp32_rejected"] == 1
    (d,) = [d for d in r.decisions if d.node == "scatter"]
    assert d.action == "keep fp32"
    assert d.reason == ("scatter rejected 16-bit inputs (RuntimeError: scatter(): Expected self.dtype to be "
                        "equal to src.dtype); runs as captured")
    (scatter,) = _calls(gm, "scatter")
    src = scatter.args[3]
    assert src.target is aten._to_copy.default and src.kwargs["dtype"] is torch.float32
    assert scatter.meta["val"].dtype is torch.float32


class ExpTMatmul(nn.Module):
    """``exp(x).t() @ w``: an fp32 op, a view of its result, a matmul."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(_x(3, 5, seed=1))

    def forward(self, x):
        return torch.exp(x).t() @ self.w


def test_mixed_precision_a_view_of_an_fp32_activation_is_cast_after_the_view():
    """``exp(x).t() @ w``: exp stays fp32, its transpose ``t`` is an activation (not a weight), so the
    matmul's bf16 input is one cast of ``t`` itself; only views of weights are re-applied on a cast."""
    gm, r = _run(fxopt.capture(ExpTMatmul(), (_x(3, 4),)))
    (mm,) = _calls(gm, "matmul")
    cast = mm.args[0]
    assert cast.target is aten._to_copy.default and cast.kwargs["dtype"] is torch.bfloat16
    assert cast.args[0].target is aten.t.default and cast.args[0].args[0].target is aten.exp.default
    (t,) = _calls(gm, "t")
    assert t.meta["val"].dtype is torch.float32 and list(t.users) == [cast]
    assert [n.args[0].name for n in _calls(gm, "_to_copy")] == ["t", "w", "matmul"]
    assert any(d.node == "t" and d.action == "cast" and d.reason == "fp32 -> bf16 for matmul (1 user)"
               for d in r.decisions)


def test_mixed_precision_kernel_counts_go_past_a_view():
    """The rewritten ``exp(x).t() @ w`` (x 3x4, w 3x5) in graph order: exp (fp32), t (a view: not
    a kernel), the casts of t and w (bf16), matmul (bf16), its cast back (fp32): 3 bf16 and 2 fp32
    kernels; only matmul was fp32 and is now bf16, 4x5 elements 2 bytes smaller: 40 bytes saved."""
    _, r = _run(fxopt.capture(ExpTMatmul(), (_x(3, 4),)))
    assert r.stats["nodes_bf16"] == 3 and r.stats["nodes_fp32"] == 2
    assert r.stats["activation_bytes_saved"] == 40


def test_mixed_precision_functional_batch_norm_keeps_its_affine_and_statistics_fp32():
    """``_native_batch_norm_legit_functional(conv(x), w, b, running_mean, running_var, ...)``: the
    input is the bf16 conv, weight, bias and running statistics (arguments 1-4) stay the fp32
    buffers and parameters themselves, with no cast and no rejection."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.w, self.b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
            self.register_buffer("rm", torch.zeros(4))
            self.register_buffer("rv", torch.ones(4))

        def forward(self, x):
            return aten._native_batch_norm_legit_functional(self.conv(x), self.w, self.b, self.rm, self.rv,
                                                            True, 0.1, 1e-5)[0]

    gm, r = _run(fxopt.capture(M(), (_x(2, 4, 3, 3),)))
    (bn,) = _calls(gm, "_native_batch_norm_legit_functional")
    assert bn.args[0].target is aten.conv2d.default and bn.args[0].meta["val"].dtype is torch.bfloat16
    assert [(a.op, a.target) for a in bn.args[1:5]] == [("get_attr", "w"), ("get_attr", "b"),
                                                        ("get_attr", "rm"), ("get_attr", "rv")]
    assert r.stats["norm_bf16"] == 1 and "kept_fp32_rejected" not in r.stats
    assert r.stats["casts_param"] == 2   # the conv's weight and bias only


def test_mixed_precision_a_dtype_check_with_a_positional_size_states_the_new_dtype():
    """``_assert_tensor_metadata(conv, None, dtype=float32)`` (size given positionally, dtype a keyword):
    its subject is the first argument, the conv, which now runs bf16, so the check asserts bf16 and
    the graph still runs; the size argument is left as it was."""
    captured = fxopt.capture(Fn(lambda m, x: m.mods[0](x) * 2, nn.Conv2d(4, 4, 1)), (_x(2, 4, 3, 3),))
    g = captured.graph_module.graph
    (conv,) = [n for n in g.nodes if n.target is aten.conv2d.default]
    add_dtype_check(captured, conv)
    gm, _ = _run(captured)
    (check,) = [n for n in gm.graph.nodes if n.target is aten._assert_tensor_metadata.default]
    assert check.args == (check.args[0], None) and check.args[0].target is aten.conv2d.default
    assert check.kwargs == {"dtype": torch.bfloat16}
    out = gm(_x(2, 4, 3, 3))
    out = out[0] if isinstance(out, (tuple, list)) else out
    assert out.dtype is torch.float32 and out.shape == (2, 4, 3, 3)


def test_mixed_precision_a_data_dependent_size_gives_no_estimate():
    """``nonzero`` has a data-dependent row count (an unbacked size, no example value): its bytes have
    no number although its flops (0) do. Then nothing is priced: the conv's gain and the summary carry
    no estimate, and the rewrite still happens."""
    def f(m, x):
        y = m.mods[0](x)
        return y * 2, torch.nonzero(y.flatten() > 0)

    gm, r = _run(fxopt.capture(Fn(f, nn.Conv2d(4, 4, 1)), (_x(2, 4, 3, 3),)), "mixed-precision")
    assert r.modified and r.stats["low_bf16"] == 1
    (conv,) = [d for d in r.decisions if d.node == "conv2d"]
    (summary,) = [d for d in r.decisions if d.action == "summary"]
    assert conv.action == "bf16" and conv.est_gain_s is None and summary.est_gain_s is None
    assert all(d.est_gain_s is None for d in r.decisions)
