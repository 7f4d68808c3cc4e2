"""Tests written to kill surviving mutants of the passes (issue 20; ``tools/mutation.py passes/...``).

Each test states its expected value by hand (a pipeline string, a reason text, a dtype, a
count read off a graph built node by node), so a mutated pass fails it. Graphs are built with
``fx.Graph`` directly where the pass only reads targets and edges: no capture, milliseconds each,
which keeps a mutant's test run short. Sections are named after the module they cover
(``-k default``, ``-k dce``, ...), the selections the mutation shards use.
"""
from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from fxopt.passes import PipelineError, get
from fxopt.passes import default as default_mod
from fxopt.passes.base import Option, PassContext, Decision, format_pipeline, parse_pipeline
from fxopt.passes.dce import DeadCodeElimination, keep_reason

aten = torch.ops.aten


def _chain(*targets, module: nn.Module | None = None) -> fx.GraphModule:
    """x -> targets[0] -> targets[1] -> ... -> output, as a GraphModule (no shapes, no capture)."""
    g = fx.Graph()
    out = g.placeholder("x")
    for t in targets:
        out = g.call_function(t, (out,))
    g.output(out)
    return fx.GraphModule(module or nn.Module(), g)


# ---------------------------------------------------------------------------------------------
# default: choose_pipeline, read off DEFAULT_RULES by hand

_MP = "mixed-precision{only_if_faster=true}"


@pytest.mark.parametrize("targets, want", [
    ((), "dce,normalize,dce"),
    ((aten.relu.default,), "dce,normalize,dce"),
    ((aten.conv2d.default,), f"dce,normalize,{_MP},channels-last,dce"),
    ((aten.conv1d.default,), f"dce,normalize,{_MP},channels-last,dce"),
    ((aten.conv3d.default,), f"dce,normalize,{_MP},channels-last,dce"),
    ((aten.convolution.default,), f"dce,normalize,{_MP},channels-last,dce"),
    ((aten.softmax.int,), "dce,normalize,sdpa,dce"),
    ((aten._softmax.default,), "dce,normalize,sdpa,dce"),
    ((aten._safe_softmax.default,), "dce,normalize,sdpa,dce"),
    ((aten.batch_norm.default,), "dce,normalize,fold-bn,dce"),
    ((aten._native_batch_norm_legit_no_training.default,), "dce,normalize,fold-bn,dce"),
    ((aten.mm.default,), f"dce,normalize,epilogue,{_MP},dce"),
    ((aten.matmul.default,), f"dce,normalize,epilogue,{_MP},dce"),
    ((aten.bmm.default,), f"dce,normalize,epilogue,{_MP},dce"),
    ((aten.linear.default,), f"dce,normalize,epilogue,{_MP},dce"),
    ((aten.addmm.default,), f"dce,normalize,{_MP},dce"),
    ((aten.scaled_dot_product_attention.default,), f"dce,normalize,{_MP},dce"),
    ((aten.softmax.int, aten.batch_norm.default, aten.conv2d.default, aten.mm.default),
     f"dce,normalize,sdpa,fold-bn,epilogue,{_MP},channels-last,dce"),
])
def test_default_pipeline_rules_by_hand(targets, want):
    for training in (True, False):
        chosen, reasons = default_mod.choose_pipeline(_chain(*targets), training)
        assert chosen == want
        assert len(reasons) == 8  # one line per rule, chosen or skipped


def test_default_reasons_say_chosen_or_skipped():
    _, reasons = default_mod.choose_pipeline(_chain(aten.softmax.int), True)
    assert reasons[0] == "dce: drop dead code before costing"
    assert reasons[2] == "sdpa: softmax present: hand-written attention becomes fused SDPA"
    assert reasons[3] == "fold-bn: skipped, nothing for it in this graph"
    assert reasons[-1] == "dce: remove what the rewrites left dead"


def test_default_triton_backend_adds_fuse_before_the_last_dce():
    chosen, reasons = default_mod.choose_pipeline(_chain(aten.relu.default), False, backend="triton")
    assert chosen == "dce,normalize,fuse,dce"
    assert reasons[-2].startswith("fuse: backend triton") and len(reasons) == 9
    assert default_mod.choose_pipeline(_chain(), False, backend="inductor")[0] == "dce,normalize,dce"


def test_default_pass_missing_from_the_build_is_skipped_with_a_reason(monkeypatch):
    monkeypatch.setattr(default_mod, "available", lambda: ["dce", "normalize", "mixed-precision"])
    chosen, reasons = default_mod.choose_pipeline(_chain(aten.conv2d.default), True)
    assert chosen == f"dce,normalize,{_MP},dce"  # channels-last is not registered in this "build"
    assert "channels-last: skipped, not available in this build" in reasons


def test_default_only_call_function_nodes_count():
    g = fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_method("softmax", (x, -1)))  # a method call named softmax is not aten.softmax
    chosen, _ = default_mod.choose_pipeline(fx.GraphModule(nn.Module(), g), True)
    assert chosen == "dce,normalize,dce"


# ---------------------------------------------------------------------------------------------
# dce: which dead nodes go, which stay and why, on graphs built node by node


def _dce(gm: fx.GraphModule, node_times=None, **options):
    ctx = PassContext(training=True)
    ctx.begin("dce", {"log_kept": True, **options}, node_times)
    result = DeadCodeElimination().run(gm, ctx)
    return result, ctx.decisions


def test_dce_removes_a_dead_chain_in_one_sweep_and_logs_in_graph_order():
    g = fx.Graph()
    x = g.placeholder("x")
    a = g.create_node("call_function", aten.relu.default, (x,), name="relu")
    g.create_node("call_function", aten.neg.default, (a,), name="neg")  # dead, relu's only user
    g.output(g.call_function(aten.sin.default, (x,)))
    gm = fx.GraphModule(nn.Module(), g)
    r, decisions = _dce(gm, node_times={"relu": 2e-6, "neg": 3e-6})
    assert r.modified is True and r.stats == {"removed": 2}
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_function"] == ["aten.sin.default"]
    assert decisions == [Decision("relu", "remove", "result of aten.relu.default is never used", 2e-6),
                         Decision("neg", "remove", "result of aten.neg.default is never used", 3e-6)]


def test_dce_unused_get_attr_goes_and_the_parameter_stays():
    m = nn.Module()
    m.w = nn.Parameter(torch.ones(2))
    g = fx.Graph()
    x = g.placeholder("x")
    g.get_attr("w")
    g.output(x)
    gm = fx.GraphModule(m, g)
    r, decisions = _dce(gm)
    assert r.stats == {"removed": 1} and [n.op for n in gm.graph.nodes] == ["placeholder", "output"]
    assert decisions == [Decision("w", "remove", "unused get_attr (the tensor stays on the module)", None)]
    assert "w" in dict(gm.named_parameters())


def test_dce_nothing_dead_is_no_change_and_an_unused_input_is_not_logged():
    g = fx.Graph()
    x = g.placeholder("x")
    g.placeholder("unused")
    g.output(g.call_function(aten.relu.default, (x,)))
    r, decisions = _dce(fx.GraphModule(nn.Module(), g))
    assert r.modified is False and r.stats == {} and decisions == []


def _dead(target, *args, module: nn.Module | None = None, op="call_function"):
    """A graph whose only dead node is ``target(x, *args)``; returns (gm, that node)."""
    g = fx.Graph()
    x = g.placeholder("x")
    node = g.create_node(op, target, (x, *args))
    g.output(x)
    return fx.GraphModule(module or nn.Module(), g), node


@pytest.mark.parametrize("target, args, rule, reason", [
    (aten.add_.Tensor, (1.0,), "writes-argument", "writes into x in place"),
    (aten.copy_.default, (1.0,), "writes-argument", "writes into x in place"),
    (aten.bernoulli.p, (0.5,), "random", "draws random numbers; removing it would change the random stream"),
    (aten.native_dropout.default, (0.5, True), "random", "draws random numbers"),
    (aten._assert_async.msg, ("boom",), "side-effect", "torch marks it side-effecting"),
])
def test_dce_keeps_with_the_first_rule_that_holds(target, args, rule, reason):
    gm, node = _dead(target, *args)
    name, why = keep_reason(node)
    assert name == rule and why.startswith(reason)
    r, decisions = _dce(gm)
    assert r.modified is False and r.stats == {f"kept_{rule}": 1}
    assert [(d.node, d.action) for d in decisions] == [(node.name, "keep")] and decisions[0].reason == why


def test_dce_batch_norm_in_training_updates_statistics_in_eval_it_is_dead():
    g = fx.Graph()
    x, w, b, mean, var = (g.placeholder(n) for n in ("x", "w", "b", "mean", "var"))
    g.create_node("call_function", aten.batch_norm.default, (x, w, b, mean, var, True, 0.1, 1e-5, False),
                  name="train_bn")
    g.create_node("call_function", aten.batch_norm.default, (x, w, b, mean, var, False, 0.1, 1e-5, False),
                  name="eval_bn")
    g.output(x)
    gm = fx.GraphModule(nn.Module(), g)
    r, decisions = _dce(gm)
    assert decisions[0] == Decision("train_bn", "keep", "updates running statistics mean, var in place")
    assert decisions[1] == Decision("eval_bn", "remove", "result of aten.batch_norm.default is never used")
    assert r.stats == {"kept_writes-argument": 1, "removed": 1}


def test_dce_opaque_module_call_is_kept_and_log_kept_false_silences_it():
    m = nn.Module()
    m.lin = nn.Linear(2, 2)
    gm, node = _dead("lin", module=m, op="call_module")
    assert keep_reason(node) == ("opaque-call", "call_module 'lin': fxopt cannot prove it has no side effect")
    r, decisions = _dce(gm, log_kept=False)
    assert r.stats == {"kept_opaque-call": 1} and decisions == []
    _, method = _dead("relu", op="call_method")
    assert keep_reason(method)[0] == "opaque-call"


def test_dce_boundary_nodes_have_a_reason():
    gm = _chain()
    placeholder, output = list(gm.graph.nodes)
    assert keep_reason(placeholder) == ("graph-boundary", "placeholder is part of the graph's signature")
    assert keep_reason(output) == ("graph-boundary", "output is part of the graph's signature")
    assert keep_reason(gm.graph.call_function(aten.relu.default, (placeholder,))) is None


# ---------------------------------------------------------------------------------------------
# base: the option schema and the pipeline grammar, values written by hand


@pytest.mark.parametrize("text, value", [
    ("TRUE", True), ("False", False), ("-7", -7), ("+3", 3), ("0.5", 0.5), (".5", 0.5), ("1e-3", 1e-3),
    ("2.", 2.0), ("-1.5E+2", -150.0), ("bf16", "bf16"), ("1e", "1e"), ("a;", ["a"]), ("1; 2.5 ;x", [1, 2.5, "x"]), ("1;2;", [1, 2]),
])
def test_base_values_parse_by_hand(text, value):
    ((_, opts),) = parse_pipeline(f"p{{k={text}}}", check=False)
    assert opts == {"k": value} and type(opts["k"]) is type(value)


@pytest.mark.parametrize("text, message", [
    ("a{b{c=1}}", "nested '{' at position 3"),
    ("a}", "'}' at position 1 closes nothing"),
    ("a{k=1", "'{' is never closed"),
    ("a{k=1=2}", "has a stray '='"),
    ("a{1k=2}", "'1k' is not an option name"),
    ("a{k=;}", "empty item"),
    (" ", "the pipeline is empty"),
])
def test_base_malformed_pipelines_say_where(text, message):
    with pytest.raises(PipelineError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_pipeline(text, check=False)


def test_base_a_pipeline_must_be_a_string():
    with pytest.raises(PipelineError, match="got list"):
        parse_pipeline(["dce"])


def test_base_whitespace_and_braces_without_options():
    assert parse_pipeline(" a {} ,\n b { k = v } ", check=False) == [("a", {}), ("b", {"k": "v"})]


def test_base_format_pipeline_by_hand():
    assert format_pipeline([("a", {}), ("b", {"on": False, "xs": ["p"], "ys": ["p", "q"], "n": 3})]) == \
        "a,b{on=false,xs=p;,ys=p;q,n=3}"


def test_base_option_minimum_is_inclusive_and_allowed_says_it():
    opt = Option(int, 1, "n", minimum=1)
    assert opt.check(1, "n") == 1
    with pytest.raises(PipelineError, match="n is 0; it must be an integer, at least 1 \\(n\\)"):
        opt.check(0, "n")
    assert Option((int, str), 1).allowed() == "an integer or a word"
    assert Option(list, "a", choices=("a", "b")).allowed() == "one of a, b (or a ';'-list of them)"
    assert Option(str, "a", choices=("a", "b")).allowed() == "one of a, b"
    assert Option(float, 0.0).check(2, "x") == 2.0 and Option((int, float), 0).check(2, "x") == 2
    with pytest.raises(PipelineError, match="a number"):
        Option(float, 0.0).check(float("inf"), "x")
    with pytest.raises(PipelineError, match="a word"):
        Option(str, "a").check("", "x")


def test_base_node_time_reads_the_costed_times():
    ctx = PassContext()
    assert ctx.node_time("relu") is None  # not costed
    ctx.begin("p", {}, {"relu": 2e-6})
    assert ctx.node_time("relu") == 2e-6 and ctx.node_time("view") == 0.0
    import sympy
    ctx.begin("p", {}, {"relu": sympy.Symbol("B") * 2e-6})   # a symbolic batch: a formula, not a number
    assert ctx.node_time("relu") is None
    assert str(Decision("relu", "remove", "why", 1.5e-6)) == "relu: remove: why (est. +1.5 us)"
    assert str(Decision("relu", "keep", "why")) == "relu: keep: why"
    assert get("dce").name == "dce"


# ---------------------------------------------------------------------------------------------
# mixed_precision: structure of the rewritten graph read off node by node


def _mixed(model: nn.Module, *xs, pipeline="mixed-precision{estimate=false}"):
    import warnings

    import fxopt
    from fxopt.passes import PassManager
    captured = fxopt.capture(model, xs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (record,) = PassManager(pipeline, cost=False).run(captured)
    assert record.modified and not record.rolled_back, record.note
    return gm, record


def _calls(gm, name: str) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(getattr(n.target, "overloadpacket", None), "__name__", None) == name]


@pytest.mark.parametrize("view", ["permute", "expand"])
def test_mixed_precision_a_view_of_a_weight_is_applied_to_the_weights_single_cast(view):
    """``x @ w.permute(1, 0)`` (or ``expand``): the fp32 weight is cast once and the view re-applied on
    the bf16 copy, so the cast reads the parameter itself (a get_attr), not a view of it."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            w = self.w.permute(1, 0) if view == "permute" else self.w.expand(2, 8, 8)
            return x @ w

    gm, _ = _mixed(M(), torch.randn(2, 4, 8))
    (viewed,) = [n for n in _calls(gm, view) if n.users]  # the captured view is left dead for dce
    cast = viewed.args[0]
    assert cast.target is aten._to_copy.default and cast.kwargs["dtype"] is torch.bfloat16
    assert cast.args[0].op == "get_attr" and cast.args[0].target == "w"
    assert viewed.meta["val"].dtype is torch.bfloat16


def _node(target, *args, shape=(2, 4, 64, 64), **kwargs):
    """``target(x, *args)`` in a fresh graph, ``x`` a meta tensor of ``shape`` (what policy_of reads)."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(shape, device="meta")
    return g.call_function(target, (x, *args), kwargs) if target is not None else x


@pytest.mark.parametrize("target, args, kwargs, policy, reason", [
    (None, (), {}, "keep", "placeholder x: not an ATen op, runs on its captured dtypes"),
    (__import__("operator").getitem, (0,), {}, "follow", "getitem"),
    (len, (), {}, "keep", "len is not an ATen op: runs on its captured dtypes"),
    (aten._assert_tensor_metadata.default, (), {}, "assert", "export's dtype check follows its subject"),
    (aten._to_copy.default, (), {"dtype": torch.bfloat16}, "cast", "explicit cast"),
    (aten.to.dtype, (torch.bfloat16,), {}, "cast", "explicit cast"),
    (aten.sum.dim_IntList, ([-1],), {}, "follow", "sum over 64 elements"),
    (aten.sum.dim_IntList, ([2, 3],), {}, "fp32", "sum over 4096 elements (>= reduce_fp32_min=4096): fp32 result"),
    (aten.mean.dim, (-4,), {}, "follow", "mean over 2 elements"),
    (aten.mean.dim, (3,), {}, "follow", "mean over 64 elements"),
    (aten.sum.default, (), {}, "fp32", "sum over 32768 elements (>= reduce_fp32_min=4096): fp32 result"),
    (aten.sum.dim_IntList, (), {"dim": [1]}, "follow", "sum over 4 elements"),
    (aten.sum.dim_IntList, ([4],), {}, "fp32", "sum over batch-dependent elements"),  # dim 4 of a 4-D x: no size read
    (aten.pow.Tensor_Scalar, (2,), {}, "follow", "pow by 2: a few exact-ish multiplications"),
    (aten.pow.Tensor_Scalar, (3.0,), {}, "follow", "pow by 3.0"),
    (aten.pow.Tensor_Scalar, (0,), {}, "follow", "pow by 0"),
    (aten.pow.Tensor_Scalar, (4,), {}, "fp32", "pow by 4: numerically sensitive"),
    (aten.pow.Tensor_Scalar, (-1,), {}, "fp32", "pow by -1"),
    (aten.pow.Tensor_Scalar, (2.5,), {}, "fp32", "pow by 2.5"),
    (aten.mm.default, (), {}, "low", "tensor-core op: 16-bit inputs, fp32 accumulation in the kernel"),
    (aten.layer_norm.default, ((64,),), {}, "norm", "reads 16-bit input and accumulates in fp32"),
    (aten.exp.default, (), {}, "fp32", "exp: exp/log chain"),
    (aten.var.correction, (), {}, "fp32", "var: variance: difference of large sums"),
    (aten.cumsum.default, (0,), {}, "fp32", "cumsum: long accumulation"),
    (aten.mse_loss.default, (), {}, "fp32", "mse_loss: loss function"),
    (aten.cosh.default, (), {}, "fp32", "cosh: numerically sensitive"),
    (aten.cat.default, (), {}, "follow", "follows its inputs' dtype"),
    (aten.add_.Tensor, (1.0,), {}, "inplace", "in-place op: writes into its argument"),
    (aten.lerp.Scalar, (1.0, 0.5), {}, "follow", "pointwise"),
    (aten.view.default, ([-1],), {}, "follow", "view"),
    (aten.bernoulli.p, (0.5,), {}, "follow", "random"),
    (aten.nonzero.default, (), {}, "keep", "no mixed-precision policy for this op: runs on its captured dtypes"),
])
def test_mixed_precision_policy_of_each_branch(target, args, kwargs, policy, reason):
    from fxopt.passes.mixed_precision import policy_of
    got, why = policy_of(_node(target, *args, **kwargs))
    assert got == policy and why.startswith(reason), (got, why)


def test_mixed_precision_reduce_threshold_is_inclusive_at_the_option_value():
    from fxopt.passes.mixed_precision import policy_of
    node = _node(aten.sum.dim_IntList, [-1])   # 64 elements per output
    assert policy_of(node, reduce_fp32_min=64)[0] == "fp32" and policy_of(node, reduce_fp32_min=65)[0] == "follow"


@pytest.mark.parametrize("src, mid, exact", [
    (torch.bfloat16, torch.float32, True), (torch.float16, torch.float64, True), (torch.float32, torch.float64, True),
    (torch.bfloat16, torch.bfloat16, True), (torch.float32, torch.bfloat16, False),
    (torch.bfloat16, torch.float16, False), (torch.float64, torch.float32, False),
])
def test_mixed_precision_a_widening_cast_is_exact(src, mid, exact):
    """Read off the formats: bf16 and fp16 values are all representable in fp32 and fp64, fp32 in fp64."""
    from fxopt.passes.mixed_precision import _exact
    assert _exact(src, mid) is exact
    x = torch.tensor([1 + 2 ** -7, 3.0e4, -2 ** -14], dtype=torch.float64).to(src)
    assert torch.equal(x.to(mid).to(src), x) or not exact


# ---------------------------------------------------------------------------------------------
# channels_last: the small facts the planner is built on, by hand


@pytest.mark.parametrize("make, want", [
    (lambda: torch.empty(2, 3, 4, 5), "nchw"),
    (lambda: torch.empty(2, 3, 4, 5).to(memory_format=torch.channels_last), "nhwc"),
    (lambda: torch.empty(2, 3, 1, 1), "both"),                  # strides fit either format
    (lambda: torch.empty(2, 5, 4, 3).permute(0, 3, 2, 1), "other"),
    (lambda: torch.empty(2, 3, 4), None),                       # not 4-D
    (lambda: torch.empty(2, 3, 4, 5, dtype=torch.int64), None),  # not floating
    (lambda: 3.0, None),
])
def test_channels_last_layout_of_by_strides(make, want):
    from fxopt.passes.channels_last import layout_of
    assert layout_of(make()) == want


def test_channels_last_small_helpers_by_hand():
    from fxopt.passes import channels_last as cl
    assert (cl._ps(1e-12), cl._ps(2.6e-12), cl._ps(-1.0), cl._ps(0.0)) == (1, 3, 0, 0)
    assert cl._fmt_bytes(2 ** 20) == "1.0 MiB" and cl._fmt_bytes(2 ** 20 - 512) == "1023.5 KiB"
    assert cl._fmt_us(1.5e-6) == "+1.5 us" and cl._fmt_us(-2e-6) == "-2.0 us"


@pytest.mark.parametrize("perm, want", [([0, 2, 3, 1], True), ([0, -2, -1, 1], True), ([0, 3, 1, 2], False),
                                        ([0, 1, 2, 3], False)])
def test_channels_last_only_the_nchw_to_nhwc_permute_is_free(perm, want):
    from fxopt.passes.channels_last import _to_nhwc_permute
    assert _to_nhwc_permute(_node(aten.permute.default, perm)) is want
    assert _to_nhwc_permute(_node(aten.view.default, perm)) is False


@pytest.mark.parametrize("target, args, kwargs, groups", [
    (aten.conv2d.default, (None, None, [1, 1], [0, 0], [1, 1], 4), {}, 4),
    (aten.conv2d.default, (None,), {"groups": 3}, 3),
    (aten.conv2d.default, (None,), {}, 1),
    (aten.convolution.default, (None, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 8), {}, 8),
    (aten.convolution.default, (None, None, [1, 1], [0, 0], [1, 1], False, [0, 0]), {}, 1),
])
def test_channels_last_conv_groups_read_from_each_schema(target, args, kwargs, groups):
    """conv2d(input, weight, bias, stride, padding, dilation, groups): groups is argument 6;
    convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups): 8."""
    from fxopt.passes.channels_last import _conv_groups
    assert _conv_groups(_node(target, *args, **kwargs)) == groups


@pytest.mark.parametrize("target, kwargs, any_layout", [
    (aten._to_copy.default, {"memory_format": torch.channels_last}, True),   # says its format: any input
    (aten._to_copy.default, {"memory_format": torch.preserve_format}, False),
    (aten._to_copy.default, {}, False),
    (aten.clone.default, {"memory_format": torch.contiguous_format}, True),
    (aten.relu.default, {}, False),
])
def test_channels_last_copies_with_an_explicit_format_read_any_layout(target, kwargs, any_layout):
    from fxopt.passes.channels_last import _any_layout
    assert _any_layout(_node(target, **kwargs)) is any_layout


def test_mixed_precision_cleanup_removes_a_cast_round_trip_the_model_wrote():
    """``conv(x).to(bf16).float().to(bf16)``: once the conv runs bf16, the first cast is a no-op and
    bf16 -> fp32 -> bf16 is the identity (every bf16 value is an fp32 value): relu reads the conv."""
    from nets import Fn
    model = Fn(lambda m, x: torch.relu(m.mods[0](x).to(torch.bfloat16).float().to(torch.bfloat16)),
               nn.Conv2d(4, 4, 1))
    gm, r = _mixed(model, torch.randn(2, 4, 4, 4))
    (relu,) = _calls(gm, "relu")
    assert relu.args[0].name == "conv2d" and relu.args[0].meta["val"].dtype is torch.bfloat16
    assert r.stats["removed_cast-noop"] == 1 and r.stats["removed_cast-roundtrip"] == 1
    assert any(d.reason == "cast-roundtrip: conv2d is bf16; bf16 -> fp32 -> bf16 is the identity"
               for d in r.decisions)


def test_mixed_precision_a_conv_after_an_fp32_op_still_runs_bf16():
    """exp keeps fp32 (numerically sensitive); the conv after it is tensor-core work: its fp32
    input is cast down, it does not follow the fp32 activation."""
    from nets import Fn
    model = Fn(lambda m, x: m.mods[0](torch.exp(x)), nn.Conv2d(4, 4, 1))
    gm, _ = _mixed(model, torch.randn(2, 4, 4, 4))
    (exp,), (conv,) = _calls(gm, "exp"), _calls(gm, "conv2d")
    assert exp.meta["val"].dtype is torch.float32 and conv.meta["val"].dtype is torch.bfloat16
    cast = conv.args[0]
    assert cast.target is aten._to_copy.default and cast.args[0] is exp and cast.kwargs["dtype"] is torch.bfloat16


# ---------------------------------------------------------------------------------------------
# fuse: region bookkeeping by hand


def test_fuse_region_row_and_table_by_hand():
    from fxopt.passes.fuse import RegionRecord, region_table
    fused = RegionRecord("r0", ["mul", "add"], ["mul", "add"], True, "fused", 3_000_000, 1_250_000, 12.34e-6, 5e-6)
    single = RegionRecord("r1", ["relu"], ["relu"], False, "one op: nothing to fuse", 10, 10)
    assert fused.row() == ["r0", "mul add", "3.00", "1.25", "12.3", "5.0", "fused"]
    assert single.row() == ["r1", "relu", "0.00", "0.00", "-", "-", "one op: nothing to fuse"]
    assert "r0" in region_table([fused, single]) and "r1" not in region_table([fused, single])
    assert "r1" in region_table([fused, single], singles=True)


def _graph_with_vals():
    """x[2, 3] fp32 -> relu -> view[6] -> neg: meta values as capture sets them."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 3)
    relu = g.call_function(aten.relu.default, (x,))
    relu.meta["val"] = torch.empty(2, 3)
    view = g.call_function(aten.view.default, (relu, [6]))
    view.meta["val"] = torch.empty(6)
    neg = g.call_function(aten.neg.default, (view,))
    neg.meta["val"] = torch.empty(6)
    g.output(neg)
    return fx.GraphModule(nn.Module(), g), (x, relu, view, neg)


def test_fuse_unfused_bytes_count_each_op_read_and_write_views_free():
    from fxopt.passes.fuse import _unfused_bytes
    _, (x, relu, view, neg) = _graph_with_vals()
    # relu reads 6 floats and writes 6, the view moves nothing, neg reads 6 and writes 6: 4 * 24 bytes
    assert _unfused_bytes([relu, view, neg], training=False) == 96
    assert _unfused_bytes([relu, view, neg], training=True) == 3 * 96   # the backward reads/writes ~2x more


def test_fuse_device_and_short_names():
    from fxopt.passes.fuse import _device, _short
    gm, (x, relu, view, neg) = _graph_with_vals()
    assert _device(gm) == "cpu" and _short(relu) == "relu" and _short(neg) == "neg"
    x.meta["val"] = torch.empty(2, 3, device="meta")
    assert _device(gm) == "meta"
    assert _device(_chain(aten.relu.default)) == "cpu"   # no values: the default


def test_fuse_topo_sort_moves_a_producer_before_its_user_and_keeps_the_rest():
    from fxopt.passes.fuse import _topo_sort
    gm, (x, relu, view, neg) = _graph_with_vals()
    sin = gm.graph.call_function(aten.sin.default, (x,))   # appended last, before the output
    neg.prepend(sin)
    relu.prepend(neg)                                       # neg now precedes what it reads
    _topo_sort(gm.graph)   # order now x, neg, relu, view, sin: neg waits for view, then goes before sin
    assert list(gm.graph.nodes)[:-1] == [x, relu, view, neg, sin]


def test_fuse_convex_means_no_path_leaves_and_comes_back():
    from fxopt.passes import PassContext as Ctx
    from fxopt.passes.fuse import _Former
    gm, (x, relu, view, neg) = _graph_with_vals()
    former = _Former(gm, Ctx(), {"max_ops": 24, "max_inputs": 8, "max_row": 1024})
    assert former.convex({relu, view, neg}) and former.convex({relu}) and former.convex({view, neg})
    assert not former.convex({relu, neg})   # relu -> view (outside) -> neg


def test_mixed_precision_a_models_no_op_cast_of_an_fp32_value_stays_an_fp32_no_op():
    """``aten._to_copy(exp(y), dtype=float32)`` (a cast to the dtype the value has): exp is fp32, so
    the cast follows its fp32 input and still casts to fp32 (its dtype is keyword-only)."""
    from nets import Fn
    model = Fn(lambda m, x: aten._to_copy(torch.exp(m.mods[0](x)), dtype=torch.float32) * 2, nn.Conv2d(4, 4, 1))
    gm, _ = _mixed(model, torch.randn(2, 4, 4, 4))
    (exp,) = _calls(gm, "exp")
    (cast,) = [n for n in _calls(gm, "_to_copy") if n.args[0] is exp]
    assert cast.kwargs["dtype"] is torch.float32 and cast.meta["val"].dtype is torch.float32
    assert _calls(gm, "conv2d")[0].meta["val"].dtype is torch.bfloat16


def test_dce_a_callable_that_declares_itself_seeded_is_kept():
    """Not an OpOverload (no tags): the ``_nondeterministic_seeded`` attribute alone marks it random."""
    def noisy(x):
        return x + torch.rand_like(x)

    noisy._nondeterministic_seeded = True
    gm, node = _dead(noisy)
    assert keep_reason(node)[0] == "random"
    quiet = lambda x: x  # noqa: E731
    assert keep_reason(_dead(quiet)[1]) is None


def test_channels_last_a_foldable_cast_converts_for_free_forward():
    """A ``_to_copy`` without a memory format takes the layout into its own copy: no extra forward
    copy; in training its gradient still needs one conversion, the price of one plain copy."""
    from fxopt.cost_models import load_hardware
    from fxopt.passes.channels_last import _Costs
    cast = _node(aten._to_copy.default, dtype=torch.bfloat16)
    plain = _node(aten.relu.default)
    for n in (cast, plain):
        n.meta["val"] = torch.empty(2, 4, 64, 64, device="meta")
    hw = load_hardware("h100")
    one = _Costs(hw, False, {}).copy(plain)
    assert one > 0 and _Costs(hw, False, {}).copy(cast) == 0.0
    assert _Costs(hw, True, {cast: True}).copy(cast) == one and _Costs(hw, True, {cast: False}).copy(cast) == 0.0
    assert _Costs(hw, True, {plain: True}).copy(plain) == 2 * one


def _two_convs():
    from nets import Fn
    return Fn(lambda m, x: m.mods[1](torch.relu(m.mods[0](x))).flatten(1),
              nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))


def _channels_last(pipeline: str):
    import warnings

    import fxopt
    from fxopt.passes import PassManager
    captured = fxopt.capture(_two_convs(), (torch.randn(2, 4, 6, 6),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (record,) = PassManager(pipeline, cost=False).run(captured)
    assert not record.rolled_back, record.note
    return gm, record


def test_channels_last_forced_region_is_logged_at_its_first_conv():
    _, r = _channels_last("channels-last{force=true}")
    (region,) = [d for d in r.decisions if d.action == "convert-region"]
    assert region.node == "conv2d" and region.reason.startswith("region of 2 conv(s) (mods.0 .. mods.1)")
    assert [d.node for d in r.decisions if d.action == "to-nhwc"] == ["conv2d", "conv2d_1"]


@pytest.mark.parametrize("scope, converts", [("mods.*", True), ("head.*", False), ("head.*;mods.1", True)])
def test_channels_last_scope_is_a_glob_or_a_list_of_globs(scope, converts):
    """A one-word scope is one glob (not its characters: ``head.*`` holds a ``*``), a ';'-list is several."""
    _, r = _channels_last(f"channels-last{{force=true,scope={scope}}}")
    assert r.modified is converts
    if not converts:
        (keep,) = [d for d in r.decisions if d.action == "keep-region"]
        assert keep.reason.endswith("stays NCHW: no conv in scope head.*")


def test_fuse_needs_a_gradient_for_float_values_not_masks_nor_user_inputs():
    from types import SimpleNamespace as NS

    from fxopt.passes.fuse import _needs
    g = fx.Graph()
    x, w = g.placeholder("x"), g.get_attr("w")
    act = g.call_function(aten.relu.default, (x,))
    program = NS(inputs=[NS(dtype="torch.float32"), NS(dtype="torch.bool"), NS(dtype="torch.float32"),
                         NS(dtype="torch.float32")])
    inputs = [(w, None), (act, None), (act, None), (x, None)]
    assert _needs(program, inputs, training=True) == (True, False, True, False)
    assert _needs(program, inputs, training=False) == (False, False, False, False)


def _view(target, src_shape, out_shape, *args):
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(src_shape, device="meta")
    n = g.call_function(target, (x, *args))
    n.meta["val"] = torch.empty(out_shape, device="meta")
    return n


def test_fuse_views_join_a_row_region_only_between_its_row_shapes():
    """A row region over [2, 8] reduced on its last dim has rows [2, 1] (keepdim) and [2]; a view
    between those is free, a permute is not (a permute only joins a pointwise region)."""
    from fxopt.codegen.lower import Domain
    from fxopt.passes.fuse import _Group, _view_domain
    rows = _Group([], Domain((2, 8), 1))
    assert _view_domain(_view(aten.view.default, (2, 1), (2,), [2]), rows) == Domain((2, 8), 1)
    assert _view_domain(_view(aten.expand.default, (2, 1), (2, 8), [2, 8]), rows) == Domain((2, 8), 1)
    assert _view_domain(_view(aten.view.default, (2, 8), (16,), [16]), rows) is None
    assert _view_domain(_view(aten.permute.default, (2, 8), (8, 2), [1, 0]), rows) is None
    pointwise = _Group([], Domain((2, 8)))
    assert _view_domain(_view(aten.view.default, (2, 8), (16,), [16]), pointwise) is None
    assert _view_domain(_view(aten.permute.default, (2, 8), (8, 2), [1, 0]), pointwise) == Domain((8, 2))
    assert _view_domain(_view(aten.permute.default, (8, 2), (2, 8), [1, 0]), pointwise) is None  # other space
    permuted = _Group([_view(aten.permute.default, (4, 4), (4, 4), [1, 0])], Domain((2, 8)))
    assert _view_domain(_view(aten.permute.default, (2, 8), (8, 2), [1, 0]), permuted) is None  # one permute only


def test_fuse_nothing_to_fuse_is_no_change():
    import fxopt
    from fxopt.passes import PassContext as Ctx
    from fxopt.passes.base import check_options
    from fxopt.passes.fuse import Fuse
    from nets import Lambda
    gm = fxopt.capture(Lambda(torch.relu), (torch.randn(2, 8),)).graph_module
    ctx = Ctx(training=False)
    ctx.begin("fuse", check_options(Fuse, {"fallback": "reference"}))
    result = Fuse().run(gm, ctx)
    assert result.modified is False


@pytest.mark.parametrize("outputs", [1, 2])
def test_fuse_fused_call_carries_one_value_or_a_tuple(outputs):
    """A fused region returning one tensor has that tensor as its value; returning two, a tuple read
    by getitems (what later passes and the cost model read off ``meta['val']``)."""
    import fxopt
    from fxopt.passes import PassContext as Ctx
    from fxopt.passes.base import check_options
    from fxopt.passes.fuse import Fuse
    from nets import Lambda

    def fn(x):
        a = x * 2.0
        b = torch.relu(a) + 1.0
        return b if outputs == 1 else (a, b)

    gm = fxopt.capture(Lambda(fn), (torch.randn(64, 1024),)).graph_module
    ctx = Ctx(training=False)
    ctx.begin("fuse", check_options(Fuse, {"fallback": "reference"}))
    assert Fuse().run(gm, ctx).modified   # the pass alone: the manager would re-propagate the values
    (call,) = [n for n in gm.graph.nodes if n.op == "call_function" and not str(n.target).startswith("aten.")
               and n.target is not __import__("operator").getitem]
    v = call.meta["val"]
    if outputs == 1:
        assert isinstance(v, torch.Tensor) and tuple(v.shape) == (64, 1024)
    else:
        assert isinstance(v, tuple) and [tuple(t.shape) for t in v] == [(64, 1024)] * 2
        assert len(call.users) == 2


# ---------------------------------------------------------------------------------------------
# sdpa: the estimate's dropout term by hand


def test_sdpa_dropout_adds_drawing_and_applying_the_mask_to_the_unfused_estimate():
    """Unfused dropout on the n attention weights: draw n one-byte mask elements, then read the
    weights (es bytes each) and the mask, write the weights: n * (2 * es + 1) bytes. The fused kernel
    draws its mask inside, so the gain grows by exactly those two kernels (eval: forward only)."""
    import dataclasses

    import fxopt
    from fxopt.cost_models import call_time, load_hardware
    from fxopt.passes import PassContext
    from fxopt.passes.normalize import RULES
    from fxopt.passes.rewrite import apply_rules
    from fxopt.passes.sdpa import estimate_gain, match_attention
    from test_sdpa import B, H, L, _inputs, _model
    gm = fxopt.capture(_model("mul_scale").eval(), _inputs("mul_scale")).graph_module
    apply_rules(gm, PassContext(), RULES)
    att = match_attention(next(n for n in gm.graph.nodes if n.target is aten.softmax.int))
    assert not att.dropout_p
    hw, n, es = load_hardware("h100"), B * H * L * L, 4
    by_hand = (call_time("random", "float32", n, n, 1, hw).total_s
               + call_time("pointwise", "float32", n, n * (2 * es + 1), 1, hw).total_s)
    with_dropout = dataclasses.replace(att, dropout_p=0.1)   # the same attention, with dropout
    assert estimate_gain(with_dropout, "h100", training=False) - estimate_gain(att, "h100", training=False) == \
        pytest.approx(by_hand)


def test_sdpa_a_four_d_tril_mask_is_proved_causal():
    """``tril(ones(L, L)).view(1, 1, L, L)`` (a computed mask, not a buffer) masks exactly the causal
    entries: it becomes ``is_causal=True`` whatever its leading broadcast dims."""
    import warnings

    import fxopt
    from fxopt.passes import PassManager
    from nets import Lambda
    L, D = 8, 16

    def attention(q, k, v):
        keep = torch.tril(torch.ones(L, L, dtype=torch.bool)).view(1, 1, L, L)
        scores = (q @ k.transpose(-2, -1) * D ** -0.5).masked_fill(~keep, float("-inf"))
        return torch.softmax(scores, -1) @ v

    qkv = [torch.randn(2, 4, L, D, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (r,) = PassManager("sdpa", cost=False).run(fxopt.capture(Lambda(attention).eval(), tuple(qkv)))
    (sdpa,) = _calls(gm, "scaled_dot_product_attention")
    q, k, v, mask, dropout_p, is_causal = sdpa.args
    assert is_causal is True and mask is None


# ---------------------------------------------------------------------------------------------
# epilogue: every spelling of a 2-D weight transpose


@pytest.mark.parametrize("dims", [(1, 0), (-1, -2), (1, -2), (-1, 0)])
def test_epilogue_matmul_by_any_spelling_of_a_transposed_weight_plus_bias_becomes_linear(dims):
    import warnings

    import fxopt
    from fxopt.passes import PassManager

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(6, 8)), nn.Parameter(torch.randn(6))

        def forward(self, x):
            return x @ self.w.permute(*dims) + self.b

    captured = fxopt.capture(M().eval(), (torch.randn(4, 8),))
    assert [n.args[1] for n in captured.graph_module.graph.nodes if n.target is aten.permute.default] == [list(dims)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (r,) = PassManager("epilogue", cost=False).run(captured)
    assert r.modified, r.decisions
    (linear,) = _calls(gm, "linear")
    assert linear.args[1].op == "get_attr" and linear.args[1].target == "w"


def test_epilogue_probe_sees_a_differentiable_addmm_activation(monkeypatch):
    """The probe's own GEMM is well formed: with an ``_addmm_activation`` that has a derivative (here
    relu(addmm), a stand-in for a later torch) it answers True."""
    from types import SimpleNamespace

    from fxopt.passes import epilogue
    fake = SimpleNamespace(_addmm_activation=lambda b, x, w: torch.relu(torch.addmm(b, x, w)))
    epilogue.addmm_activation_differentiable.cache_clear()
    monkeypatch.setattr(epilogue, "aten", fake)
    try:
        assert epilogue.addmm_activation_differentiable() is True
    finally:
        epilogue.addmm_activation_differentiable.cache_clear()


# ---------------------------------------------------------------------------------------------
# rewrite: the rule driver stops at the first sweep that changes nothing


def test_rewrite_driver_stops_at_the_first_sweep_without_a_change():
    from fxopt.passes.rewrite import Rewrite, Rule, apply_rules
    seen = []

    def neg_of_neg(node, facts, ctx):   # neg(neg(x)) -> x; a lone neg is no match
        seen.append(node.name)
        inner = node.args[0]
        if isinstance(inner, fx.Node) and inner.target is aten.neg.default:
            return Rewrite(inner.args[0], "neg(neg(x)) is x")
        return None

    gm = _chain(aten.neg.default, aten.neg.default, aten.relu.default)
    stats = apply_rules(gm, PassContext(), [Rule("neg-neg", (aten.neg.default,), neg_of_neg)])
    (relu,) = [n for n in gm.graph.nodes if n.target is aten.relu.default]
    assert relu.args[0].op == "placeholder" and stats == {"neg-neg": 1}
    # sweep 1: neg (no match), neg_1 (rewritten); sweep 2: the inner neg, now dead, no match; then stop
    assert seen == ["neg_default", "neg_default_1", "neg_default"]


@pytest.mark.parametrize("costed", [True, False])
def test_rewrite_a_built_call_is_logged_with_zero_gain_when_costed(costed):
    """Replacing a node by a new call of about the same cost: the documented default gain is 0 s on
    a costed graph (no estimate otherwise)."""
    from fxopt.passes.rewrite import Call, Rewrite, Rule, apply_rules

    def relu_to_clamp(node, facts, ctx):
        return Rewrite(Call(aten.clamp_min.default, (node.args[0], 0.0)), "relu is clamp_min(x, 0)")

    gm = _chain(aten.relu.default)
    ctx = PassContext()
    ctx.begin("p", {}, {"relu_default": 3e-6} if costed else None)
    apply_rules(gm, ctx, [Rule("relu-clamp", (aten.relu.default,), relu_to_clamp)])
    (d,) = ctx.decisions
    assert d.action == "rewrite" and d.reason == "relu-clamp: relu is clamp_min(x, 0)"
    assert d.est_gain_s == (0.0 if costed else None)
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [aten.clamp_min.default]


def test_rewrite_hidden_writes_name_the_running_statistics_in_each_schema():
    """Each op that updates running statistics without saying so in its schema: the flag index is its
    ``training``/``use_input_stats`` argument and the written ones are ``running_mean``/``running_var``."""
    from fxopt.passes.rewrite import HIDDEN_WRITES
    for op, (flag, written) in HIDDEN_WRITES.items():
        names = [a.name for a in op._schema.arguments]
        assert names[flag] in ("training", "use_input_stats"), op
        assert [names[i] for i in written] == ["running_mean", "running_var"], op


def test_provenance_insert_call_keeps_provenance_and_skips_a_val_it_cannot_compute():
    """A node a pass inserts carries the replaced node's provenance and a fake ``val`` computed on its
    arguments' fakes; an op that fails on them (a shape error) is still inserted, without ``val``
    (the manager's propagation reports real problems)."""
    from torch import fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxopt.passes.provenance import insert_call
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = FakeTensorMode().from_tensor(torch.randn(2, 3))
    x.meta["stack_trace"] = "model.py:7"
    out = g.output(x)
    bad = insert_call(g, torch.ops.aten.mm.default, (x, x), {}, before=out, like=x)  # [2,3] @ [2,3]
    assert "val" not in bad.meta and bad.meta["stack_trace"] == "model.py:7"
    good = insert_call(g, torch.ops.aten.relu.default, (x,), {}, before=out, like=x, name="act")
    assert tuple(good.meta["val"].shape) == (2, 3) and good.name == "act"
    assert [n.name for n in g.nodes] == ["x", "mm_default", "act", "output"]  # fx names an unnamed node by its target
    # both anchors are nodes: a positional call that swaps ``before`` and ``like`` would insert in the
    # wrong place with the wrong provenance, silently; they are keyword-only
    with pytest.raises(TypeError):
        insert_call(g, torch.ops.aten.relu.default, (x,), {}, out, x)


# ---- graph_utils (split out of the manager) ---------------------------------------------------


def test_graph_utils_propagate_meta_fills_every_value_of_a_traced_graph():
    """A graph without metadata (fx.symbolic_trace) gets a fake ``val`` per node from the example
    inputs: tensors with eager's shapes, Python ints kept as ints."""
    from fxopt.passes.graph_utils import propagate_meta

    class M(nn.Module):
        def forward(self, x):
            n = x.size(0)
            return torch.relu(x).reshape(n, -1) * 2

    gm = torch.fx.symbolic_trace(M())
    propagate_meta(gm, (torch.randn(4, 3, 2),))
    vals = {n.name: n.meta.get("val") for n in gm.graph.nodes if n.op != "output"}
    assert vals["size"] == 4 and isinstance(vals["size"], int)
    assert tuple(vals["relu"].shape) == (4, 3, 2) and tuple(vals["mul"].shape) == (4, 6)
    assert all(isinstance(v, torch._subclasses.FakeTensor) for k, v in vals.items() if k != "size")


def test_graph_utils_without_dtype_asserts_drops_only_unused_checks_on_a_copy():
    from fxopt.passes.graph_utils import without_dtype_asserts
    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.call_function(torch.ops.aten._assert_tensor_metadata.default, (x,), {"dtype": torch.float32})
    y = g.call_function(torch.ops.aten.relu.default, (x,))
    g.output(y)
    gm = torch.fx.GraphModule(nn.Module(), g)
    clean = without_dtype_asserts(gm)
    assert [n.op for n in clean.graph.nodes] == ["placeholder", "call_function", "output"]
    assert len(gm.graph.nodes) == 4  # the original keeps its check
    assert torch.equal(clean(torch.tensor([-1.0, 2.0], dtype=torch.float64)), torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_graph_utils_propagation_adds_no_guard_to_a_dynamic_batch():
    """Bilinear upsampling's meta function guards on the batch size; propagating a dynamic-batch
    capture must not specialize it (the shape env is shared with the captured graph)."""
    import copy

    from torch._guards import detect_fake_mode

    import fxopt
    from fxopt.passes.graph_utils import propagate_meta

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Upsample(scale_factor=2, mode="bilinear"))
    captured = fxopt.capture(model, (torch.randn(2, 3, 8, 8),), dynamic_batch=True)
    gm = copy.deepcopy(captured.graph_module)
    mode = detect_fake_mode([n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"])
    guards = len(mode.shape_env.guards)
    propagate_meta(gm)
    last = [n for n in gm.graph.nodes if n.op == "call_function"][-1].meta["val"]
    assert isinstance(last.shape[0], torch.SymInt) and tuple(last.shape[1:]) == (4, 16, 16)
    assert len(mode.shape_env.guards) == guards


def test_graph_utils_propagation_runs_submodules_holding_real_weights():
    """fx.symbolic_trace keeps ``nn.Linear`` as a call_module whose weight is a real tensor; the
    fake mode must accept it (propagation would otherwise refuse every traced model with layers)."""
    from fxopt.passes.graph_utils import propagate_meta

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(3, 5), nn.ReLU()))
    propagate_meta(gm, (torch.randn(4, 3),))
    vals = {n.name: n.meta["val"] for n in gm.graph.nodes if n.op != "output"}
    assert tuple(vals["_0"].shape) == (4, 5) and tuple(vals["_1"].shape) == (4, 5)
    assert isinstance(vals["_1"], torch._subclasses.FakeTensor)


def test_graph_utils_propagation_converts_real_attributes_for_a_strict_fake_mode():
    """Placeholders may carry fakes of a strict mode (``allow_non_fake_inputs=False``, torch's
    default); a real parameter read by a get_attr node is converted to that mode's fake instead
    of reaching an op next to fakes (which the mode refuses)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from fxopt.passes.graph_utils import propagate_meta

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return x + self.bias

    gm = torch.fx.symbolic_trace(M())
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    x.meta["val"] = FakeTensorMode().from_tensor(torch.randn(4, 5))
    propagate_meta(gm)
    vals = {n.name: n.meta["val"] for n in gm.graph.nodes if n.op != "output"}
    assert isinstance(vals["bias"], FakeTensor) and tuple(vals["add"].shape) == (4, 5)


def test_graph_utils_run_graph_records_snapshots_not_live_tensors():
    """``record`` keeps each node's value as it was when computed: an in-place op later in the graph
    must not change an earlier node's recorded value (the divergence search compares them)."""
    from fxopt.passes.graph_utils import run_graph

    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0), name="mul")
    z = g.call_function(torch.ops.aten.add_.Tensor, (y, 1.0), name="add_")
    g.output(z)
    gm = torch.fx.GraphModule(nn.Module(), g)
    inp = torch.tensor([1.0, -2.0])
    out, values = run_graph(gm, (inp,), {}, record=True)
    assert torch.equal(values["mul"], torch.tensor([2.0, -4.0]))
    assert torch.equal(values["add_"], torch.tensor([3.0, -3.0])) and torch.equal(inp, torch.tensor([1.0, -2.0]))


def test_graph_utils_as_module_deepcopy_copies_a_separate_state():
    """``AsModule(gm, state)`` exposes ``state``'s parameter names; its deep copy must keep them (a
    copy of the state, not of the graph module) and share no tensor with the original."""
    import copy

    from fxopt.passes.graph_utils import AsModule

    gm = torch.fx.symbolic_trace(nn.Linear(2, 3))
    state = nn.Sequential(nn.Linear(2, 3))
    state[0].weight.data.copy_(gm.weight.data)
    state[0].bias.data.copy_(gm.bias.data)
    clone = copy.deepcopy(AsModule(gm, state))
    assert [k for k, _ in clone.named_parameters()] == ["0.weight", "0.bias"]
    assert clone._state is not state and clone._gm is not gm
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(clone.parameters(), state.parameters()))
    own = copy.deepcopy(AsModule(gm))
    assert [k for k, _ in own.named_parameters()] == ["weight", "bias"] and own._state is own._gm


def test_verification_divergence_compares_integer_values_exactly():
    """Integer node values (argmax, indices) are compared for equality: equal ones are no divergence,
    a difference is, reported as the largest absolute difference."""
    from fxopt.passes.verification import find_divergence

    def graph(offset):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        idx = g.call_function(torch.ops.aten.argmax.default, (x, 1), name="idx")
        out = g.call_function(torch.ops.aten.add.Tensor, (idx, offset), name="shifted")
        g.output(g.call_function(torch.ops.aten.mul.Tensor, (out, 1), name="out"))
        return torch.fx.GraphModule(nn.Module(), g)

    x = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert find_divergence(graph(0), graph(0), (x,), {}) is None
    div = find_divergence(graph(0), graph(1), (x,), {})
    assert div.node == "shifted" and div.max_abs_diff == 1.0


def test_verification_differs_by_hand():
    """The value comparison of the divergence search, case by case: shape and dtype mismatches,
    the relative threshold (``rtol`` times the reference's largest magnitude, at least 1e-6),
    sequences judged by their worst element, Python numbers compared as values."""
    from dataclasses import FrozenInstanceError

    from fxopt.passes.verification import Divergence, _differs

    t = torch.tensor
    assert _differs(torch.zeros(2), torch.zeros(3), 1e-4) == (True, None)
    assert _differs(torch.zeros(2), torch.zeros(2, dtype=torch.float64), 1e-4) == (True, None)
    assert _differs(torch.zeros(2), torch.zeros(2, dtype=torch.float64), 1e-4, any_dtype=True) == (False, 0.0)
    assert _differs(t([100.0, 1.0]), t([100.5, 1.0]), 1e-2) == (False, 0.5)      # 0.5 <= 0.01 * 100
    assert _differs(t([100.0, 1.0]), t([102.0, 1.0]), 1e-2) == (True, 2.0)       # 2 > 1
    assert _differs(t([100.0]), t([101.0]), 1e-2) == (False, 1.0)                 # at the threshold: agrees
    assert _differs([], [], 1e-4) == (False, 0.0)
    assert _differs(t([0.0, 0.0]), t([1e-12, 0.0], dtype=torch.float32), 1e-4)[0] is False  # floor 1e-6
    assert _differs(t([0.0, 0.0]), t([1e-8, 0.0]), 1e-4)[0] is True                         # 1e-8 > 1e-10
    assert _differs([t([1.0]), t([2.0])], [t([1.0]), t([2.0])], 1e-4) == (False, 0.0)
    assert _differs([t([1.0]), t([2.0])], [t([1.0]), t([3.0])], 1e-4) == (True, 1.0)
    assert _differs([t([1.0])], [t([1.0]), t([1.0])], 1e-4) == (True, None)
    assert _differs([t([1.0, 2.0])], t([[1.0, 2.0]]), 1e-4) == (True, None)   # a list is not a tensor
    c = torch.tensor([1 + 1j, 2 - 1j])
    assert _differs(c, c.clone(), 1e-4) == (False, 0.0) and _differs(c, c + 1j, 1e-4) == (True, 1.0)  # imaginary part
    assert _differs(3, 3, 1e-4)[0] is False and _differs(3, 4, 1e-4) == (True, 1.0)
    assert _differs(None, None, 1e-4) == (False, None)
    assert _differs(t([1.0]), None, 1e-4) == (True, None) and _differs(None, t([1.0]), 1e-4) == (True, None)
    empty = torch.zeros(0, dtype=torch.int64)
    assert _differs(empty, empty, 1e-4) == (False, 0.0)
    div = Divergence("add", 1.0)
    with pytest.raises(FrozenInstanceError):  # a finding is a value: it is reported, never edited
        div.node = "mul"


def test_verification_verify_graphs_takes_keyword_inputs():
    """Keyword example inputs reach both models as keywords; positional and keyword together are
    refused before anything runs."""
    from fxopt.passes.base import PassError
    from fxopt.passes.verification import verify_graphs

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).relu()

    model = M()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(4, 3)
    result = verify_graphs(model, gm, (), {"x": x}, training=False)
    assert result.ok and result.checks
    with pytest.raises(PassError, match="not both"):
        verify_graphs(model, gm, (x,), {"x": x}, training=False)


def test_manager_resolves_instances_classes_and_names_alike():
    """A pipeline may name a pass, give its class or an instance (alone or in a list, with options);
    each resolves to an instance with its full options."""
    from fxopt.passes.manager import _resolve
    from fxopt.passes.dce import DeadCodeElimination as DCE

    inst = DCE()
    for spec in ("dce", DCE, inst, [inst], [DCE], [(inst, {})]):
        (p, options), = _resolve(spec)
        assert isinstance(p, DCE) and options == {k: o.default for k, o in DCE.options.items()}
    assert _resolve(inst)[0][0] is inst and _resolve([inst])[0][0] is inst


def test_manager_format_ms_by_hand():
    from fxopt.passes.manager import format_ms
    assert format_ms(0.0123) == "12.300" and format_ms(2) == "2000.000" and format_ms(None) == "-"
    import sympy
    assert format_ms(sympy.Symbol("s0") * 1e-3) == "0.001*s0"


def test_manager_timing_table_by_hand():
    """The pass-by-pass table: status from (rolled_back, modified), pass time in ms, step times in ms,
    the step-time change in percent of the time before, '-' where there is nothing to compare."""
    from fxopt.passes.manager import PassRecord, timing_table

    def rec(name, modified, rolled_back, before, after, time_s=0.0125):
        return PassRecord(name, modified, {}, [], "", time_s, before, after, rolled_back=rolled_back)

    text = timing_table([rec("fuse", True, False, 0.010, 0.008), rec("sdpa", False, False, 0.008, 0.008),
                         rec("channels-last", True, True, 0.008, 0.0, time_s=0.5), rec("dce", False, False, None, None)])
    rows = [line.split() for line in text.splitlines()[2:]]
    assert rows[0] == ["1", "fuse", "changed", "12.5", "10.000", "8.000", "-20.0", "0", "-"]
    assert rows[1] == ["2", "sdpa", "no", "change", "12.5", "8.000", "8.000", "+0.0", "0", "-"]
    assert rows[2] == ["3", "channels-last", "rolled", "back", "500.0", "8.000", "0.000", "-100.0", "0", "-"]
    assert rows[3] == ["4", "dce", "no", "change", "12.5", "-", "-", "-", "0", "-"]


def test_base_undeclared_counters_and_families():
    """A counter is declared by name or by a ``prefix*`` family; only the rest are undeclared."""
    from fxopt.passes.base import Pass, undeclared

    class Counting(Pass):
        name = "counting-test"
        statistics = {"fused": "regions fused", "kept_*": "kept, per reason"}

    assert undeclared(Counting, {"fused": 1, "kept_relu": 2, "kept_": 0, "bogus": 3, "fused_x": 1}) == ["bogus", "fused_x"]


def test_base_check_order_ignores_constraints_on_absent_passes():
    """An ordering constraint binds only when both passes are in the pipeline."""
    from fxopt.passes.base import PipelineError, check_order

    check_order(["channels-last"])                      # after mixed-precision, which is absent
    check_order(["fold-bn"])                            # before mixed-precision, absent
    check_order(["fold-bn", "mixed-precision", "channels-last"])
    with pytest.raises(PipelineError, match="must run after 'mixed-precision'"):
        check_order(["channels-last", "mixed-precision"])


def test_fuse_fused_time_counts_the_backward_kernel():
    """A fused relu over a [4, 8] fp32 activation, by hand: forward reads and writes 128 B each
    (256 B); in training the backward kernel reads the output gradient and the saved output and
    writes the input gradient (384 B more) and is one more launch, so it adds at least the memory
    latency of one kernel to the predicted time."""
    import fxopt
    from fxopt.codegen import classify, lower
    from fxopt.cost_models.hardware import load_hardware
    from fxopt.passes.fuse import _fused_time

    gm = fxopt.capture(nn.Sequential(nn.Linear(8, 8), nn.ReLU()).train(), (torch.randn(4, 8),)).graph_module
    nodes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default]
    low = lower(nodes, classify(nodes[0])[1])
    hw = load_hardware("h100")
    (b_inf, t_inf), (b_train, t_train) = _fused_time(low, False, hw), _fused_time(low, True, hw)
    assert (b_inf, b_train) == (256, 256 + 384)
    assert t_inf >= hw.kernel_param("memory")["latency_s"]
    assert t_train - t_inf >= hw.kernel_param("memory")["latency_s"]


def test_manager_a_raising_pass_is_rolled_back_and_dumped(tmp_path):
    """A pass that raises is rolled back, the pipeline goes on, and the dump keeps the note and the
    whole error text (every line)."""
    import fxopt
    from fxopt.passes import PassManager
    from fxopt.passes.base import Pass, PassError

    class Broken(Pass):
        name = "broken-test"

        def run(self, gm, ctx):
            raise PassError("cannot do this\nsecond line of the reason")

    captured = fxopt.capture(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), (torch.randn(2, 3),))
    gm, (rec, dce) = PassManager([Broken(), "dce"], cost=False, dump_dir=tmp_path).run(captured)
    assert rec.rolled_back and rec.error.endswith("PassError: cannot do this\nsecond line of the reason")
    assert rec.note == "raised, rolled back: " + rec.error.splitlines()[0] and dce.name == "dce"
    (dump,) = tmp_path.glob("*broken-test*.rolled_back.txt")
    assert dump.read_text() == rec.note + "\n" + rec.error + "\n"


def test_manager_next_pass_gets_the_costed_node_times():
    """In a costed pipeline each pass after a kept one still sees per-node times, so its forwards are
    priced (the removed node's time), not left without an estimate."""
    import fxopt
    from fxopt.passes import PassManager

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop = nn.Linear(8, 8), nn.Dropout(0.0)

        def forward(self, x):
            return self.drop(self.lin(x).clone())

    captured = fxopt.capture(M(), (torch.randn(4, 8),))
    pipeline = "normalize{rules=noop-copy;},normalize{rules=identity-dropout;}"
    gm, (a, b) = PassManager(pipeline, cost=True).run(captured)
    assert a.modified and not a.rolled_back
    gains = [d.est_gain_s for d in b.decisions if d.action == "remove"]
    assert gains and all(isinstance(g, float) for g in gains), b.decisions  # priced (0 s here), not unknown


def test_verification_divergence_dtype_change_counts_only_without_a_declared_precision():
    """A node computed in another dtype with the same values is a divergence for an fp32 pass
    (reported as "different shape/dtype"), and none for a pass that declares a 16-bit precision."""
    from fxopt.passes.verification import find_divergence

    def graph(dtype):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        y = g.call_function(torch.ops.aten.mul.Tensor, (x, 2.0), name="twice")
        if dtype is not None:
            y = g.call_function(torch.ops.prims.convert_element_type.default, (y, dtype), name="cast")
        g.output(g.call_function(torch.ops.aten.add.Tensor, (y, 1.0), name="out"))
        return torch.fx.GraphModule(nn.Module(), g)

    x = torch.tensor([0.5, -1.0])
    div = find_divergence(graph(None), graph(torch.bfloat16), (x,), {})
    assert div is not None and div.node == "out" and div.max_abs_diff is None
    assert find_divergence(graph(None), graph(torch.bfloat16), (x,), {}, precision=torch.bfloat16) is None


def test_verification_divergence_walks_past_new_nodes_and_uses_eight_bf16_units():
    """Nodes a pass created are skipped, not the end of the walk: the first old node after one that
    differs is reported with the new node as its input. A declared bf16 precision allows 8 units of
    bf16 rounding (8 x 2^-7 = 0.0625 relative): 0.065 is a divergence, 0.06 is not."""
    from fxopt.passes.verification import failure_text, find_divergence

    def graph(factor, extra=False):
        g = torch.fx.Graph()
        x = g.placeholder("x")
        y = g.call_function(torch.ops.aten.mul.Tensor, (x, 1.0), name="a")
        if extra:
            y = g.call_function(torch.ops.aten.mul.Tensor, (y, factor), name="new")
        z = g.call_function(torch.ops.aten.add.Tensor, (y, 0.0), name="b")
        g.output(g.call_function(torch.ops.aten.mul.Tensor, (z, 1.0), name="out"))
        return torch.fx.GraphModule(nn.Module(), g)

    x = torch.tensor([1.0, -1.0])
    div = find_divergence(graph(1.0), graph(2.0, extra=True), (x,), {})
    assert (div.node, div.max_abs_diff, div.new_inputs) == ("b", 1.0, ("new",))
    bf = torch.bfloat16
    assert find_divergence(graph(1.0), graph(1.065, extra=True), (x,), {}, precision=bf).node == "b"
    assert find_divergence(graph(1.0), graph(1.06, extra=True), (x,), {}, precision=bf) is None
    assert failure_text("a plain failure") == "a plain failure"

    class Check:
        name, note, cand_error, allowed = "w.grad", "", 0.5, 0.25
    assert failure_text(Check()) == "w.grad: error 0.5 > allowed 0.25"
    Check.note = "missing in the candidate"
    assert failure_text(Check()) == "w.grad: missing in the candidate"
    from fxopt.passes.verification import Divergence
    assert str(Divergence("b", 1.0, ("new",))) == "b (max abs diff 1; fed by new node(s) new)"
    assert str(Divergence("b", None)) == "b (different shape/dtype)"
