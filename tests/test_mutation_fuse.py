"""``fuse`` behaviours that surviving mutants showed unchecked: two convex regions whose contraction
closes a cycle (the smaller one is dropped), the default ``max_ops``/``max_inputs`` bounds on a long
chain, a region refused before lowering moving no fused bytes, the MB figures of a decision, and the
one kernel that sums a broadcast input's gradient.

Every expectation is derived by hand (region sizes, input counts, bytes) or against float64.
Runs on the CPU with ``fallback=reference`` (the same programs as ATen ops).
"""
from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
from torch import nn

import fxopt
from fxopt.passes import PassManager

from nets import Lambda  # noqa: E402  (tests/nets.py)

SHAPE = (64, 64)   # 4096 fp32 values: 16384 bytes a tensor


def _xs(n: int, shape=SHAPE):
    return tuple(torch.randn(*shape, generator=torch.Generator().manual_seed(i)) for i in range(n))


def _fuse(fn, inputs, options: str = "", train: bool = True):
    """Capture ``fn`` and run ``fuse`` alone (reference fallback, uncosted); returns (captured graph
    before, rewritten graph, the pass record)."""
    model = Lambda(fn).train(train)
    captured = fxopt.capture(model, inputs)
    before = captured.graph_module.graph
    nodes = {n.name: n for n in before.nodes}
    opts = ",".join(["fallback=reference", *filter(None, [options])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (record,) = PassManager(f"fuse{{{opts}}}", cost=False).run(captured)
    assert not record.rolled_back, record.note
    return nodes, gm, record


def _tensor_inputs(nodes: dict, names: list) -> int:
    """Distinct values a region reads from outside itself (graph inputs or other ops' results)."""
    members = set(names)
    return len({a.name for m in names for a in nodes[m].all_input_nodes if a.name not in members})


# ---------------------------------------------------------------------------------------------
# two convex regions that close a cycle together


def _crossed(x, y, u, v):
    a1 = x * u          # region A starts
    b2 = y * v          # region B starts
    b3 = torch.exp(b2)
    b1 = a1 + b3        # joins B (3 ops: max_ops); joining A too would make 4
    a2 = a1 - b2        # B is full, so it joins A: A -> B (a1 -> b1) and B -> A (b2 -> a2)
    return b1, a2


def test_fuse_two_convex_regions_that_close_a_cycle_drop_the_smaller_one():
    """With max_ops=3, greedy formation in graph order gives A = {mul, sub} and B = {mul_1, exp,
    add}: each is convex (no path leaves it and comes back), but contracting both makes A -> B -> A,
    so no single op could stand for each. The smaller, A, is dropped (its ops stay ATen ops) and B
    is fused; no error, no rollback, and the outputs still match float64."""
    inputs = _xs(4)
    nodes, gm, record = _fuse(_crossed, inputs, "max_ops=3")
    cycle = [d for d in record.decisions if d.reason == "region would close a cycle with another region"]
    assert [(d.node, d.action) for d in cycle] == [("mul", "keep")]   # A's first node
    (region,) = record.details
    assert region.ops == ["mul", "exp", "add"] and region.nodes == ["mul_1", "exp", "add"] and region.fused
    left = sorted(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("aten."))
    assert left == ["aten.mul.Tensor", "aten.sub.Tensor"]   # A's two ops, unfused
    x, y, u, v = (t.double() for t in inputs)
    want_b1, want_a2 = x * u + torch.exp(y * v), x * u - y * v
    got_b1, got_a2 = gm(*inputs)
    torch.testing.assert_close(got_b1.double(), want_b1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_a2.double(), want_a2, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the default bounds on one region


def test_fuse_default_max_inputs_is_eight_tensor_inputs_a_region():
    """x0 + x1 + ... + x9 (nine adds over ten inputs): the first seven adds read x0..x7 (eight
    inputs); the eighth would make nine, so it starts a second region {add_7, add_8} reading add_6,
    x8 and x9 (three)."""
    nodes, _, record = _fuse(lambda *xs: sum(xs[1:], xs[0]), _xs(10))
    regions = [(r.ops, _tensor_inputs(nodes, r.nodes)) for r in record.details]
    assert regions == [(["add"] * 7, 8), (["add"] * 2, 3)]


def test_fuse_default_max_ops_is_twenty_four_ops_a_region():
    """26 chained tanhs over one input: a region of 24, then one of the remaining 2."""
    def chain(x):
        for _ in range(26):
            x = torch.tanh(x)
        return x

    _, _, record = _fuse(chain, _xs(1))
    assert [len(r.ops) for r in record.details] == [24, 2]
    assert all(set(r.ops) == {"tanh"} for r in record.details)


# ---------------------------------------------------------------------------------------------
# bytes in the records and the decisions


def test_fuse_a_one_op_region_moves_no_fused_bytes():
    """A region refused before lowering (one op) has no fused kernel: 0 bytes after, shown as
    0.00 MB (its times are not estimated: '-')."""
    _, _, record = _fuse(torch.relu, _xs(1))
    (region,) = record.details
    assert region.bytes_after == 0 and region.bytes_before == 0
    assert region.row() == ["r0", "relu", "0.00", "0.00", "-", "-", "one op: nothing to fuse"]


def test_fuse_decision_gives_the_megabytes_before_and_after():
    """tanh -> exp over a 1000 x 250 fp32 input (1 MB a tensor), in eval: separately each op reads
    1 MB and writes 1 MB (4 MB); fused, the kernel reads x and writes the result (2 MB). In
    training the unfused estimate triples (12 MB) and the fused one stays 2 MB: x is a user input,
    so there is no backward kernel."""
    x = _xs(1, (1000, 250))
    for train, before in ((False, "4.00"), (True, "12.00")):
        _, _, record = _fuse(lambda t: torch.exp(torch.tanh(t)), x, train=train)
        (region,) = record.details
        assert (region.bytes_before, region.bytes_after) == (int(float(before) * 1e6), 2_000_000)
        (fused,) = [d for d in record.decisions if d.action == "fuse"]
        assert fused.node == "exp" and fused.reason.startswith(f"region r0 (tanh exp): {before} -> 2.00 MB, ")


class _RowBias(nn.Module):
    """linear -> + a per-row bias b[4, 1] (a parameter) -> relu: the region {add, relu} reads a
    broadcast input that needs a gradient."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8, bias=False)
        self.b = nn.Parameter(torch.zeros(4, 1))

    def forward(self, x):
        return torch.relu(self.fc(x) + self.b)


def test_fuse_fused_time_sums_a_broadcast_gradient_in_one_kernel(monkeypatch):
    """The region {add, relu} over [4, 8] fp32, in training, by hand: forward reads linear (128 B)
    and b (16 B) and writes the output (128 B): 272 B. Backward reads the saved output and the
    output gradient and writes one [4, 8] fp32 gradient that serves both inputs: 384 B. b's
    gradient is that full-shape one summed down to [4, 1]: one more kernel reading 128 B and
    writing 16 B. Three kernels, one launch each (the cost model is replaced by a recorder whose
    time is the launch count)."""
    import fxopt.cost_models.roofline as roofline
    from fxopt.codegen import classify, lower
    from fxopt.cost_models.hardware import load_hardware
    from fxopt.passes.fuse import _fused_time

    calls = []

    def record(kind, dtype, flops, nbytes, launches, hw, **kw):
        calls.append((kind, nbytes, launches))
        return SimpleNamespace(total_s=float(launches))

    gm = fxopt.capture(_RowBias().train(), (torch.randn(4, 8),)).graph_module
    nodes = [n for n in gm.graph.nodes if n.target in (torch.ops.aten.add.Tensor, torch.ops.aten.relu.default)]
    low = lower(nodes, classify(nodes[0])[1])
    monkeypatch.setattr(roofline, "call_time", record)
    assert _fused_time(low, True, load_hardware("h100")) == (272 + 384 + 144, 3.0)
    assert calls == [("fused", 272, 1), ("fused", 384, 1), ("reduction", 144, 1)]
