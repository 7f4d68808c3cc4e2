"""Pass rules against independent references: normalize's div-to-mul sign, each mixed-precision
policy row on a graph that exercises it (dtypes read off the rewritten graph), and the
channels-last minimum cut against brute force over every labelling of small regions."""
from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes import PassManager
from nets import Fn  # noqa: E402  (tests/nets.py)

aten = torch.ops.aten


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(model, inputs, pipeline, **capture_kw):
    captured = fxopt.capture(model, inputs, **capture_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (record,) = PassManager(pipeline, cost=False).run(captured)
    assert not getattr(record, "rolled_back", False), record.note  # a pass that raised is rolled back
    return gm, record


def nodes_of(gm, name: str) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(n.target, "overloadpacket", None) is not None and n.target.overloadpacket.__name__ == name]


def dtype(n):
    return n.meta["val"].dtype


# ---- normalize: div-to-mul keeps the sign ---------------------------------------------------------

@pytest.mark.parametrize("s", [-4.0, -3.0, -0.5, 7.0])
def test_div_to_mul_by_a_negative_constant(s):
    x = _x(3, 5)
    gm, record = run(Fn(lambda m, x: x / s), x, "normalize{rules=div-to-mul;}")
    (mul,) = nodes_of(gm, "mul")
    assert mul.args[1] == 1.0 / s and (mul.args[1] < 0) == (s < 0)
    out = gm(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if math.frexp(abs(s))[0] == 0.5:   # power of two: exact
        assert torch.equal(out, x / s)
    else:
        torch.testing.assert_close(out, x / s, rtol=2 ** -23, atol=0)


def test_div_by_zero_stays_a_division_and_by_one_becomes_a_mul():
    """x / 0.0 has no reciprocal: it stays a div (inf/nan as eager); x / 1 is x * 1.0 exactly."""
    x = _x(3, 5)
    gm, record = run(Fn(lambda m, x: (x / 0.0, x / 1)), x, "normalize{rules=div-to-mul;}")
    assert record.stats == {"div-to-mul": 1}
    (div,), (mul,) = nodes_of(gm, "div"), nodes_of(gm, "mul")
    assert div.args[1] == 0.0 and mul.args[1] == 1.0
    inf, one = gm(x)
    assert torch.equal(inf, x / 0.0) and torch.equal(one, x)


def test_div_by_a_tensor_is_left_alone():
    """Only a Python-number divisor has a constant reciprocal: x / y stays a div, x / 4 beside it
    still becomes a mul."""
    x, y = _x(3, 5), _x(3, 5, seed=1).abs() + 1
    gm, record = run(Fn(lambda m, x, y: x / y + x / 4.0), (x, y), "normalize{rules=div-to-mul;}")
    assert record.stats == {"div-to-mul": 1}
    (div,) = nodes_of(gm, "div")
    assert div.args[1].op == "placeholder"
    out = gm(x, y)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, x / y + x / 4.0, rtol=0, atol=0)


def test_t_of_a_vector_is_left_to_the_identity():
    """t() of a 1-D tensor is the identity: no permute is made (a 1-D permutation of two dims would
    not exist), the graph still computes x."""
    x = _x(6)
    gm, record = run(Fn(lambda m, x: x.t() * 2), x, "normalize{rules=transpose-to-permute;}")
    assert not nodes_of(gm, "permute")
    out = gm(x)
    torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, x * 2)


@pytest.mark.parametrize("p, train, why", [(0.0, True, "p=0"), (0.5, False, "train=False")])
def test_identity_dropout_says_why(p, train, why):
    x = _x(3, 5)
    gm, record = run(Fn(lambda m, x: F.dropout(x, p, train) * 2), x, "normalize{rules=identity-dropout;}")
    assert record.stats == {"identity-dropout": 1} and not nodes_of(gm, "dropout")
    assert any(f"identity ({why})" in d.reason for d in record.decisions)


def test_noop_copy_reasons_name_what_was_kept():
    x = _x(3, 5)
    gm, record = run(Fn(lambda m, x: x.clone() * 2 + x.to(torch.float32) * 3), x, "normalize{rules=noop-copy;}")
    assert record.stats == {"noop-copy": 2}
    reasons = sorted(d.reason for d in record.decisions)
    assert any("aten.clone.default: clone keeps the layout" in r for r in reasons), reasons
    assert any("aten.to.dtype: same dtype float32, device and layout" in r for r in reasons), reasons


@pytest.mark.parametrize("dims, perm", [((-2, -1), [1, 0]), ((0, -2), [0, 1]), ((-1, 0), [1, 0])])
def test_transpose_with_negative_dims_becomes_permute(dims, perm):
    """Every valid dim of a 2-D tensor, -2 and -1 included, maps to its permutation."""
    x = _x(3, 5)
    gm, record = run(Fn(lambda m, x: x.transpose(*dims) * 2), x, "normalize{rules=transpose-to-permute;}")
    assert record.stats == {"transpose-to-permute": 1}
    (p,) = nodes_of(gm, "permute")
    assert list(p.args[1]) == perm
    torch.testing.assert_close(gm(x) if not isinstance(gm(x), tuple) else gm(x)[0], x.transpose(*dims) * 2)


# ---- mixed precision: each policy row ----------------------------------------------------------------

def mp(fn, *xs, pipeline="mixed-precision{estimate=false}", mods=(), **capture_kw):
    """A conv (so the graph has a 16-bit producer) feeding ``fn``; returns the rewritten graph."""
    conv = nn.Conv2d(4, 4, 3, padding=1)
    model = Fn(lambda m, x, *rest: fn(m, m.mods[0](x), *rest), conv, *mods)
    gm, record = run(model, xs, pipeline, **capture_kw)
    assert record.modified
    return gm, record


X = _x(2, 4, 6, 6)


def test_low_policy_runs_the_conv_in_bf16():
    gm, _ = mp(lambda m, y: y, X)
    (conv,) = nodes_of(gm, "conv2d")
    assert dtype(conv) == torch.bfloat16
    assert all(dtype(a) == torch.bfloat16 for a in conv.all_input_nodes)


# op name -> a function of the conv's (bf16) output that calls it: every row of the fp32 list kept fp32
FP32_ROWS = {
    "exp": lambda y: torch.exp(y),
    "log": lambda y: torch.log(y.abs() + 1),
    "log_softmax": lambda y: torch.log_softmax(y, -1),
    "logsumexp": lambda y: torch.logsumexp(y, -1),
    "var": lambda y: y.var(-1),
    "std": lambda y: y.std(-1),
    "cumsum": lambda y: y.cumsum(-1),
    "linalg_vector_norm": lambda y: torch.linalg.vector_norm(y, dim=-1),
    "rsqrt": lambda y: torch.rsqrt(y.abs() + 1),
    "reciprocal": lambda y: torch.reciprocal(y.abs() + 1),
    "softplus": lambda y: F.softplus(y),
    "mse_loss": lambda y: F.mse_loss(y, torch.zeros_like(y)),
    "prod": lambda y: y.prod(-1),
}


@pytest.mark.parametrize("op", sorted(FP32_ROWS))
def test_fp32_policy_rows_compute_in_fp32(op):
    gm, record = mp(lambda m, y: FP32_ROWS[op](y), X)
    (n,) = nodes_of(gm, op)
    assert dtype(n) == torch.float32
    assert any(d.node == n.name and d.action == "keep fp32" for d in record.decisions)


@pytest.mark.parametrize("op, fn", [
    ("layer_norm", lambda m, y: F.layer_norm(y, (6,))),
    ("softmax", lambda m, y: torch.softmax(y, -1)),
    ("group_norm", lambda m, y: F.group_norm(y, 2)),
])
def test_norm_policy_reads_and_writes_bf16(op, fn):
    gm, _ = mp(fn, X)
    (n,) = nodes_of(gm, op)
    assert dtype(n) == torch.bfloat16 and dtype(n.args[0]) == torch.bfloat16


def test_batch_norm_keeps_its_affine_parameters_and_statistics_fp32():
    bn = nn.BatchNorm2d(4)
    gm, _ = mp(lambda m, y: m.mods[1](y), X, mods=(bn,))
    (n,) = nodes_of(gm, "batch_norm")
    assert dtype(n.args[0]) == torch.bfloat16
    assert [dtype(a) for a in n.args[1:5]] == [torch.float32] * 4  # weight, bias, running mean/var


@pytest.mark.parametrize("n_reduced, want", [(4095, torch.bfloat16), (4096, torch.float32)])
def test_sum_threshold_is_inclusive(n_reduced, want):
    """sum over at least reduce_fp32_min (4096) elements per output runs fp32; one fewer follows."""
    x = _x(2, 4, 6, n_reduced)
    conv = nn.Conv2d(4, 4, 1)
    gm, _ = run(Fn(lambda m, x: m.mods[0](x).sum(-1), conv), x, "mixed-precision{estimate=false}")
    (s,) = nodes_of(gm, "sum")
    assert dtype(s) == want


def test_reduce_fp32_min_option_moves_the_threshold():
    gm, _ = mp(lambda m, y: y.sum(-1), X, pipeline="mixed-precision{estimate=false,reduce_fp32_min=6}")
    assert dtype(nodes_of(gm, "sum")[0]) == torch.float32
    gm, _ = mp(lambda m, y: y.sum(-1), X, pipeline="mixed-precision{estimate=false,reduce_fp32_min=7}")
    assert dtype(nodes_of(gm, "sum")[0]) == torch.bfloat16


def test_reduction_over_a_symbolic_batch_counts_as_large():
    """A mean over the batch dimension reduces a batch-dependent number of elements: fp32 whatever
    the example batch (here 2, far below the threshold)."""
    gm, _ = mp(lambda m, y: y.mean(0), X, dynamic_batch=True)
    (mean,) = nodes_of(gm, "mean")
    assert dtype(mean) == torch.float32
    gm, _ = mp(lambda m, y: y.mean(-1), X, dynamic_batch=True)  # over W only: small, follows
    assert dtype(nodes_of(gm, "mean")[0]) == torch.bfloat16


def test_follow_with_an_fp32_activation_stays_fp32():
    """bf16 conv output + fp32 exp(x) (an fp32-policy value): type promotion keeps fp32, neither input
    is rounded to bf16; two bf16 activations give bf16."""
    gm, _ = mp(lambda m, y, x: y + torch.exp(x), X, X.clone())
    (add,) = nodes_of(gm, "add")
    assert dtype(add) == torch.float32
    assert {dtype(a) for a in add.all_input_nodes} == {torch.bfloat16, torch.float32}
    gm, _ = mp(lambda m, y: y + torch.relu(y), X)
    (add,) = nodes_of(gm, "add")
    assert dtype(add) == torch.bfloat16


@pytest.mark.parametrize("e, want", [(2, torch.bfloat16), (3, torch.bfloat16), (0.5, torch.float32),
                                     (4, torch.float32), (-1, torch.float32)])
def test_pow_follows_only_for_small_integer_exponents(e, want):
    gm, _ = mp(lambda m, y: torch.pow(y, e), X)
    (p,) = nodes_of(gm, "pow")
    assert dtype(p) == want


def test_keep_fp32_pattern_overrides_the_table():
    gm, record = mp(lambda m, y: torch.softmax(y, -1), X, pipeline="mixed-precision{estimate=false,keep_fp32=softmax}")
    (n,) = nodes_of(gm, "softmax")
    assert dtype(n) == torch.float32
    assert record.stats.get("kept_fp32_override") == 1


def test_outputs_keep_their_captured_dtype():
    gm, _ = mp(lambda m, y: torch.relu(y), X)
    out = gm(X)
    assert all(o.dtype == torch.float32 for o in (out if isinstance(out, (tuple, list)) else [out]))


# ---- channels-last: the minimum cut against brute force ---------------------------------------------

class ConvStack(nn.Module):
    """Convs with pointwise ops between them and a flatten after the last: the NCHW copy before the
    flatten can sit after the last conv or after the relus (equal tensors: a tie)."""

    def __init__(self, c: int, depthwise_middle: bool = False, n: int = 2):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(c, c, 3, padding=1, groups=c if depthwise_middle and 0 < i < n - 1 else 1, bias=False)
            for i in range(n))

    def forward(self, x):
        for conv in self.convs:
            x = torch.relu(conv(x)) * 2.0
        return x.flatten(1)


class Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return (torch.relu(self.b(y) + y)).mean((2, 3))


def _cut_cost(edges: dict, sink: set) -> int:
    return sum(c for (u, v), c in edges.items() if u not in sink and v in sink)


def brute_force_labelling(g, S: str, T: str, region_nodes: list) -> set:
    """The labelling the documented rule picks, by enumeration: minimum cost over every NHWC set;
    among the minima the smallest (intersection) if it is empty, else the largest (union)."""
    edges = {(u, v): d["capacity"] for u, v, d in g.edges(data=True)}
    best, minima = None, []
    for r in range(len(region_nodes) + 1):
        for subset in itertools.combinations(region_nodes, r):
            c = _cut_cost(edges, set(subset) | {T})
            if best is None or c < best:
                best, minima = c, [set(subset)]
            elif c == best:
                minima.append(set(subset))
    smallest = set.intersection(*minima)
    return set() if not smallest else set.union(*minima)


@pytest.mark.parametrize("model, shape, dtype_", [
    (ConvStack(64, n=3), (64, 64, 56, 56), torch.bfloat16),             # converts; tie at the exit
    (ConvStack(64, depthwise_middle=True, n=3), (64, 64, 56, 56), torch.bfloat16),
    (Residual(64), (32, 64, 28, 28), torch.bfloat16),
    (ConvStack(4), (2, 4, 6, 6), torch.float32),                        # tiny: no change wins
])
def test_channels_last_min_cut_equals_brute_force(monkeypatch, model, shape, dtype_):
    import networkx as nx

    import fxopt.passes.channels_last as cl

    calls = []
    real_flow, real_solve = nx.algorithms.flow.preflow_push, cl._Planner.solve

    def flow(g, s, t, *a, **kw):
        calls.append({"g": g.copy(), "s": s, "t": t})
        return real_flow(g, s, t, *a, **kw)

    def solve(self, region):
        real_solve(self, region)
        fixed = {n for n in region.nodes if self.layout0[n] == cl.NHWC}
        calls[-1].update(region=region, fixed=fixed)

    monkeypatch.setattr(nx.algorithms.flow, "preflow_push", flow)
    monkeypatch.setattr(cl._Planner, "solve", solve)
    model = model.to(dtype_)
    run(model, torch.randn(*shape, dtype=dtype_), "channels-last")
    assert calls, "no region solved"
    for call in calls:
        region = call["region"]
        want = brute_force_labelling(call["g"], call["s"], call["t"], region.nodes) - call["fixed"]
        assert set(region.nhwc) == want, (sorted(n.name for n in region.nhwc), sorted(n.name for n in want))
    return calls


def test_channels_last_tie_puts_the_copy_at_the_region_edge(monkeypatch):
    """The big conv stack converts, and of the equal places for the NCHW copy before the flatten it
    takes the last one: the relu and mul after the last conv run NHWC too."""
    calls = test_channels_last_min_cut_equals_brute_force(monkeypatch, ConvStack(64, n=3), (64, 64, 56, 56),
                                                          torch.bfloat16)
    (call,) = calls
    names = {n.name for n in call["region"].nhwc}
    last = [n.name for n in call["region"].nodes][-1]
    assert {"conv2d", "conv2d_1", "conv2d_2"} <= names and last in names


def test_transpose_dims_out_of_range_are_not_wrapped():
    """A hand-built transpose with a dim outside [-n, n) is an invalid graph: normalize leaves it for
    the graph's own run to report instead of wrapping the dim into a valid permute silently."""
    from torch import fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxopt.passes.normalize import _perm_of_transpose

    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = FakeTensorMode().from_tensor(torch.empty(3, 5))
    perms = [_perm_of_transpose(g.call_function(torch.ops.aten.transpose.int, (x, a, b)))
             for a, b in ((0, 3), (2, 1), (-3, 0), (0, 2), (-1, 0), (1, 1))]
    assert perms == [None, None, None, None, [1, 0], [0, 1]]


def test_noop_view_of_a_storage_written_in_place_is_kept():
    """A view to the shape it already has is forwarded to its source, unless that storage is written
    in place (a hand-built graph; export functionalizes user code): the write must stay visible
    through the name it was made on."""
    from torch import fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxopt.passes.normalize import _noop_view
    from fxopt.passes.rewrite import GraphFacts

    A = torch.ops.aten
    mode = FakeTensorMode()
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = mode.from_tensor(torch.empty(3, 5))
    v = g.call_function(A.view.default, (x, [3, 5]))
    w = g.call_function(A.view.default, (x, [3, 5]))
    for n in (v, w):
        n.meta["val"] = mode.from_tensor(torch.empty(3, 5))
    g.output((g.call_function(A.mul.Tensor, (w, 2)),))
    assert _noop_view(v, GraphFacts(g), None).replacement is x            # nothing written: forwarded
    g.call_function(A.add_.Tensor, (v, 1))
    assert _noop_view(v, GraphFacts(g), None) is None                     # v's storage written: kept
