"""channels-last rules the mutation run found unchecked, each against a hand-derived expectation:

* a consumer that reads either layout (a reduction, an explicit-format copy, a size-only
  ``_assert_tensor_metadata``) or the free ``permute(x, [0, 2, 3, 1])`` gets the NHWC tensor as it is,
  no copy back to NCHW;
* ``_assert_tensor_metadata(x, size)`` (size given, no stride) does not look at strides;
* a weight conversion's log line names the parameter (``mods.0.weight``), or the node computing it;
* ``est_gain_us`` is the region's gain in microseconds: the convs' gains minus the conversions' costs.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fxopt
import fxopt.passes.channels_last as cl
from fxopt.passes import PassManager
from nets import add_dtype_check, Fn  # noqa: E402  (tests/nets.py)

aten = torch.ops.aten


def _x(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype)


def _run(captured, pipeline="channels-last{force=true}"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (record,) = PassManager(pipeline, cost=False).run(captured)
    assert not record.rolled_back, record.note
    return gm, record


def _layout_copies(gm, fmt):
    return [n for n in gm.graph.nodes if n.target is aten._to_copy.default and n.kwargs.get("memory_format") == fmt]


# ---- consumers that need no copy back ----------------------------------------------------------

def test_channels_last_any_layout_and_permute_consumers_get_the_nhwc_tensor_as_is():
    """conv -> relu -> {mean over H, W; permute to NHWC}: forced NHWC, the relu's result is read by a
    reduction (same result in either layout) and by ``permute(0, 2, 3, 1)`` (contiguous only when its
    input is NHWC). By hand: one copy in (the input), one weight, and no copy back to NCHW."""
    model = Fn(lambda m, x: (torch.relu(m.mods[0](x)).mean((2, 3)), torch.relu(m.mods[0](x)).permute(0, 2, 3, 1)),
               nn.Conv2d(4, 4, 3, padding=1))
    gm, r = _run(fxopt.capture(model, (_x(2, 4, 6, 6),)))
    assert r.stats["conversions_to_nhwc"] == 1 and r.stats["weights_to_nhwc"] == 1
    assert "conversions_to_nchw" not in r.stats and _layout_copies(gm, torch.contiguous_format) == []
    readers = [n for n in gm.graph.nodes if n.target in (aten.mean.dim, aten.permute.default)]
    assert len(readers) == 2 and all(n.args[0].meta.get(cl.LAYOUT_META) == "nhwc" for n in readers)
    for p in (n for n in readers if n.target is aten.permute.default):
        assert p.meta["val"].is_contiguous()  # NHWC permuted to [N, H, W, C]: no copy downstream
    x = _x(2, 4, 6, 6)
    for got, want in zip(gm(x), model(x)):
        torch.testing.assert_close(got, want)


def test_channels_last_a_graph_output_still_gets_nchw_back():
    """The same relu returned as a graph output: the caller expects the captured (NCHW) strides, so
    exactly one copy back to NCHW, feeding the output, while the mean reads the NHWC tensor."""
    model = Fn(lambda m, x: (lambda y: (y, y.mean((2, 3))))(torch.relu(m.mods[0](x))), nn.Conv2d(4, 4, 3, padding=1))
    gm, r = _run(fxopt.capture(model, (_x(2, 4, 6, 6),)))
    (back,) = _layout_copies(gm, torch.contiguous_format)
    assert r.stats["conversions_to_nchw"] == 1 and [u.op for u in back.users] == ["output"]
    (mean,) = [n for n in gm.graph.nodes if n.target is aten.mean.dim]
    assert mean.args[0] is back.args[0] and mean.args[0].meta.get(cl.LAYOUT_META) == "nhwc"


# ---- _assert_tensor_metadata: strides checked only when a stride is given -----------------------

def _assert_node(*args, **kwargs):
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["val"] = torch.empty(2, 4, 6, 6, device="meta")
    return g.call_function(aten._assert_tensor_metadata.default, (x, *args), kwargs)


@pytest.mark.parametrize("args, kwargs, any_layout", [
    ((), {}, True),
    (([2, 4, 6, 6],), {}, True),                  # size only: strides not looked at
    (([2, 4, 6, 6], None), {}, True),
    (([2, 4, 6, 6], [144, 36, 6, 1]), {}, False),  # NCHW strides asserted
    ((), {"stride": [144, 36, 6, 1]}, False),
    ((), {"dtype": torch.float32}, True),
])
def test_channels_last_assert_tensor_metadata_reads_any_layout_unless_it_checks_strides(args, kwargs, any_layout):
    """_assert_tensor_metadata(a, size=None, stride=None, dtype=None, ...): a layout only matters when
    a stride is given."""
    assert cl._any_layout(_assert_node(*args, **kwargs)) is any_layout


def test_channels_last_a_size_check_needs_no_copy_back():
    """A ``_assert_tensor_metadata(relu, None, dtype=float32)`` (two positional arguments, no stride)
    added after the forced conv's relu checks no strides: the relu runs NHWC and nothing is copied
    back to NCHW for the check. (A size given in the graph fails torch's own fake check: it compares
    a list with ``torch.Size``, so the unit test above covers that form.)"""
    captured = fxopt.capture(Fn(lambda m, x: torch.relu(m.mods[0](x)).sum((2, 3)), nn.Conv2d(4, 4, 3, padding=1)),
                             (_x(2, 4, 6, 6),))
    g = captured.graph_module.graph
    (relu,) = [n for n in g.nodes if n.target is aten.relu.default]
    add_dtype_check(captured, relu)
    gm, r = _run(captured)
    assert "conversions_to_nchw" not in r.stats and r.stats["conversions_to_nhwc"] == 1
    (check,) = [n for n in gm.graph.nodes if n.target is aten._assert_tensor_metadata.default]
    assert check.args[0].target is aten.relu.default and check.args[0].meta.get(cl.LAYOUT_META) == "nhwc"


# ---- the log line of a weight conversion --------------------------------------------------------

def test_channels_last_weight_conversion_names_the_parameter():
    """A parameter read by ``get_attr``: the line names its module path (``mods.0.weight``), not the
    graph node (``mods_0_weight``)."""
    _, r = _run(fxopt.capture(Fn(lambda m, x: m.mods[0](x).sum((2, 3)), nn.Conv2d(4, 4, 3, padding=1)),
                              (_x(2, 4, 6, 6),)))
    (w,) = [d for d in r.decisions if d.action == "insert-conversion" and d.node == "mods_0_weight_nhwc"]
    assert w.reason.startswith("weight mods.0.weight to NHWC in the graph (the parameter stays an NCHW master): ")


def test_channels_last_computed_weight_conversion_names_its_node():
    """A weight computed in the graph (two views of the parameter, outside the region) has no parameter
    path: the line names the node (``view_1``), not its op."""
    model = Fn(lambda m, x: F.conv2d(x, m.mods[0].weight.view(4, 36).view(4, 4, 3, 3), padding=1).sum((2, 3)),
               nn.Conv2d(4, 4, 3, bias=False))
    gm, r = _run(fxopt.capture(model, (_x(2, 4, 6, 6),)))
    (conv,) = [n for n in gm.graph.nodes if n.target in cl.CONV_OPS]
    w_copy = conv.args[1]
    assert w_copy.kwargs == {"memory_format": torch.channels_last} and w_copy.args[0].target is aten.view.default
    assert r.stats["weights_to_nhwc"] == 1
    (w,) = [d for d in r.decisions if d.action == "insert-conversion" and d.node == w_copy.name]
    assert w.reason.startswith(f"weight {w_copy.args[0].name} to NHWC in the graph (the parameter stays an NCHW "
                               f"master): ") and w_copy.args[0].name == "view_1"


# ---- est_gain_us ---------------------------------------------------------------------------------

def test_channels_last_est_gain_us_is_the_region_gain_in_microseconds():
    """Eight dense 3x3 convs (bf16, 64 x 256 x 56 x 56, captured, never run) and a flatten: the cost
    model converts with a gain of about 6 ms. The region's gain is the convs' gains minus every copy
    the cut pays (input, eight weights, one back before the flatten), each logged on its own; the stat
    is their sum in us (to the ps the cut rounds to; a gain this size shows a 1e-6 relative error)."""
    model = nn.Sequential(*[nn.Conv2d(256, 256, 3, padding=1, bias=False) for _ in range(8)], nn.Flatten())
    _, r = _run(fxopt.capture(model.to(torch.bfloat16), (_x(64, 256, 56, 56, dtype=torch.bfloat16),)),
                "channels-last")
    convs = [d.est_gain_s for d in r.decisions if d.action == "to-nhwc"]
    copies = [d.est_gain_s for d in r.decisions if d.action == "insert-conversion"]
    assert len(convs) == 8 and len(copies) == 10 and all(c < 0 for c in copies)
    want_us = (sum(convs) + sum(copies)) * 10 ** 6
    assert want_us > 1000
    assert abs(r.stats["est_gain_us"] - want_us) < 5e-4 + 20 * 1e-6  # rounding: 3 decimals, 1 ps per edge


# ---- a [N, C, 1, 1] conv result: its layout follows the input, not the weight ----------------------

@pytest.mark.parametrize("pipeline", ["channels-last", "channels-last{force=true}"])
def test_channels_last_a_conv_to_one_pixel_on_nhwc_input_already_runs_nhwc(pipeline):
    """A 3x3 conv on a 3x3 channels-last input: its [2, 8, 1, 1] result has strides of both layouts,
    but the conv reads an NHWC input, so it already runs NHWC (the NCHW weight parameter does not
    decide that). By hand: nothing to convert, forced or not: no weight copy, no change."""
    model = Fn(lambda m, x: torch.relu(m.mods[0](x)).flatten(1), nn.Conv2d(8, 8, 3))
    captured = fxopt.capture(model, (_x(2, 8, 3, 3).to(memory_format=torch.channels_last),))
    (conv,) = [n for n in captured.graph_module.graph.nodes if n.target in cl.CONV_OPS]
    assert cl.layout_of(conv.meta["val"]) == "both" and cl.layout_of(conv.args[1].meta["val"]) == "nchw"
    gm, r = _run(captured, pipeline)
    assert r.modified is False and _layout_copies(gm, torch.channels_last) == []
    assert r.stats["convs_nhwc"] == 1 and "convs_nchw" not in r.stats and "weights_to_nhwc" not in r.stats
    assert [d.action for d in r.decisions if d.node == "conv2d"] == ["already-nhwc"]
