"""Tests written to kill surviving mutants of ``passes/sdpa.py`` (``tools/mutation.py``).

Masks written with ``torch.where`` (both argument orders) are fused and checked against a float64
softmax-attention reference; the cost estimate with a float additive mask is re-derived by hand
from the formula in ``estimate_gain``'s docstring.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxopt
from fxopt.passes import PassManager

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
L, D = 8, 16
SCALE = D ** -0.5


def _sdpa(captured, pipeline="sdpa"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        gm, (r,) = PassManager(pipeline, cost=False).run(captured)
    return gm, r


class WhereMasked(nn.Module):
    """Scaled scores masked with ``torch.where``; ``form`` picks the argument order / fill."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.register_buffer("keep", torch.tril(torch.ones(L, L, dtype=torch.bool)))

    def forward(self, q, k, v, pad):
        s = q @ k.transpose(-2, -1) * SCALE
        if self.form == "keep":      # where(keep, scores, -inf): aten.where.ScalarOther
            s = torch.where(self.keep, s, float("-inf"))
        elif self.form == "fill":    # where(masked, -inf, scores): aten.where.ScalarSelf
            s = torch.where(pad, float("-inf"), s)
        else:                        # a tensor fill: aten.where.self
            s = torch.where(pad, torch.full_like(s, -1e9), s)
        return torch.softmax(s, -1) @ v


def _inputs():
    q, k, v = (torch.randn(2, 4, L, D, generator=torch.Generator().manual_seed(i)) for i in range(3))
    pad = torch.zeros(2, 1, 1, L, dtype=torch.bool)
    pad[1, ..., 5:] = True           # True = a padded key; no row is masked entirely
    return q, k, v, pad


def _reference(q, k, v, masked):
    """float64 softmax attention with ``masked`` keys at -inf."""
    s = (q.double() @ k.double().transpose(-2, -1)) * SCALE
    return torch.softmax(s.masked_fill(masked, float("-inf")), -1) @ v.double()


@pytest.mark.parametrize("form, where", [("keep", aten.where.ScalarOther), ("fill", aten.where.ScalarSelf)])
def test_sdpa_where_with_a_number_fill_becomes_sdpa_with_a_keep_mask(form, where):
    """``where(keep, s, -inf)`` and ``where(pad, -inf, s)`` are masks like ``masked_fill``: the
    attention becomes one SDPA call with a boolean keep mask and computes the same function."""
    model = WhereMasked(form).eval()
    q, k, v, pad = _inputs()
    captured = fxopt.capture(model, (q, k, v, pad))
    assert sum(n.target is where for n in captured.graph_module.graph.nodes) == 1
    gm, r = _sdpa(captured)
    assert r.stats.get("fused") == 1, r.decisions
    (sdpa,) = [n for n in gm.graph.nodes if n.target is SDPA]
    assert sdpa.args[3] is not None and sdpa.args[4:] == (0.0, False)
    assert sdpa.kwargs["scale"] == pytest.approx(SCALE, rel=1e-6)
    assert not any(n.target in (aten.softmax.int, where) for n in gm.graph.nodes)
    masked = ~model.keep if form == "keep" else pad
    torch.testing.assert_close(gm(q, k, v, pad).double(), _reference(q, k, v, masked), rtol=1e-5, atol=1e-5)


def test_sdpa_where_with_a_tensor_fill_is_kept_and_says_why():
    """A tensor fill value (``aten.where.self``) is not a scalar mask SDPA can take: nothing changes."""
    captured = fxopt.capture(WhereMasked("tensor").eval(), _inputs())
    gm, r = _sdpa(captured)
    assert r.stats.get("fused") is None and r.stats.get("kept") == 1, r.decisions
    keep = r.decisions[-1]
    assert keep.action == "keep" and "from where (aten.where.self)" in keep.reason, keep.reason
    assert not any(n.target is SDPA for n in gm.graph.nodes)


def test_sdpa_estimate_by_hand_with_a_float_additive_mask():
    """Eval, fp32, scores * c + mask with a float32 mask [B, 1, L, L]: the unfused add step reads
    and writes the scores and reads the mask's B*L*L*4 bytes; the fused kernel reads the mask once.
    Every term is call_time of the docstring's bytes and FLOPs, written out here."""
    from fxopt.cost_models import Precision, call_time, load_hardware
    from fxopt.passes import PassContext
    from fxopt.passes.normalize import RULES
    from fxopt.passes.rewrite import apply_rules
    from fxopt.passes.sdpa import estimate_gain, match_attention
    from test_sdpa import B, H, _inputs as attn_inputs, _model
    from test_sdpa import D as d, L as l
    inputs = attn_inputs("additive_mask")
    assert inputs[1].shape == (B, 1, l, l) and inputs[1].dtype == torch.float32
    gm = fxopt.capture(_model("additive_mask").eval(), inputs).graph_module
    apply_rules(gm, PassContext(), RULES)
    att = match_attention(next(n for n in gm.graph.nodes if n.target is aten.softmax.int))
    hw, prec = load_hardware("h100"), Precision.from_torch()

    def t(cls, flops, nbytes):
        return call_time(cls, "float32", flops, nbytes, 1, hw, prec).total_s
    n, es = B * H * l * l, 4
    qkv, mask = B * H * l * d * es, B * l * l * 4
    gemm = 2 * B * H * l * l * d
    unfused = (t("matmul", gemm, 2 * qkv + n * es) + t("matmul", gemm, n * es + 2 * qkv)
               + t("softmax", 5 * n, 2 * n * es)
               + t("pointwise", n, 2 * n * es)             # * scale
               + t("pointwise", n, 2 * n * es + mask))     # + mask
    fused = t("attention", 4 * B * H * l * l * d, 4 * qkv + mask + B * H * l * 4)
    assert estimate_gain(att, "h100", training=False) == pytest.approx(unfused - fused, rel=1e-9)


class Spelled(nn.Module):
    """q @ k^T * c, an optional boolean mask written as masked_fill(not(m), -inf), an optional
    dropout switched off by its train flag."""

    def __init__(self, scale=SCALE, mask=False, dropout=False):
        super().__init__()
        self.scale, self.mask, self.dropout = scale, mask, dropout

    def forward(self, q, k, v, m):
        s = q @ k.permute(0, 1, 3, 2) * self.scale  # canonical already: runs with canonicalize=false
        if self.mask:
            s = s.masked_fill(torch.logical_not(m), float("-inf"))
        p = torch.softmax(s, -1)
        if self.dropout:
            p = torch.nn.functional.dropout(p, 0.1, training=False)
        return p @ v


def _keep():
    keep = torch.rand(2, 1, L, L, generator=torch.Generator().manual_seed(5)) < 0.7
    keep[..., 0] = True              # no row is masked entirely
    return keep


@pytest.mark.parametrize("scale", [0.0, float("inf")])
def test_sdpa_a_zero_or_infinite_scale_is_kept_and_says_why(scale):
    """SDPA's scale must be a finite non-zero number: scores * 0 or * inf stay unfused."""
    q, k, v, _ = _inputs()
    gm, r = _sdpa(fxopt.capture(Spelled(scale).eval(), (q, k, v, _keep())))
    assert r.stats.get("fused") is None and r.stats.get("kept") == 1, r.decisions
    assert f"mul: scale {scale!r} is not a finite non-zero number" in r.decisions[-1].reason, r.decisions[-1].reason
    assert not any(n.target is SDPA for n in gm.graph.nodes)


def test_sdpa_masked_fill_by_not_of_a_bool_mask_passes_the_mask_itself():
    """masked_fill(logical_not(keep), -inf) with a bool ``keep``: SDPA's keep mask is ``keep``
    itself, no logical_not left in the graph."""
    q, k, v, _ = _inputs()
    keep = _keep()
    gm, r = _sdpa(fxopt.capture(Spelled(mask=True).eval(), (q, k, v, keep)))
    assert r.stats.get("fused") == 1, r.decisions
    (sdpa,) = [n for n in gm.graph.nodes if n.target is SDPA]
    assert sdpa.args[3].op == "placeholder" and sdpa.args[3].target == "m"
    assert not any(n.target in (aten.logical_not.default, aten.bitwise_not.default) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(q, k, v, keep).double(), _reference(q, k, v, ~keep), rtol=1e-5, atol=1e-5)


def test_sdpa_masked_fill_by_not_of_a_float_mask_keeps_a_boolean_mask():
    """logical_not of a float 0/1 mask is a bool mask; passing the float mask on unchanged would make
    SDPA add it to the scores. The fused graph still masks exactly the zero entries."""
    q, k, v, _ = _inputs()
    keep = _keep().float()
    gm, r = _sdpa(fxopt.capture(Spelled(mask=True).eval(), (q, k, v, keep)))
    assert r.stats.get("fused") == 1, r.decisions
    (sdpa,) = [n for n in gm.graph.nodes if n.target is SDPA]
    assert sdpa.args[3].meta["val"].dtype == torch.bool
    torch.testing.assert_close(gm(q, k, v, keep).double(), _reference(q, k, v, keep == 0), rtol=1e-5, atol=1e-5)


def test_sdpa_dropout_with_train_false_is_no_dropout():
    """``F.dropout(p, 0.1, training=False)`` is captured as dropout(p, 0.1, False): an identity, so
    SDPA gets dropout_p=0 and the result is deterministic softmax attention. canonicalize=false keeps
    normalize from dropping that dropout first: the pass itself must read its train flag."""
    q, k, v, _ = _inputs()
    captured = fxopt.capture(Spelled(dropout=True).train(), (q, k, v, _keep()))
    (drop,) = [n for n in captured.graph_module.graph.nodes if n.target is aten.dropout.default]
    assert drop.args[1:] == (0.1, False)
    gm, r = _sdpa(captured, "sdpa{canonicalize=false}")
    assert r.stats == {"fused": 1} and "-> dropout(0.1) ->" in r.decisions[-1].reason, r.decisions
    (sdpa,) = [n for n in gm.graph.nodes if n.target is SDPA]
    assert sdpa.args[4] == 0.0
    nothing = torch.zeros(2, 1, L, L, dtype=torch.bool)
    torch.testing.assert_close(gm(q, k, v, _keep()).double(), _reference(q, k, v, nothing), rtol=1e-5, atol=1e-5)


def test_sdpa_dropout_with_a_graph_valued_train_flag_is_kept():
    """A dropout whose train flag is a graph value (here a SymBool-like ``sym_size(q, 0) > 1`` node
    spliced into the captured graph) is not a constant: refused, whatever the probability."""
    import operator
    q, k, v, _ = _inputs()
    captured = fxopt.capture(Spelled(dropout=True).train(), (q, k, v, _keep()))
    g = captured.graph_module.graph
    (drop,) = [n for n in g.nodes if n.target is aten.dropout.default]
    qn = next(n for n in g.nodes if n.op == "placeholder" and n.target == "q")
    with g.inserting_before(drop):
        flag = g.call_function(operator.gt, (g.call_function(aten.sym_size.int, (qn, 0)), 1))
    drop.args = (drop.args[0], 0.1, flag)
    captured.graph_module.recompile()
    gm, r = _sdpa(captured, "sdpa{canonicalize=false}")
    assert r.stats == {"kept": 1}, r.decisions
    assert "dropout probability or train flag is not a constant" in r.decisions[-1].reason, r.decisions[-1].reason
