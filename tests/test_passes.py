"""Passes, the pass manager and canonical graph text.

Golden tests state an input model, a pipeline and the expected diff of the canonical graph
text (``tests/golden/<pass>/<case>.diff``). ``FXOPT_ACCEPT=1 pytest tests/test_passes.py``
rewrites the goldens; review them with ``git diff tests/golden``.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.graphtext import canonical_text, unified_diff
from fxopt.passes import (Pass, PassError, PassManager, PassResult, PipelineError, available,
                          get, parse_pipeline, register, timing_table, unregister)
from fxopt.passes.base import format_pipeline
from fxopt.passes.graph_utils import AsModule as _AsModule

import goldens  # noqa: E402  (tests/goldens.py: shared golden-file check)

GOLDEN = Path(__file__).parent / "golden"
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# harness


def case(model: nn.Module, inputs, pipeline: str, **manager_kwargs):
    """Capture ``model``, run ``pipeline``; returns (diff of the canonical text, records, graph)."""
    captured = fxopt.capture(model, inputs)
    manager_kwargs.setdefault("cost", False)
    gm, records = PassManager(pipeline, **manager_kwargs).run(captured)
    diff = unified_diff(canonical_text(captured.graph_module), canonical_text(gm), pipeline)
    return diff, records, gm


def check_golden(pass_name: str, case_name: str, text: str) -> None:
    goldens.check(GOLDEN / pass_name / f"{case_name}.diff", text)

@pytest.fixture
def test_pass():
    """Register test-only passes for one test; they are removed afterwards."""
    added = []

    def add(cls):
        register(cls)
        added.append(cls.name)
        return cls
    yield add
    for name in added:
        unregister(name)


# ---------------------------------------------------------------------------------------------
# small models


class UnusedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(8, 8)
        self.unused = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        _ = self.unused(x) * 2
        return self.used(x).relu()


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class ConvHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


class DivByConstant(nn.Module):
    def forward(self, x):
        return x / 4.0 + x / 3.0 + x / math.sqrt(16)


class Transposes(nn.Module):
    def forward(self, x):  # [2, 3, 4]
        a = x.transpose(1, 2)
        b = a.transpose(-2, -1)
        return b + x[0].t().t()


class NoopViews(nn.Module):
    def forward(self, x):  # [2, 8]
        return x.view(2, 8) + x.reshape(x.shape) + x.view(-1, 8) + x.view(16).view(2, 8)


class SameDtypeTo(nn.Module):
    def forward(self, x):  # [2, 3, 4, 4]
        same = x.to(torch.float32) + x.float() + x.to("cpu") + x.clone()
        other = x.to(torch.float64).sum().float() + x.contiguous(memory_format=torch.channels_last).sum()
        return same + other


class MustKeep(nn.Module):
    """Nothing here is a no-op: clones written in place, real casts, active dropout."""

    def forward(self, x):
        y = x.clone()
        y.add_(1)
        z = F.dropout(x, 0.5, True)
        return y + z + x.to(torch.float64).float() + x.t().contiguous().t()


def _verify(model: nn.Module, gm, x, training: bool = True) -> None:
    """fxopt.verify where it exists (outputs, grads, one optimizer step), else compare outputs."""
    try:
        from fxopt.verify import verify
    except ImportError:
        torch.manual_seed(0)
        torch.testing.assert_close(gm(x), model(x))
        return
    with warnings.catch_warnings():  # deep copies of graph modules: torch's own pytree FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        result = verify(model, _AsModule(gm), x, training=training)
    assert result, result.table()


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# dce


def test_dce_removes_unused_branch():
    model = UnusedBranch()
    diff, records, gm = case(model, _x(2, 8), "dce")
    check_golden("dce", "unused_branch", diff)
    (r,) = records
    assert r.modified and r.stats["removed"] == 8  # linear, relu, linear, mul and 4 get_attr
    assert {d.action for d in r.decisions} == {"remove"}
    # parameters stay on the module: names and state_dict unchanged
    assert dict(gm.named_parameters()).keys() == dict(model.named_parameters()).keys()


def test_dce_no_change_keeps_side_effects():
    torch.manual_seed(0)
    captured = fxopt.capture(ConvBN().train(), _x(2, 3, 6, 6))
    before = canonical_text(captured.graph_module)
    gm, (r,) = PassManager("dce", cost=False).run(captured)
    assert r.modified is False and r.diff == ""
    assert canonical_text(gm) == before == canonical_text(captured.graph_module)
    (keep,) = r.decisions  # the dead num_batches_tracked update is kept, with its reason
    assert keep.action == "keep" and "writes into bn_num_batches_tracked" in keep.reason


def test_dce_keeps_random_and_batchnorm_statistics():
    class DeadRandom(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x):
            F.dropout(x, 0.5, True)  # unused, but removing it would shift later random streams
            self.bn(x)               # unused, but it updates running statistics
            return x * 2

    model = DeadRandom().train()
    gm, (r,) = PassManager("dce", cost=False).run(fxopt.capture(model, _x(4, 8)))
    reasons = " | ".join(d.reason for d in r.decisions if d.action == "keep")
    assert "random" in reasons and "running statistics" in reasons
    targets = {str(n.target) for n in gm.graph.nodes}
    assert {"aten.dropout.default", "aten.batch_norm.default"} <= targets
    # the statistics really update, as eager's do: momentum 0.1 from (0, 1)
    x = _x(4, 8)
    gm(x)
    stats = dict(gm.named_buffers())
    mean, var = x.mean(0), x.var(0, unbiased=True)
    torch.testing.assert_close(stats["bn.running_mean"], 0.1 * mean)
    torch.testing.assert_close(stats["bn.running_var"], 0.9 + 0.1 * var)
    assert int(stats["bn.num_batches_tracked"]) == 1


# ---------------------------------------------------------------------------------------------
# normalize


@pytest.mark.parametrize("name, model, shape", [
    ("div_by_constant", DivByConstant(), (2, 8)),
    ("transpose", Transposes(), (2, 3, 4)),
    ("noop_view", NoopViews(), (2, 8)),
    ("same_dtype_to", SameDtypeTo(), (2, 3, 4, 4)),
])
def test_normalize_golden(name, model, shape):
    x = _x(*shape)
    diff, (r,), gm = case(model, x, "normalize", verify=True)
    check_golden("normalize", name, diff)
    assert r.modified and not r.rolled_back and r.verification
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_normalize_identity_dropout_driving(mode):
    torch.manual_seed(0)
    model = zoo.build("driving", tiny=True)
    getattr(model, mode)()
    diff, (r,), _ = case(model, zoo.example_inputs("driving", 1, tiny=True), "normalize{rules=identity-dropout;}")
    check_golden("normalize", f"identity_dropout_driving_{mode}", diff)
    assert r.stats == {"identity-dropout": 2}


def test_normalize_keeps_what_is_not_a_noop():
    x = _x(3, 3)
    captured = fxopt.capture(MustKeep(), x)
    gm, (r,) = PassManager("normalize{rules=noop-copy;identity-dropout;noop-view}", cost=False).run(captured)
    assert r.modified is False and canonical_text(gm) == canonical_text(captured.graph_module)


def test_normalize_div_exact_only_option():
    diff, (r,), _ = case(DivByConstant(), _x(2, 8), "normalize{div_exact_only=true,rules=div-to-mul;}")
    assert r.stats == {"div-to-mul": 2}  # 4.0 and sqrt(16) are powers of two; 3.0 stays a div
    assert "aten.div.Tensor(x, 3.0)" in diff and "+mul_1 = aten.mul.Tensor(x, 0.25)" in diff


def test_normalize_unknown_rule_is_refused_before_running():
    with pytest.raises(PipelineError, match="option 'rules' of pass 'normalize' is \\['nope'\\].*noop-view"):
        PassManager("normalize{rules=nope;}")


# ---------------------------------------------------------------------------------------------
# pipelines and registry


def test_parse_pipeline_values():
    parsed = parse_pipeline("dce, mixed-precision{dtype=bf16, keep_fp32=head.*;softmax, n=8, x=-1.5e-3, on=True, "
                            "one=a;}", check=False)
    assert parsed == [("dce", {}), ("mixed-precision", {"dtype": "bf16", "keep_fp32": ["head.*", "softmax"],
                                                         "n": 8, "x": -1.5e-3, "on": True, "one": ["a"]})]
    assert parse_pipeline(format_pipeline(parsed), check=False) == parsed


def test_unknown_pass_lists_known_ones():
    with pytest.raises(PipelineError, match=r"unknown pass 'no-such-pass'; known passes: .*dce.*normalize"):
        PassManager("dce,no-such-pass")


@pytest.mark.parametrize("text, message", [
    ("dce,,normalize", "pass #2 is empty"),
    ("dce,", "pass #2 is empty"),
    ("dce{log_kept=true", "never closed"),
    ("dce}", "closes nothing"),
    ("dce{log_kept}", "needs key=value"),
    ("dce{log_kept=}", "has no value"),
    ("dce{log_kept=true,log_kept=false}", "given twice"),
    ("Dead_Code", "not a pass name"),
    ("", "empty"),
    ("dce{colour=red}", "has no option 'colour'"),
    ("normalize{rules=a;;b}", "empty item"),
])
def test_malformed_pipelines(text, message):
    with pytest.raises(PipelineError, match=message):
        parse_pipeline(text)


def test_registry_checks_names():
    class Bad(Pass):
        name, summary = "Bad_Name", "x"
    with pytest.raises(PipelineError, match="kebab-case"):
        register(Bad)

    class Dup(Pass):
        name, summary = "dce", "another dce"
    with pytest.raises(PipelineError, match="already registered"):
        register(Dup)
    assert {"dce", "normalize"} <= set(available()) and get("dce").summary


# ---------------------------------------------------------------------------------------------
# the manager


def test_failing_pass_names_itself_and_previous(test_pass):
    @test_pass
    class Explode(Pass):
        name, summary = "test-explode", "test only: raises"

        def run(self, gm, ctx):
            raise ValueError("boom")

    with pytest.raises(PassError) as info:
        PassManager("dce,normalize,test-explode", cost=False, on_error="raise").run(
            fxopt.capture(ConvHead(), _x(2, 3, 6, 6)))
    err = info.value
    assert "'test-explode'" in str(err) and "after dce, normalize" in str(err) and "boom" in str(err)
    assert err.pass_name == "test-explode" and err.previous == ["dce", "normalize"]
    assert isinstance(err.__cause__, ValueError)


def test_pass_that_hides_a_change_is_caught(test_pass):
    @test_pass
    class Liar(Pass):
        name, summary = "test-liar", "test only: changes the graph, says it did not"

        def run(self, gm, ctx):
            relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
            relu.target = aten.sigmoid.default
            return PassResult(gm, False)

    with pytest.raises(PassError, match="changed the graph but returned modified=False"):
        PassManager("test-liar", cost=False, on_error="raise").run(fxopt.capture(ConvHead(), _x(2, 3, 6, 6)))


def test_undeclared_statistic_is_refused(test_pass):
    """A pass that declares its statistics may only report those (a typo'd counter is an error,
    not a silent new key); a family ``kept_*`` covers every ``kept_<x>``."""
    @test_pass
    class Counting(Pass):
        name, summary = "test-counting", "test only: reports counters"
        statistics = {"seen": "nodes looked at", "kept_*": "kept, by why"}

        def run(self, gm, ctx):
            return PassResult(gm, False, {"seen": 3, "kept_views": 1, "sen": 2})

    with pytest.raises(PassError, match=r"statistics it does not declare: sen \(add them to Counting.statistics\)"):
        PassManager("test-counting", cost=False, on_error="raise").run(fxopt.capture(ConvHead(), _x(2, 3, 6, 6)))


def test_every_builtin_pass_declares_its_statistics():
    from fxopt.passes.base import get
    assert all(isinstance(get(name).statistics, dict) for name in available() if not name.startswith("test-"))


@pytest.mark.parametrize("pipeline, message", [
    ("dce,mixed-precision,fold-bn", "pass 'fold-bn' must run before 'mixed-precision'"),
    ("channels-last,mixed-precision", "pass 'channels-last' must run after 'mixed-precision'"),
])
def test_declared_pass_order_is_checked_before_anything_runs(pipeline, message):
    with pytest.raises(PipelineError, match=message):
        PassManager(pipeline)
    PassManager(",".join(reversed(pipeline.split(","))))  # the other order is fine


class ScaleConv(Pass):
    """Test only, registered by the tests that use it: multiplies the first conv's output by 1.01."""

    name, summary = "test-scale-conv", "test only: multiplies the first conv's output by 1.01 (wrong)"

    def run(self, gm, ctx):
        conv = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
        with gm.graph.inserting_after(conv):
            mul = gm.graph.call_function(aten.mul.Tensor, (conv, 1.01))
        conv.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
        ctx.decide(conv, "scale", "deliberately wrong")
        return PassResult(gm, True, {"scaled": 1})


def test_wrong_pass_is_rolled_back_and_divergence_located(test_pass):
    test_pass(ScaleConv)
    model = ConvHead().train()
    captured = fxopt.capture(model, _x(2, 3, 6, 6))
    gm, records = PassManager("dce,test-scale-conv,normalize", verify=True).run(captured)
    dce, bad, norm = records
    assert bad.rolled_back and not bad.verification and bad.verification.failures()
    assert bad.diverging_node == "relu"  # the first node fed by the inserted mul
    assert "fed by new node(s) mul" in bad.note
    assert bad.step_time_after_s == bad.step_time_before_s  # the rejected graph is not costed as kept
    assert all(n.target is not aten.mul.Tensor for n in gm.graph.nodes)  # the pipeline went on without it
    assert norm.step_time_before_s is not None and not norm.rolled_back
    table = timing_table(records)
    assert "rolled back" in table and "test-scale-conv" in table
    _verify(model, gm, _x(2, 3, 6, 6))


def test_rollback_without_fxopt_verify(test_pass, monkeypatch):
    """Where verification cannot run at all (fxopt.verify not importable), a pass is never kept
    unverified: it is rolled back with the cause."""
    test_pass(ScaleConv)
    monkeypatch.setitem(sys.modules, "fxopt.verify", None)  # makes `from fxopt.verify import ...` fail
    gm, (bad,) = PassManager("test-scale-conv", verify=True, cost=False).run(
        fxopt.capture(ConvHead().eval(), _x(2, 3, 6, 6)))
    assert bad.rolled_back and bad.verification is None
    assert bad.note.startswith("verification could not run, rolled back") and "fxopt.verify" in bad.note


def test_print_after_change_only_for_changed(capsys):
    torch.manual_seed(0)
    captured = fxopt.capture(ConvBN().train(), _x(2, 3, 6, 6))
    _, records = PassManager("dce,normalize{rules=transpose-to-permute;},dce{log_kept=false}",
                             print_after_change=True, cost=False).run(captured)
    assert [r.modified for r in records] == [False, False, False]
    assert capsys.readouterr().out == ""
    captured = fxopt.capture(UnusedBranch(), _x(2, 8))
    PassManager("normalize,dce", print_after_change=True, cost=False).run(captured)
    out = capsys.readouterr().out
    assert "--- 02_dce (before)" in out and "01_normalize" not in out


def test_dump_dir(tmp_path):
    captured = fxopt.capture(UnusedBranch(), _x(2, 8))
    gm, records = PassManager("normalize,dce", dump_dir=tmp_path).run(captured)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "00_capture.txt", "01_normalize.txt", "02_dce.diff", "02_dce.txt"]
    assert (tmp_path / "00_capture.txt").read_text() == canonical_text(captured.graph_module)
    assert (tmp_path / "02_dce.txt").read_text() == canonical_text(gm)
    assert (tmp_path / "02_dce.diff").read_text() == records[1].diff
    # costed: removing the unused branch makes the predicted step faster, and the decisions say how much
    assert records[1].step_time_after_s < records[1].step_time_before_s
    assert sum(d.est_gain_s for d in records[1].decisions) > 0


def test_symbolic_batch_capture_stays_symbolic():
    """Costing and re-propagation add no guards: the batch symbol is not specialized to the
    example's value, neither in the result nor in the captured graph (upsample's meta would)."""
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return F.interpolate(self.conv(x), size=(4, 4), mode="nearest") / 2

    captured = fxopt.capture(Up(), _x(2, 2, 2, 2), dynamic_batch=True)
    before = canonical_text(captured.graph_module)
    gm, records = PassManager("dce,normalize").run(captured)
    assert canonical_text(captured.graph_module) == before and "[s" in before
    assert "mul = aten.mul.Tensor(upsample_nearest2d, 0.5)  # [s" in canonical_text(gm)
    assert "batch" in str(records[-1].step_time_after_s)


# ---------------------------------------------------------------------------------------------
# canonical text


_CANONICAL_SCRIPT = textwrap.dedent("""
    import sys, torch, fxopt
    from fxopt import zoo
    from fxopt.graphtext import canonical_text
    torch.manual_seed(0)
    m = zoo.build("driving", tiny=True).train()
    sys.stdout.write(canonical_text(fxopt.capture(m, zoo.example_inputs("driving", 1, tiny=True)).graph_module))
""")


def test_canonical_text_is_stable_across_captures_and_processes():
    def text():
        torch.manual_seed(0)
        m = zoo.build("driving", tiny=True).train()
        return canonical_text(fxopt.capture(m, zoo.example_inputs("driving", 1, tiny=True)).graph_module)

    first = text()
    assert first == text()
    env = dict(os.environ, PYTHONHASHSEED="123")
    other = subprocess.run([sys.executable, "-c", _CANONICAL_SCRIPT], capture_output=True, text=True, env=env,
                           cwd=Path(__file__).parent.parent, timeout=120)
    assert other.returncode == 0, other.stderr
    assert other.stdout == first
    assert "0x" not in first and "/" not in first.replace(" / ", "")
    line = next(l for l in first.splitlines() if l.startswith("conv2d = "))
    assert line.startswith("conv2d = aten.conv2d.default(flatten, backbone_stem_0_weight, None, [2, 2], [3, 3])")
    assert line.endswith("# [2, 8, 32, 32] float32")


def test_canonical_text_marks_channels_last_and_symbols():
    captured = fxopt.capture(ConvBN().eval().to(memory_format=torch.channels_last),
                             _x(2, 3, 6, 6).to(memory_format=torch.channels_last), dynamic_batch=True)
    text = canonical_text(captured.graph_module)
    assert "conv2d = aten.conv2d.default(" in text
    conv = next(l for l in text.splitlines() if l.startswith("conv2d = "))
    assert conv.endswith("float32 channels_last") and "[s" in conv.split("#")[1]


# ---------------------------------------------------------------------------------------------
# property: every registered pass preserves what the model computes

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


class Block(nn.Module):
    def __init__(self, kind: str, c: int, norm: str, act: str, residual: bool, extra: str):
        super().__init__()
        self.kind, self.residual, self.extra = kind, residual, extra
        self.layer = nn.Conv2d(c, c, 3, padding=1) if kind == "conv" else nn.Conv2d(c, c, 1)
        self.norm = {"bn": nn.BatchNorm2d(c), "gn": nn.GroupNorm(1, c), "none": nn.Identity()}[norm]
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "silu": nn.SiLU()}[act]
        self.drop = nn.Dropout(0.0)
        self.dead = nn.Conv2d(c, c, 1)
        self.w = nn.Parameter(torch.randn(c, c) / c ** 0.5)
        self.b = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        y = self.act(self.norm(self.layer(x)))
        if self.extra == "div":
            y = y / 2.0 + y / -3.0
        elif self.extra == "transpose":
            y = y.transpose(2, 3).transpose(-1, -2)
        elif self.extra == "view":
            y = y.view(y.shape).to(y.dtype)
        elif self.extra == "dead":
            self.dead(y)
        elif self.extra == "attn":  # attention written out over the H*W tokens (sdpa's pattern)
            t = y.flatten(2).transpose(1, 2)
            p = torch.softmax(t @ t.transpose(-2, -1) / math.sqrt(t.shape[-1]), dim=-1)
            y = (p @ t).transpose(1, 2).reshape(y.shape)
        elif self.extra == "mlp":   # a per-pixel matmul + bias + relu (epilogue's patterns)
            y = torch.relu(y.permute(0, 2, 3, 1) @ self.w + self.b).permute(0, 3, 1, 2)
        y = self.drop(y)
        return x + y if self.residual else y


class RandomNet(nn.Module):
    def __init__(self, c: int, blocks: list, out: int):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(c=c, **b) for b in blocks])
        self.head = nn.Linear(c, out)

    def forward(self, x):
        return self.head(self.blocks(x).mean((2, 3)))


EXTRAS = ["div", "transpose", "view", "dead", "attn", "mlp", "none"]
_block = st.fixed_dictionaries({
    "kind": st.sampled_from(["conv", "pointwise"]),
    "norm": st.sampled_from(["bn", "gn", "none"]),
    "act": st.sampled_from(["relu", "gelu", "silu"]),
    "residual": st.booleans(),
    "extra": st.sampled_from(EXTRAS),
})

#: pass -> (pipeline that runs it alone, block options that make it fire, training mode or None
#: for either). channels-last is forced: at these sizes its cost model rightly refuses every copy.
FIRES = {
    "dce": ("dce", {"extra": "dead"}, None),
    "normalize": ("normalize", {"extra": "div"}, None),
    "fold-bn": ("fold-bn", {"kind": "conv", "norm": "bn"}, False),
    "sdpa": ("sdpa", {"extra": "attn"}, None),
    "channels-last": ("channels-last{force=true}", {"kind": "conv"}, None),
    "mixed-precision": ("mixed-precision", {"kind": "conv"}, None),
    "epilogue": ("epilogue", {"extra": "mlp"}, None),
    "fuse": ("fuse", {"norm": "none", "act": "relu", "residual": True, "extra": "none"}, None),
}


def _capture_checked(model, x):
    captured = fxopt.capture(model, x)
    return captured, canonical_text(captured.graph_module), \
        {k: v.clone() for k, v in captured.graph_module.state_dict().items()}


def _untouched(model, captured, text_before, state_before, gm):
    """Parameter names kept; the captured module untouched (graph, parameters, buffers)."""
    assert [n for n, _ in gm.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert canonical_text(captured.graph_module) == text_before
    after = captured.graph_module.state_dict()
    assert after.keys() == state_before.keys() and all(torch.equal(after[k], v) for k, v in state_before.items())


def test_every_pass_has_a_generator_that_makes_it_fire():
    assert sorted(FIRES) == sorted(available())


@pytest.mark.parametrize("pass_name", sorted(FIRES))
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(c=st.integers(2, 4), hw=st.integers(2, 5), batch=st.integers(2, 3), train=st.booleans(),
       blocks=st.lists(_block, min_size=0, max_size=2), forced=_block, seed=st.integers(0, 2**16))
def test_each_pass_alone_preserves_numerics_at_its_precision(pass_name, c, hw, batch, train, blocks, forced,
                                                            seed):
    """One pass, on a random net with a block that makes it fire (asserted), verified against the
    float64 model at the pass's own precision: fp32 passes at the fp32 floor (the rewritten graph
    declares no precision), mixed-precision at bf16 (it declares bf16)."""
    from fxopt.verify import declared_precision, verify

    pipeline, fire, mode = FIRES[pass_name]
    train = train if mode is None else mode
    torch.manual_seed(seed)
    model = RandomNet(c, blocks + [{**forced, **fire}], 3).train(train)
    x = torch.randn(batch, c, hw, hw)
    captured, text_before, state_before = _capture_checked(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (record,) = PassManager(pipeline, cost=False).run(captured)
    assert record.modified, f"{pass_name} did not fire: {[str(d) for d in record.decisions]}"
    _untouched(model, captured, text_before, state_before, gm)
    low = pass_name == "mixed-precision"
    assert declared_precision(_AsModule(gm)) == (torch.bfloat16 if low else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        result = verify(model, _AsModule(gm), x, training=train,
                        reference_precision=torch.bfloat16 if low else None)
    assert result, result.table()
    if not low:  # judged at fp32: every floating tensor's floor is float32's
        assert not any("16" in ch.dtype or "autocast" in ch.dtype for ch in result.checks), result.table()


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(c=st.integers(1, 4), hw=st.integers(2, 6), batch=st.integers(2, 3), train=st.booleans(),
       blocks=st.lists(_block, min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_fp32_pipeline_preserves_numerics(c, hw, batch, train, blocks, seed):
    """Every fp32 pass in one pipeline (mixed-precision left out: its bf16 tolerance would cover the
    others' errors), judged at fp32."""
    torch.manual_seed(seed)
    model = RandomNet(c, blocks, 3).train(train)
    x = torch.randn(batch, c, hw, hw)
    captured, text_before, state_before = _capture_checked(model, x)
    passes = [p for p in available() if p != "mixed-precision"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, records = PassManager(passes, cost=False).run(captured)
    assert [r.name for r in records] == passes
    _untouched(model, captured, text_before, state_before, gm)
    _verify(model, gm, x, training=train)
