"""The ``channels-last`` pass: golden diffs, cost-model decisions, layouts, numerics in train and eval.

Two kinds of cases:

* realistic sizes (bf16, batch 64, 64 channels at 56x56, captured on CPU: export only traces, nothing
  is computed) where the cost model decides: a stack converts with one copy at the input and one
  before ``flatten``; a depthwise conv at the exit stays NCHW and says why; a 1x1 + tiny-channel
  model is left untouched (``modified is False``); ResNet-50 converts its whole trunk;
* tiny sizes with ``force=true`` (every copy costs a 4 us launch there, so the cost model rightly
  says no): the same structures verified numerically with :func:`fxopt.verify` (outputs, grads,
  parameters after an SGD step, BN statistics) on the zoo and HF conv models, train and eval.

``FXOPT_ACCEPT=1 pytest tests/test_channels_last.py`` rewrites the goldens.
"""
from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
import fxopt.passes.channels_last as cl  # registers the pass
from fxopt import zoo
from fxopt.cost_models import load_hardware
from fxopt.graphtext import canonical_text, unified_diff
from fxopt.passes import PassContext, PassManager, PipelineError
from fxopt.passes.graph_utils import AsModule as _AsModule
from fxopt.passes.rewrite import val

import goldens  # noqa: E402  (tests/goldens.py: shared golden-file check)

GOLDEN = Path(__file__).parent / "golden" / "channels-last"
aten = torch.ops.aten
CL = torch.channels_last


# ---------------------------------------------------------------------------------------------
# harness


def run(model: nn.Module, inputs, pipeline: str = "channels-last", verify: bool = False, **kw):
    """Capture, run ``pipeline``; returns (diff, last record, graph, captured)."""
    captured = fxopt.capture(model, inputs)
    gm, records = PassManager(pipeline, verify=verify, cost=False, **kw).run(captured)
    diff = unified_diff(canonical_text(captured.graph_module), canonical_text(gm), pipeline)
    return diff, records[-1], gm, captured


@functools.lru_cache(maxsize=None)
def zoo_captured(name: str, mode: str):
    """A tiny zoo model captured once per session (passes never modify a Captured)."""
    torch.manual_seed(0)
    model = zoo.build(name, tiny=True).train(mode == "train")
    return fxopt.capture(model, zoo.example_inputs(name, 1, tiny=True))


@functools.lru_cache(maxsize=None)
def zoo_forced(name: str, mode: str):
    """``channels-last{force=true}`` on a tiny zoo model, verified: (record, graph module)."""
    gm, (r,) = PassManager("channels-last{force=true}", verify=True, cost=False).run(zoo_captured(name, mode))
    return r, gm


def check_golden(case: str, text: str) -> None:
    goldens.check(GOLDEN / f"{case}.diff", text)

def decisions(record, action: str | None = None) -> dict:
    """{node name: decision} of one action (the conv decisions are keyed by their conv node)."""
    return {d.node: d for d in record.decisions if action is None or d.action == action}


def conversions(gm) -> list:
    return [n for n in gm.graph.nodes if n.target is aten._to_copy.default and "memory_format" in n.kwargs]


def assert_channels_last_convs(gm) -> int:
    """Every conv the pass made NHWC reads an NHWC input and weight (meta strides), and every tensor on
    the way from the previous conv (or the region's input conversion) is NHWC: no NCHW in between,
    so no NHWC->NCHW->NHWC ping-pong. Returns the number of such convs."""
    count = 0
    for conv in gm.graph.nodes:
        if conv.target not in cl.CONV_OPS or conv.meta.get(cl.LAYOUT_META) != "nhwc":
            continue
        count += 1
        x, w = val(conv.args[0]), val(conv.args[1])
        assert x.is_contiguous(memory_format=CL) and w.is_contiguous(memory_format=CL), conv.name
        stack, seen = [conv.args[0]], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            assert cl.layout_of(val(n)) in ("nhwc", "both"), f"{n.name} feeding {conv.name} is NCHW"
            if n.target is aten._to_copy.default and n.kwargs.get("memory_format") == CL:
                src = n.args[0]  # a region input: must not undo a conversion to NCHW
                assert src.kwargs.get("memory_format") != torch.contiguous_format, f"ping-pong at {n.name}"
                continue
            if n.target in cl.CONV_OPS or cl._carrying(n) is None:
                continue  # the previous conv, or an op that makes its own layout (permute of a layer norm)
            stack += [a for a in n.all_input_nodes if cl.layout_of(val(a)) is not None]
    return count


class Stack(nn.Module):
    """conv-BN-ReLU blocks from a spec string (d: dense 3x3, w: depthwise 3x3, g: grouped 3x3,
    p: 1x1, t: 3x3 to 4 channels), then average pool or flatten, then a linear head."""

    def __init__(self, spec: str, c: int = 64, head: str = "pool", hw: int = 56, cin: int | None = None):
        super().__init__()
        layers, ch = [], cin or c
        for s in spec:
            k, g, out = {"d": (3, 1, c), "w": (3, ch, ch), "g": (3, 4, c), "p": (1, 1, c), "t": (3, 1, 4)}[s]
            layers += [nn.Conv2d(ch, out, k, padding=k // 2, groups=g, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            ch = out
        self.body = nn.Sequential(*layers)
        self.head = head
        self.fc = nn.Linear(ch if head == "pool" else ch * hw * hw, 10)

    def forward(self, x):
        y = self.body(x)
        y = F.adaptive_avg_pool2d(y, 1) if self.head == "pool" else y
        return self.fc(y.flatten(1))


def realistic(spec: str, head: str = "pool"):
    """A bf16 model and input at training sizes (batch 64, 64 x 56 x 56): captured, never run."""
    torch.manual_seed(0)
    return Stack(spec, head=head).to(torch.bfloat16), torch.randn(64, 64, 56, 56, dtype=torch.bfloat16)


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# the cost model decides (realistic sizes)


def test_stack_converts_with_copies_only_at_input_and_before_flatten():
    diff, r, gm, _ = run(*realistic("dddddd", head="flatten"))
    check_golden("conv_stack_cost", diff)
    assert r.modified
    assert r.stats["conversions_to_nhwc"] == 1 and r.stats["conversions_to_nchw"] == 1
    assert r.stats["weights_to_nhwc"] == 6 and r.stats["convs_nhwc"] == 6
    entry, exit_ = [n for n in conversions(gm) if n.op == "call_function" and n.args[0].op != "get_attr"]
    assert entry.args[0].op == "placeholder" and entry.kwargs["memory_format"] == CL
    assert [u.target for u in exit_.users] == [aten.flatten.using_ints]  # the copy back sits before flatten
    assert assert_channels_last_convs(gm) == 6
    (region,) = decisions(r, "convert-region").values()
    assert region.est_gain_s > 0 and r.stats["est_gain_us"] == pytest.approx(region.est_gain_s * 1e6, abs=1e-3)
    # every conversion inserted is logged with its (negative) estimated cost; they add up to the stat
    inserted = decisions(r, "insert-conversion")
    assert set(inserted) == {n.name for n in conversions(gm)}
    assert sum(-d.est_gain_s for d in inserted.values()) * 1e6 == pytest.approx(r.stats["conversion_est_us"], abs=0.01)


def test_depthwise_conv_at_the_exit_stays_nchw():
    diff, r, gm, _ = run(*realistic("ddddddw", head="flatten"))
    check_golden("depthwise_stays_nchw", diff)
    dw = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default and n.args[6:] == (64,))
    d = decisions(r)[dw.name]
    assert d.action == "keep-nchw" and d.est_gain_s < 0
    assert d.reason == "conv body.18 stays NCHW: depthwise conv (groups=64 = C_in), 16-bit tensor cores: " \
                       "CL est. 1.25x slower"
    assert cl.layout_of(val(dw.args[0])) == "nchw"  # the region's copy back to NCHW sits before it
    assert r.stats["convs_nhwc"] == 6 and r.stats["convs_nchw"] == 1


def test_depthwise_and_grouped_between_dense_convs_are_converted_anyway():
    """Keeping them NCHW would need two copies (out of and back into NHWC): dearer than their loss."""
    _, r, gm, _ = run(*realistic("dddwgddd"))
    assert r.stats["convs_nhwc"] == 8 and r.stats["conversions_to_nhwc"] == 1
    assert r.stats.get("conversions_to_nchw", 0) == 0  # adaptive pool -> [N, C, 1, 1] is both layouts
    for what, slower in (("depthwise conv (groups=64 = C_in), 16-bit tensor cores", "1.25x"),
                         ("grouped conv (groups=4), 16-bit tensor cores", "1.3x")):
        d = next(d for d in r.decisions if what in d.reason)
        assert f"CL est. {slower} slower; converted anyway" in d.reason and d.est_gain_s < 0
    assert assert_channels_last_convs(gm) == 8


def test_pointwise_and_tiny_channel_convs_no_change():
    model, x = realistic("pt")
    captured = fxopt.capture(model, x)
    before = canonical_text(captured.graph_module)
    gm, (r,) = PassManager("channels-last", cost=False).run(captured)
    assert r.modified is False and r.diff == "" and canonical_text(gm) == before
    d = decisions(r)
    assert d["conv2d"].action == "keep-nchw" and "1x1 conv, 16-bit tensor cores: CL est. 1.5x faster" in \
        d["conv2d"].reason and "its region stays NCHW" in d["conv2d"].reason
    assert d["conv2d_1"].action == "keep-nchw" and "tiny channel count (C_in=64, C_out=4; < 8)" in d["conv2d_1"].reason
    (region,) = decisions(r, "keep-region").values()
    assert region.est_gain_s < 0 and "conversions cost more than the convs gain" in region.reason


def test_resnet50_converts_its_whole_trunk():
    """The peers' headline case: one copy of the input, weights converted in the graph, and nothing
    back: the adaptive pool's [N, 2048, 1, 1] is NCHW and NHWC at once, so flatten needs no copy."""
    torch.manual_seed(0)
    model = zoo.build("resnet50").to(torch.bfloat16)
    _, r, gm, _ = run(model, zoo.example_inputs("resnet50", 32)[0].to(torch.bfloat16))
    assert r.stats["convs_nhwc"] == 53 and r.stats["conversions_to_nhwc"] == 1
    assert "conversions_to_nchw" not in r.stats and r.stats["weights_to_nhwc"] == 17  # the 3x3 and 7x7 ones
    assert r.stats["est_gain_us"] > 100
    stem = decisions(r)["conv2d"]
    assert stem.action == "to-nhwc" and "tiny channel count (C_in=3" in stem.reason
    assert "converted anyway" in stem.reason  # slower itself, but its input is 21x smaller than its output
    assert assert_channels_last_convs(gm) == 53


def test_costs_are_the_roofline_primitives():
    """Hand-derived: a conversion is a read + write at bandwidth plus a launch, again in the backward
    for a tensor that needs a gradient; a conv's gain is its roofline time times (speedup - 1): the cost model
    puts a dense conv at the roofline in NHWC and `speedup` times slower in NCHW."""
    model, x = realistic("d")
    captured = fxopt.capture(model, x)
    ctx = PassContext(hardware="h100", training=True)
    ctx.begin("channels-last", {"force": False, "scope": "*"})
    plan = cl._Planner(captured.graph_module, ctx)
    hw = load_hardware("h100")
    nodes = {n.name: n for n in captured.graph.nodes}
    nbytes = 64 * 64 * 56 * 56 * 2
    mp = hw.kernel_param("memory")
    # a copy: read + write at the memory class's share of bandwidth, ramped by size, plus a kernel latency
    one = (2 * nbytes + mp["ramp_bytes"]) / (hw.memory_bandwidth * mp["efficiency"]["memory"]) + mp["latency_s"]
    assert plan.costs.copy(nodes["x"]) == pytest.approx(one)            # the input needs no gradient
    assert plan.costs.copy(nodes["relu"]) == pytest.approx(2 * one)     # an activation does
    flops = 2 * 64 * 64 * 56 * 56 * 64 * 9                             # 2 N C_out H W C_in k k
    p = hw.kernel_param("matrix")["bf16"]   # a large GEMM: the biggest tile's reuse, a 4096-long K loop
    sustained = p["eff"] * (1 - p["reuse"] * (1 / 128 + 1 / 256)) * 4096 / (4096 + p["k_half"])
    peak = hw.tensor_flops["bf16"] * sustained * hw.kernel_param("kind_eff")["conv"]
    # forward and weight gradient (x needs none), each compute-bound at the conv's sustained bf16 rate
    assert flops / peak > (2 * nbytes + 64 * 64 * 9 * 4) / (hw.memory_bandwidth * mp["efficiency"]["memory"])
    assert plan.costs.conv(nodes["conv2d"]) == pytest.approx(2 * flops / peak)
    assert plan.conv_gain(nodes["conv2d"]) == pytest.approx(2 * flops / peak * (1.8 - 1))
    conv = nodes["conv2d"]
    assert cl.NHWC_SPEEDUP["dense"]["16bit"] == 1.8 and cl.nhwc_speedup(val(conv.args[0]), val(conv.args[1])) == 1.8
    w = torch.empty(64, 1, 3, 3)  # the table's classes, from tensors: what a layout-aware cost model would call
    assert cl.conv_class_of(torch.empty(2, 64, 8, 8), w, 64)[0] == "depthwise"
    assert cl.nhwc_speedup(torch.empty(2, 64, 8, 8, dtype=torch.bfloat16), torch.empty(64, 16, 3, 3), 4) == 0.77
    assert cl.conv_class_of(torch.empty(2, 12, 8, 8, dtype=torch.half), torch.empty(16, 12, 3, 3), 1)[0] == "unaligned"
    assert cl.conv_class_of(torch.empty(2, 64, 8, 8), torch.empty(64, 64, 1, 1), 1) == ("1x1", "1x1 conv")


# ---------------------------------------------------------------------------------------------
# forced at tiny sizes: structure and numerics


def test_conv_bn_relu_conv_forced_golden_and_numerics():
    torch.manual_seed(0)
    model = Stack("dd", c=16, head="flatten", hw=6, cin=8).train()
    diff, r, gm, _ = run(model, _x(2, 8, 6, 6), "channels-last{force=true}", verify=True)
    check_golden("conv_bn_relu_conv_forced", diff)
    assert r.modified and not r.rolled_back and r.verification, r.note
    assert r.stats["conversions_to_nhwc"] == 1 and r.stats["conversions_to_nchw"] == 1
    assert assert_channels_last_convs(gm) == 2
    (region,) = decisions(r, "convert-region").values()
    assert "(force=true)" in region.reason and region.est_gain_s < 0  # honest: at this size it is a loss


def test_driving_fpn_region_golden():
    captured = zoo_captured("driving", "train")
    pipeline = "channels-last{force=true,scope=fpn.*;}"
    gm, (r,) = PassManager(pipeline, cost=False).run(captured)
    check_golden("driving_fpn", unified_diff(canonical_text(captured.graph_module), canonical_text(gm), pipeline))
    converted = {d.node for d in r.decisions if d.action == "to-nhwc"}
    assert converted == {f"conv2d_{i}" for i in range(12, 18)}  # 3 laterals + 3 outputs
    outside = decisions(r)["conv2d_18"]
    assert outside.action == "keep-nchw" and "outside scope fpn.*" in outside.reason
    # the backbone features enter once each (relu_4 and relu_6 also feed backbone convs, which stay NCHW;
    # the last stage's relu feeds the FPN only, so the copy moves before it: the same bytes, at the
    # region's boundary); the FPN outputs leave before the depth head and the token views
    entries = sorted(n.args[0].name for n in conversions(gm) if n.kwargs["memory_format"] == CL
                     and n.args[0].op != "get_attr")
    exits = sorted(n.args[0].name for n in conversions(gm) if n.kwargs["memory_format"] == torch.contiguous_format)
    assert entries == ["add_3", "relu_4", "relu_6"] and exits == ["conv2d_15", "conv2d_16", "conv2d_17"]
    assert r.stats["weights_to_nhwc"] == 3  # the 3x3 outputs; 1x1 weights are NCHW and NHWC at once
    assert assert_channels_last_convs(gm) == 6


ZOO_CONV = ["resnet50", "convnext_t", "driving"]


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", ZOO_CONV)
def test_zoo_numerics(name, mode):
    r, gm = zoo_forced(name, mode)
    assert r.modified and not r.rolled_back and r.verification, r.note or r.verification.table()
    assert assert_channels_last_convs(gm) >= 1


HF = {
    "resnet": lambda t: (t.ResNetForImageClassification(t.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=10)), 64),
    "convnext": lambda t: (t.ConvNextForImageClassification(t.ConvNextConfig(
        hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], image_size=32, num_labels=10)), 32),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(HF))
def test_hf_numerics(name, mode):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, size = HF[name](transformers)
    model.train(mode == "train")
    _, r, gm, _ = run(model, {"pixel_values": _x(1, 3, size, size)}, "channels-last{force=true}", verify=True)
    assert r.modified and not r.rolled_back and r.verification, r.note or r.verification.table()
    assert assert_channels_last_convs(gm) >= 1


def test_training_keeps_parameter_layout_and_optimizer_state():
    """Weights are converted in the graph: parameters stay NCHW fp32 masters, their gradients come back
    NCHW (autograd's accumulation obeys the parameter's layout) and so does the optimizer state."""
    captured = zoo_captured("resnet50", "train")
    _, gm = zoo_forced("resnet50", "train")
    with warnings.catch_warnings():  # deep-copying a graph module: torch's own pytree FutureWarning
        warnings.simplefilter("ignore", FutureWarning)
        module = _AsModule(copy.deepcopy(gm))
    assert list(module.state_dict()) == list(captured.graph_module.state_dict())
    assert any(n.target is aten._to_copy.default and n.kwargs.get("memory_format") == CL
               and n.args[0].op == "get_attr" for n in gm.graph.nodes)
    sgd = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        sgd.zero_grad()
        module(*captured.example_args).sum().backward()
        sgd.step()
    convs = [(n, p) for n, p in module.named_parameters() if p.dim() == 4]
    assert len(convs) == 17
    for name, p in convs:
        assert p.is_contiguous() and p.grad.is_contiguous(), name
        assert sgd.state[p]["momentum_buffer"].is_contiguous(), name


def test_folds_layout_into_mixed_precision_casts():
    pytest.importorskip("fxopt.passes.mixed_precision")
    pipeline = "mixed-precision{dtype=bf16},channels-last{force=true}"
    gm, (_, r) = PassManager(pipeline, cost=False).run(zoo_captured("resnet50", "train"))
    # the input cast and every 3x3/7x7 weight cast now also convert: one copy, no extra node
    assert r.stats["folded_casts"] == 6 and "weights_to_nhwc" not in r.stats and "conversions_to_nhwc" not in r.stats
    folded = [n for n in gm.graph.nodes if n.target is aten._to_copy.default and n.kwargs.get("memory_format") == CL]
    assert all(n.kwargs["dtype"] == torch.bfloat16 for n in folded) and len(folded) == 6
    assert assert_channels_last_convs(gm) == 17


# ---------------------------------------------------------------------------------------------
# what is not matched, and why


class InPlace(nn.Module):
    """ReLU(inplace=True) writes the BN output; a view of it needs NCHW: it must not be copied."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.relu = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        y = self.relu(self.bn(self.c1(x)))
        return self.c2(y).flatten(1).sum(1, keepdim=True) + y.view(y.shape[0], -1)[:, :1]


def test_tensor_written_in_place_is_never_copied():
    _, r, gm, _ = run(InPlace(), _x(2, 8, 6, 6), "channels-last{force=true}", verify=True)
    assert r.verification, r.note
    copied = {n.args[0].name for n in conversions(gm)}
    assert not copied & {"batch_norm", "relu_"}
    c2 = decisions(r)["conv2d_1"]
    assert c2.action == "keep-nchw" and "its input relu_ is written in place" in c2.reason


def test_transposed_conv_and_non_4d_are_left_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(16, 16, 2, stride=2)
            self.c1d = nn.Conv1d(16, 16, 3)

        def forward(self, x):
            return self.up(x).sum() + self.c1d(x.flatten(2)).sum()

    _, r, _, _ = run(M(), _x(2, 16, 8, 8), "channels-last{force=true}")
    assert r.modified is False and r.stats["regions"] == 0 and r.decisions == []


def test_bad_input_is_a_clear_error():
    captured = fxopt.capture(Stack("d", c=8, hw=4), _x(1, 8, 4, 4))
    gm = captured.graph_module
    del next(n for n in gm.graph.nodes if n.target is aten.conv2d.default).meta["val"]
    ctx = PassContext()
    ctx.begin("channels-last", {"force": False, "scope": "*"})
    with pytest.raises(cl.LayoutError, match="needs node.meta\\['val'\\].*conv2d has none.*fxopt.capture"):
        cl.ToChannelsLast().run(gm, ctx)
    with pytest.raises(PipelineError, match="has no option 'layout'"):
        PassManager("channels-last{layout=nhwc}")
